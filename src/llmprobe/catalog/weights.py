"""`llmprobe weights`: analyses of the stored tensors (no forward pass; streamed one at a time)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from pydantic import field_validator

from ..options import (
    OUTPUT,
    FigureOptions,
    ModelOptions,
    Options,
    OutputOptions,
    option,
)
from ..registry import Analysis, Show, register, register_group

register_group("weights", "Weight analyses (no forward pass): spectra, stats, BOPs, embeddings.")

WEIGHTS = "llmprobe.analyses.weight_tables"
FILTER_HELP = "Regex (re.search) on tensor names; default: every tensor."


class TensorFilter(Options):
    filter: Optional[str] = option(None, "--filter", "--filter-layers", check="regex", help=FILTER_HELP)


class ZeroTol(Options):
    zero_tol: float = option(1e-8, "--zero-tol", ge=0, help="|w| <= this counts as zero for sparsity.")


class StatsOptions(ModelOptions, TensorFilter, ZeroTol, OutputOptions, FigureOptions):
    pass


register(Analysis(
    name="weights.stats",
    help="Per-tensor statistics in fp64: mean, std, min/max, abs-max, sparsity, kurtosis, NaN/Inf counts.",
    options=StatsOptions,
    needs=("weights",),
    prepare=f"{WEIGHTS}:prepare_stats_job",
    compute=f"{WEIGHTS}:stats_job",
    figures="llmprobe.plots.weights:stats_figures",
    summary=(Show("weight_stats", lambda o, r: f"weight stats ({len(r['weight_stats'])} tensors)",
                  ("name", "layer_index", "role", "shape", "std", "abs_max", "kurtosis", "sparsity", "nan_count")),),
))


class SpectrumOptions(ModelOptions, TensorFilter, ZeroTol, OutputOptions, FigureOptions):
    rank_rtol: float = option(1e-6, "--rank-rtol", gt=0, lt=float("inf"),
                              help="Numerical rank counts σ > rank_rtol·σ_max.")
    energy: float = option(0.9, "--energy", gt=0, le=1,
                           help="Energy rank: fewest σ holding this fraction of Σσ², in (0, 1].")
    device: str = option("auto", "--device", check="device", help="auto|cpu|cuda|cuda:N: where the spectra are computed.")


register(Analysis(
    name="weights.spectrum",
    help="Ranks and norms of every 2-D weight from its full singular-value spectrum (fp64, never cropped).",
    options=SpectrumOptions,
    needs=("weights",),
    prepare=f"{WEIGHTS}:prepare_spectrum_job",
    compute=f"{WEIGHTS}:spectrum_job",
    figures="llmprobe.plots.weights:spectrum_figures",
    summary=(Show("weight_spectrum", lambda o, r: f"weight spectrum ({len(r['weight_spectrum'])} matrices)",
                  ("name", "layer_index", "role", "shape", "actual_rank", "energy_rank", "stable_rank",
                   "effective_rank", "status")),),
))


class BopsOptions(ModelOptions, OutputOptions, FigureOptions):
    w_bits: int = option(4, "--w-bits", "--quant-bits", ge=1, le=32, help="Weight bits (LMAnalyser's --quant_bits).")
    a_bits: int = option(16, "--a-bits", ge=1, le=32, help="Activation bits.")
    block_size: Optional[int] = option(
        None, "--block-size", ge=1,
        help="Weights per fp16 scale; adds one 16x16-bit scale multiply per block per token.")


register(Analysis(
    name="weights.bops",
    help="Bit operations per token of every linear module (in·out·b_w·b_a), per layer, role and model.",
    options=BopsOptions,
    needs=("source",),
    prepare=f"{WEIGHTS}:prepare_bops_job",
    compute=f"{WEIGHTS}:bops_job",
    figures="llmprobe.plots.weights:bops_figures",
    printer="llmprobe.cli.printers:bops",
    json_table="bops",
))


PRECISIONS_HELP = ("Comma list of formats the weight is put through: fp64, fp32, fp16, bf16, fp8_e4m3, fp8_e5m2, "
                   "int8, int4 (any int2…int16, per output channel), nf4.")


class AlphaHillOptions(ModelOptions, OutputOptions):
    precisions: str = option("fp32,fp16,bf16", "--precisions", help=PRECISIONS_HELP)
    k_frac: float = option(0.1, "--k-frac", gt=0, lt=1,
                           help="Alpha-Hill uses the top k = max(10, ⌊k_frac·n⌋) eigenvalues; in (0, 1).")
    filter: Optional[str] = option(
        None, "--filter-layers", "--filter", check="regex",
        help="Regex (re.search) on weight names; picks any 2-D weight. Default: every 2-D weight inside the "
             "decoder blocks (no embeddings / lm_head).")
    fit: str = option("hill", "--fit", choices=("hill", "powerlaw"),
                      help="hill: Alpha-Hill; powerlaw: Clauset MLE with xmin by KS distance (WeightWatcher's "
                           "alpha), Hill kept as alpha_hill_<p>.")
    device: str = option("auto", "--device", check="device", help="auto|cpu|cuda|cuda:N: where the spectra are computed.")
    load_dtype: str = option("fp32", "--load-dtype", choices=("fp32", "fp16", "bf16"),
                             help="fp32|fp16|bf16: every weight is first cast to this (as the seed's model load).")
    spectrum_dtype: str = option(
        "auto", "--spectrum-dtype", choices=("auto", "fp64", "fp32"),
        help="Arithmetic of the spectra: auto (fp64 when comparing 2+ precisions, whose differences are below "
             "fp32 noise, or with --fit powerlaw; fp32 for a single precision with Hill), fp64, or fp32 "
             "(fastest). The fp64 precision is always computed in fp64.")
    plot: bool = option(True, "--plot/--no-plot", panel=OUTPUT, help="Write the figures under plots/ (default on).")
    plot_format: str = option("png", "--plot-format", panel=OUTPUT, choices=("png", "pdf", "svg"), help="png|pdf|svg.")
    individual_plots: bool = option(
        False, "--individual-plots", panel=OUTPUT,
        help="Also write seed 001's one bar chart per matrix under plots/individual_layers/.")
    max_layers_per_plot: int = option(10, "--max-layers-per-plot", ge=0, panel=OUTPUT,
                                      help="Matrices per combined_batch figure; 0 puts all in one.")
    log_level: str = option("INFO", "--log-level", panel=OUTPUT,
                            choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
                            help="DEBUG|INFO|WARNING|ERROR|CRITICAL (DEBUG logs every matrix's alphas).")
    out: Optional[Path] = option(None, "--out", "-o", "--output-dir", panel=OUTPUT,
                                 help="Output directory (default: results/<model>/weights-alpha-hill/).")

    @field_validator("log_level", mode="before")
    @classmethod
    def _any_case(cls, value):
        return value.upper() if isinstance(value, str) else value

    def check(self) -> None:
        from ..analyses.alpha_hill import parse_precisions

        parse_precisions(self.precisions)


register(Analysis(
    name="weights.alpha-hill",
    help="Alpha-Hill (or a power-law fit) of every weight matrix at several precisions (seed 001).",
    options=AlphaHillOptions,
    needs=("weights",),
    prepare="llmprobe.analyses.alpha_hill:prepare_job",
    compute="llmprobe.analyses.alpha_hill:alpha_hill_job",
    figures="llmprobe.plots.alpha_hill:alpha_hill_figures",
    many_figures=True,
    summary=(Show("precision_summary_statistics",
                  lambda o, r: f"alpha ({o.fit}) by precision over "
                               f"{len(r['precision_alpha_hill_results'])} matrices"),),
    json_table="precision_alpha_hill_results",
))


class EmbeddingsOptions(ModelOptions, OutputOptions, FigureOptions):
    tensor: Optional[str] = option(None, "--tensor", help="2-D tensor to cluster (default: the token-embedding matrix).")
    max_k: int = option(100, "--max-k", ge=2, help="Largest k of the scan (k runs from 2).")
    fit_sample: int = option(5000, "--fit-sample", ge=3,
                             help="Random rows the k scan is fit on (all rows if fewer); the chosen k is then "
                                  "refit on every row.")
    silhouette_sample: int = option(2000, "--silhouette-sample", ge=0,
                                    help="Random rows the silhouette is computed on (0: none).")
    representatives: int = option(10, "--representatives", ge=0, help="Members nearest to each centroid to list.")
    seed: int = option(0, "--seed", help="Seed for the row samples and the k-means inits.")


register(Analysis(
    name="weights.embeddings",
    help="K-means clusters of the standardized embedding rows; k chosen by the variance-ratio F (Calinski–Harabasz).",
    options=EmbeddingsOptions,
    needs=("weights",),
    prepare="llmprobe.analyses.embeddings:prepare_job",
    compute="llmprobe.analyses.embeddings:embeddings_job",
    figures="llmprobe.plots.embeddings:embedding_figures",
    printer="llmprobe.cli.printers:embeddings",
    json_table="embedding_clusters",
))
