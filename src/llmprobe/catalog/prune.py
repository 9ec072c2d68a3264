"""`llmprobe prune`: magnitude / Wanda / SparseGPT pruning, and Wanda's metric for one layer."""

from __future__ import annotations

from typing import Optional

from ..core.errors import LLMProbeError
from ..core.specs import parse_nm
from ..options import (
    DATA,
    MODEL,
    CalibrationOptions,
    FigureOptions,
    Options,
    OutputOptions,
    RuntimeOptions,
    SelectionOptions,
    option,
)
from ..registry import Analysis, Show, register, register_group

register_group("prune", "Pruning: magnitude, Wanda, SparseGPT (unstructured or N:M, OWL allocation); Wanda's metric.")

PRUNE = "llmprobe.analyses.prune"
PLOTS = "llmprobe.plots.prune"
METHODS = ("magnitude", "wanda", "sparsegpt")
DATASET_HELP = "Calibration text: c4 (as both papers) | wikitext2 | a path (.txt, .jsonl, .json, .parquet, wiki.*.raw)."


class PruneCalibration(CalibrationOptions):
    dataset: str = option("c4", "--dataset", "--calib-dataset", panel=DATA, help=DATASET_HELP)
    seqlen: Optional[int] = option(None, "--seqlen", panel=DATA, ge=2,
                                   help="Calibration window length (default: the model's context, capped at 2048).")


class BatchSize(Options):
    batch_size: int = option(8, "--batch-size", ge=1, help="Calibration windows per forward pass.")


class ComputeDevice(RuntimeOptions):
    compute_device: str = option(
        "auto", "--compute-device", panel=MODEL,
        help="Where each decoder block is computed (auto: where the model is). With --device cpu "
             "--compute-device cuda only one block is on the GPU at a time.")


class PruneRunOptions(ComputeDevice, BatchSize, PruneCalibration, SelectionOptions, OutputOptions, FigureOptions):
    method: str = option("wanda", "--method", choices=METHODS, help="magnitude|wanda|sparsegpt.")
    sparsity: Optional[float] = option(None, "--sparsity", ge=0, lt=1,
                                       help="Unstructured: fraction of weights removed (default 0.5 unless --nm).")
    nm: Optional[str] = option(None, "--nm", help="Semi-structured N:M, e.g. 2:4 (N of every M inputs removed).")
    scope: str = option("matrix", "--scope", choices=("matrix", "row"),
                        help="magnitude: one threshold per matrix (the papers' baseline) or per output row.")
    allocation: str = option("uniform", "--allocation", choices=("uniform", "owl"),
                             help="uniform, or owl: per-layer sparsity from the layer's outlier ratio (same mean).")
    owl_m: float = option(5.0, "--owl-m", gt=0, help="OWL: outlier = Wanda score above M x the layer mean.")
    owl_lambda: float = option(0.08, "--owl-lambda", ge=0, lt=1, help="OWL: layer sparsities within S +- lambda.")
    percdamp: float = option(0.01, "--percdamp", ge=0, help="SparseGPT: damping as a fraction of mean(diag H).")
    blocksize: int = option(128, "--blocksize", ge=1, help="SparseGPT: columns per mask/lazy-update block.")
    reconstruction: bool = option(True, "--reconstruction/--no-reconstruction",
                                  help="wanda: also measure ||WX - W'X||^2/||WX||^2 (needs X X^T; slower).")
    evaluate: bool = option(True, "--eval/--no-eval", panel=DATA, help="Perplexity before and after pruning.")
    eval_dataset: str = option("wikitext2", "--eval-dataset", panel=DATA,
                               help="Perplexity text: wikitext2 (test) | c4 (validation) | a path.")
    eval_seqlen: Optional[int] = option(None, "--eval-seqlen", panel=DATA, ge=2,
                                        help="Evaluation window length (default: 2048, capped at the model's).")
    max_windows: Optional[int] = option(None, "--max-windows", panel=DATA, ge=1, help="Evaluate on N windows only.")
    save_model: bool = option(True, "--save-model/--no-save-model",
                              help="Write the pruned model as a Hugging Face folder (model/).")
    save_mask: bool = option(False, "--save-mask", help="Also write masks.safetensors (keep-masks, bool).")
    restore: bool = option(True, "--restore/--no-restore",
                           help="Give the dense weights back in memory afterwards (keeps a host copy of the "
                                "pruned matrices); --no-restore prunes the loaded model for good, lowest memory.")

    def check(self) -> None:
        if self.sparsity is not None and self.nm is not None:
            raise LLMProbeError("give one of --sparsity S (unstructured) or --nm N:M, not both")
        if self.nm is not None:
            n, m = parse_nm(self.nm)
            if self.allocation == "owl":
                raise LLMProbeError("--allocation owl sets a sparsity per layer; it needs --sparsity, not --nm")
            if self.method == "sparsegpt" and self.blocksize % m:
                raise LLMProbeError(f"--blocksize {self.blocksize} must be a multiple of M={m} for --nm {n}:{m}")

    @property
    def target_sparsity(self) -> float | None:
        return None if self.nm is not None else (0.5 if self.sparsity is None else self.sparsity)


def _run_title(options, result) -> str:
    s = result["prune_summary"][0]
    return f"{s.method} {s.pattern} ({s.allocation}): achieved sparsity {s.achieved_sparsity:.4f}"


register(Analysis(
    name="prune.run",
    help="Prune the decoder's linear layers (magnitude, Wanda or SparseGPT; unstructured or N:M; OWL), "
         "layer by layer, and save the pruned model.",
    options=PruneRunOptions,
    needs=("model",),
    prepare=f"{PRUNE}:prepare_run_job",
    compute=f"{PRUNE}:run_job",
    figures=f"{PLOTS}:prune_result_figures",
    summary=(Show("prune_summary", _run_title,
                  ("matrices", "params", "achieved_sparsity", "mean_reconstruction_error", "ppl_dense",
                   "ppl_pruned", "prune_seconds", "saved_to")),
             Show("pruned_layers", "sparsity per layer",
                  ("layer", "matrices", "target_sparsity", "achieved_sparsity", "outlier_ratio"))),
    json_table="pruned_matrices",
    notes=("The pruned model opens with AutoModelForCausalLM.from_pretrained(<out>/model) and llmprobe --model.",),
))


class LayerMetricsOptions(RuntimeOptions, BatchSize, CalibrationOptions, OutputOptions, FigureOptions):
    layer: str = option(..., "--layer", help="Full name of one linear module, e.g. model.layers.0.self_attn.q_proj.")
    max_cells: int = option(256, "--max-cells", ge=8, help="Heatmaps are max-pooled to at most this many rows/columns.")
    bins: int = option(80, "--bins", ge=2, help="Histogram bins (log-spaced).")


register(Analysis(
    name="prune.layer-metrics",
    help="|W|, activation norm sqrt(mean x^2) and the Wanda score |W|*sqrt(mean x^2) of one linear layer "
         "(seed 004's 3x3 figure, max-pooled, never cropped).",
    options=LayerMetricsOptions,
    needs=("calibration",),
    prepare=f"{PRUNE}:prepare_layer_metrics_job",
    compute=f"{PRUNE}:layer_metrics_job",
    figures=f"{PLOTS}:layer_metrics_result_figures",
    summary=(Show("layer_metrics", lambda o, r: f"{o.layer}",
                  ("quantity", "shape", "mean", "std", "min", "median", "p99", "max")),),
))
