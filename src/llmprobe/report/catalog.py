"""What the report knows about each llmprobe command: its title, what it measures (one
paragraph for the reader), which of its figures and tables to show first, and which columns.

A command the catalog does not know still gets a section (all its tables, its first figures),
so a new analysis appears in reports before anyone describes it here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TableSpec:
    name: str
    caption: str
    columns: tuple[str, ...] = ()  # shown columns (prefix '*' = every column starting so); empty: all
    sort_by: str | None = None
    descending: bool = True
    by_abs: bool = False


@dataclass(frozen=True)
class SectionSpec:
    command: str
    title: str
    what: str
    figures: tuple[str, ...] = ()  # figure stems to show, in order ('*' suffix: prefix match)
    tables: tuple[TableSpec, ...] = ()
    max_extra_figures: int = 8  # further figures, embedded behind a "more figures" fold


#: The order of groups in the report.
GROUP_ORDER = ("eval", "model", "weights", "activations", "robustness", "prune", "quant")

_SPECS: list[SectionSpec] = [
    SectionSpec(
        "eval perplexity", "Perplexity",
        "Next-token perplexity on the evaluation text: the text is tokenized once and cut into "
        "windows; each window scores its shifted next-token loss, and ppl = exp(sum of NLL / scored "
        "tokens). Bits per byte divide the same NLL by the UTF-8 bytes of the scored text, so models "
        "with different tokenizers compare.",
        tables=(TableSpec("perplexity", "Perplexity"),),
    ),
    SectionSpec(
        "model info", "Model",
        "The model's structure from its config, instantiated without weights.",
        tables=(TableSpec("model_info", "Model facts"),),
    ),
    SectionSpec(
        "model layers", "Layers",
        "Every linear module found from the model structure, with its layer, canonical role and "
        "shape; the census counts modules by class.",
        tables=(TableSpec("module_census", "Modules by class", sort_by="parameters"),
                TableSpec("linear_modules", "Linear modules",
                          ("name", "layer", "role", "in_features", "out_features", "parameters", "input_group"))),
    ),
    SectionSpec(
        "weights alpha-hill", "Weight spectra across precisions (Alpha-Hill)",
        "The Alpha-Hill exponent of each weight matrix's eigenvalue spectrum (heavy-tail index of "
        "the squared singular values; lower means heavier-tailed, more strongly trained), after "
        "putting the weight through each numeric precision. The difference to the first precision "
        "(delta alpha) shows which matrices a precision changes; the table adds max |delta alpha| "
        "over the precisions.",
        figures=("alpha_vs_depth_attn_v", "alpha_vs_depth_mlp_down", "alpha_vs_depth_*",
                 "alpha_distribution_by_precision"),
        tables=(TableSpec("precision_summary_statistics", "Alpha per precision"),
                TableSpec("precision_alpha_hill_results", "Alpha per matrix",
                          ("layer_name", "layer_index", "role", "*alpha_", "max_abs_delta_alpha",
                           "delta_alpha_precision", "status"),
                          sort_by="max_abs_delta_alpha")),
    ),
    SectionSpec(
        "weights spectrum", "Weight ranks and norms",
        "Singular values of each full weight matrix (fp64): numerical rank, the rank holding the "
        "chosen energy fraction, stable rank sum(s^2)/s1^2, effective rank exp(entropy) and norms. "
        "Low ratios mean a matrix uses few directions.",
        figures=("weight_spectrum",),
        tables=(TableSpec("weight_spectrum", "Ranks per matrix",
                          ("name", "layer_index", "role", "shape", "actual_rank", "rank_ratio", "energy_rank_ratio",
                           "stable_rank", "effective_rank", "spectral_norm", "frobenius_norm", "status"),
                          sort_by="energy_rank_ratio", descending=False),),
    ),
    SectionSpec(
        "weights stats", "Weight statistics",
        "Element statistics of every tensor (fp64, two passes): mean, std, min/max, sparsity and "
        "excess kurtosis; a high kurtosis or abs-max marks a tensor with outlier weights.",
        figures=("weight_stats",),
        tables=(TableSpec("weight_stats", "Statistics per tensor",
                          ("name", "shape", "layer_index", "role", "dtype", "mean", "std", "abs_max", "sparsity",
                           "kurtosis", "nan_count", "inf_count"),
                          sort_by="kurtosis"),),
    ),
    SectionSpec(
        "weights embeddings", "Embedding clusters",
        "K-means clusters of the standardized token-embedding rows, k chosen by the Calinski-Harabasz "
        "(ANOVA F) ratio; representatives are the members nearest each centroid.",
        figures=("anova_curve", "cluster_sizes"),
        tables=(TableSpec("embedding_summary", "Clustering"),
                TableSpec("embedding_clusters", "Clusters", sort_by="size")),
    ),
    SectionSpec(
        "weights bops", "Bit operations",
        "Bit operations per token of every linear module from its shape and the weight/activation "
        "bit widths, against the fp16 baseline.",
        figures=("bops",),
        tables=(TableSpec("bops", "BOPs per module", sort_by="bops"),),
    ),
    SectionSpec(
        "activations magnitude", "Activation magnitude",
        "The largest absolute activation max|x| entering each linear module over the calibration "
        "windows, and the per-window maximum averaged over windows; token tables name the tokens "
        "carrying the largest spikes (usually the first token or delimiters: attention sinks).",
        figures=("magnitude_role_layers", "magnitude_per_layer", "magnitude_top_tokens"),
        tables=(TableSpec("magnitude_modules", "max|x| per module",
                          ("module", "layer", "role", "abs_max", "window_abs_max_mean", "tokens", "windows"),
                          sort_by="abs_max"),
                TableSpec("magnitude_tokens", "Tokens with the largest max|x|",
                          ("scope", "rank", "token_id", "token_text", "occurrences", "mean_max_abs", "max_max_abs"),
                          sort_by="max_max_abs")),
    ),
    SectionSpec(
        "activations kurtosis", "Activation kurtosis",
        "Fisher excess kurtosis (population moments; 0 for a Gaussian) of all tokens x features "
        "entering each linear module: per window averaged over windows, and pooled over all windows. "
        "Large values mean a few huge outliers in an otherwise narrow distribution - what makes "
        "activation quantization hard.",
        figures=("kurtosis_role_layers", "kurtosis_per_layer", "kurtosis_per_role"),
        tables=(TableSpec("kurtosis_modules", "Kurtosis per module",
                          ("module", "layer", "role", "kurtosis_pooled", "kurtosis_window_mean", "std", "skewness",
                           "windows_without_spread"),
                          sort_by="kurtosis_pooled"),
                TableSpec("kurtosis_layers", "Kurtosis per layer", sort_by="kurtosis_pooled_max")),
    ),
    SectionSpec(
        "activations max-median", "Activation spikes (max / median)",
        "QFeP's outlier measure: each token's scale is its max|x| over features; the ratio is the "
        "largest token scale over the median token scale at each module (and layer). A ratio far "
        "above 1 means a few tokens carry spikes far larger than typical tokens.",
        figures=("max_median_role_layers", "max_median_per_layer"),
        tables=(TableSpec("max_median_layers", "Max/median per layer", sort_by="ratio"),
                TableSpec("max_median_modules", "Max/median per module", sort_by="ratio")),
    ),
    SectionSpec(
        "activations quant-error", "Activation quantization error",
        "Mean squared error between each module's input and its fake-quantized copy, and the "
        "scale-free relative MSE sum((x-Q(x))^2)/sum(x^2) with its SQNR in dB. High relative error "
        "marks the inputs a quantizer of this format damages most.",
        figures=("quant_error_per_layer",),
        tables=(TableSpec("quant_error", "Error per module",
                          ("module", "layer", "role", "format", "granularity", "mse", "rel_mse", "sqnr_db"),
                          sort_by="rel_mse"),
                TableSpec("quant_error_summary", "Error per layer, role and model", sort_by="rel_mse_pooled")),
    ),
    SectionSpec(
        "activations fisher", "Fisher sensitivity",
        "Empirical Fisher information of each module's input: the squared gradient of the window's "
        "next-token loss with respect to the input, summed over tokens and features, averaged over "
        "windows. Higher means the loss reacts more to changes of that input.",
        figures=("fisher_per_layer",),
        tables=(TableSpec("fisher_summary", "Fisher per layer, role and model", sort_by="fisher_mean"),
                TableSpec("fisher", "Fisher per module", sort_by="fisher_mean")),
    ),
    SectionSpec(
        "activations fgmp", "FGMP sensitivity",
        "Fisher-weighted quantization error sum(g^2 (Q_low(x) - Q_high(x))^2) per module and block: "
        "the expected loss increase of keeping an input in the low format.",
        figures=("fgmp_per_layer",),
    ),
    SectionSpec(
        "robustness super-weights", "Super weights",
        "The super-weight method (arXiv 2411.07191): where both the input and the output of an MLP "
        "down projection spike, the weight at [output channel, input channel] is a super weight; "
        "found ones are zeroed and the search repeated. Each is zeroed alone and perplexity / KL "
        "against the unmodified model measured; the checks zero all of them, and all outliers but "
        "the super weights, to show the effect is the weights'.",
        figures=("super_weight_spikes", "super_weights*", "spikes*"),
        tables=(TableSpec("super_weights", "Super weights",
                          ("layer", "module", "weight_row", "weight_col", "row", "col", "value", "input_spike",
                           "output_spike", "token_position", "token", "ppl", "delta_ppl", "kl"),
                          sort_by="delta_ppl"),
                TableSpec("super_weight_checks", "Checks", sort_by="delta_ppl"),
                TableSpec("massive_activations", "Massive activations per layer", sort_by="max_abs"),
                TableSpec("reference", "Unmodified model")),
    ),
    SectionSpec(
        "robustness ablation", "Ablation sensitivity",
        "Each target (matrix, role group or whole block) zeroed, mean-set or skipped alone; the "
        "perplexity change and KL against the unmodified model rank how much the model depends on "
        "it. Block influence (1 - cosine of a block's input and output) and the angular distance "
        "over spans of blocks come from one forward pass, with their rank agreement with the "
        "measured perplexity change.",
        figures=("ablation_ranking", "ablation_heatmap_delta_ppl", "block_similarity", "ablation*",
                 "block_influence*"),
        tables=(TableSpec("ablation", "Ablation ranking",
                          ("rank", "target", "granularity", "mode", "layer", "role", "ppl", "delta_ppl", "ppl_ratio",
                           "kl", "top1_agreement", "nonfinite_windows"),
                          sort_by="delta_ppl"),
                TableSpec("block_similarity", "Block influence and angular distance", sort_by="block_influence"),
                TableSpec("block_influence", "Block influence", sort_by="block_influence"),
                TableSpec("similarity_agreement", "Agreement with measured ablation (Spearman)"),
                TableSpec("reference", "Unmodified model")),
    ),
    SectionSpec(
        "robustness noise", "Noise robustness",
        "Gaussian or uniform noise of scale sigma times each matrix's std (or absolute) added to the "
        "chosen weights; perplexity and KL against the unmodified model over the sigma sweep, mean "
        "and spread over repeats.",
        figures=("noise_curves", "noise*"),
        tables=(TableSpec("noise_summary", "Noise sweep"), TableSpec("noise_runs", "Every run")),
    ),
    SectionSpec(
        "robustness bit-flip", "Bit flips",
        "Single bits of stored weights flipped; the change of the next-token loss per bit position "
        "(sign, exponent, mantissa), non-finite outcomes counted, not hidden.",
        figures=("bit_positions", "bit*"),
        tables=(TableSpec("bit_positions", "Loss change per bit position"),
                TableSpec("bit_flips", "Every flip", sort_by="delta_loss")),
    ),
    SectionSpec(
        "robustness adversarial", "Adversarial inputs",
        "Token swaps, character edits and embedding-space attacks on the next-token loss; change in "
        "loss, KL and greedy agreement per attack and budget.",
        figures=("adversarial*",),
        tables=(TableSpec("adversarial_summary", "Per attack and budget"),
                TableSpec("adversarial_runs", "Every run")),
    ),
    SectionSpec(
        "prune run", "Pruning",
        "Weights pruned (magnitude, Wanda or SparseGPT; unstructured or N:M) layer by layer on "
        "calibration inputs; achieved sparsity and the relative reconstruction error "
        "||WX - W'X||^2 / ||WX||^2 per matrix, and perplexity before and after.",
        figures=("prune_perplexity", "prune_layers", "prune_reconstruction_error"),
        tables=(TableSpec("prune_summary", "Summary"),
                TableSpec("prune_perplexity", "Perplexity before and after"),
                TableSpec("pruned_layers", "Per layer"),
                TableSpec("pruned_matrices", "Per matrix",
                          ("module", "layer", "role", "method", "pattern", "target_sparsity", "achieved_sparsity",
                           "reconstruction_error"),
                          sort_by="reconstruction_error")),
    ),
    SectionSpec(
        "prune layer-metrics", "Pruning metrics of one layer",
        "|W|, the activation norms sqrt(E[x_j^2]) and the Wanda score |W| sqrt(E[x_j^2]) of one layer: "
        "heatmaps, histograms and statistics.",
        tables=(TableSpec("layer_metrics", "Statistics"),),
    ),
    SectionSpec(
        "quant plan", "Quantization plan",
        "A weight format per linear module chosen to minimise the summed measured sensitivity under "
        "an average bit budget (a multiple-choice knapsack over the candidate formats).",
        figures=("quant_plan_formats", "quant_sensitivity", "quant_plan*", "plan*"),
        tables=(TableSpec("quant_plan_summary", "Plan summary"),
                TableSpec("quant_plan", "Plan per module",
                          ("module", "layer", "role", "params", "format", "bits_per_param", "sensitivity", "pinned"),
                          sort_by="sensitivity"),
                TableSpec("quant_sensitivity", "Sensitivity per module and format", sort_by="sensitivity")),
    ),
    SectionSpec(
        "quant eval", "Quantization plan evaluation",
        "Weights fake-quantized by a plan, uniformly or at random; perplexity and KL against the "
        "unquantized model, as a curve over average bits when swept.",
        figures=("quant_sweep", "quant_eval*", "sweep*"),
        tables=(TableSpec("quant_eval", "Evaluated plans", sort_by="avg_bits", descending=False),
                TableSpec("quant_sweep", "Sweep", sort_by="avg_bits", descending=False)),
    ),
]

SPECS: dict[str, SectionSpec] = {s.command: s for s in _SPECS}

#: The analyses a full report is expected to contain, with the command that produces each; an
#: absent one is named in the report's "not in this report" list.
EXPECTED: tuple[tuple[str, str], ...] = (
    ("eval perplexity", "llmprobe eval perplexity"),
    ("weights alpha-hill", "llmprobe weights alpha-hill"),
    ("weights spectrum", "llmprobe weights spectrum"),
    ("weights stats", "llmprobe weights stats"),
    ("activations magnitude", "llmprobe activations magnitude"),
    ("activations kurtosis", "llmprobe activations kurtosis"),
    ("activations max-median", "llmprobe activations max-median"),
    ("activations quant-error", "llmprobe activations quant-error"),
    ("robustness super-weights", "llmprobe robustness super-weights"),
    ("robustness ablation", "llmprobe robustness ablation"),
)


def spec_for(command: str) -> SectionSpec:
    if command in SPECS:
        return SPECS[command]
    return SectionSpec(command, command.title() if command != "unknown" else "Unknown analysis",
                       f"Results of `llmprobe {command}` (no description in this version of the report).")


def title_for(command: str) -> str:
    return spec_for(command).title


def group_rank(command: str) -> tuple[int, int]:
    group = command.split(" ")[0]
    g = GROUP_ORDER.index(group) if group in GROUP_ORDER else len(GROUP_ORDER)
    c = list(SPECS).index(command) if command in SPECS else len(SPECS)
    return g, c


def figure_matches(pattern: str, stem: str) -> bool:
    return stem.startswith(pattern[:-1]) if pattern.endswith("*") else stem == pattern

