"""`llmprobe activations`: statistics of each linear module's activations over calibration windows.

LMAnalyser's option spellings are accepted as aliases.
"""

from __future__ import annotations

from typing import Optional

from ..core.specs import KURTOSIS_ESTIMATOR as ESTIMATOR
from ..options import (
    CalibrationOptions,
    FigureOptions,
    Options,
    OutputOptions,
    RuntimeOptions,
    SelectionOptions,
    option,
)
from ..registry import Analysis, Show, register, register_group

register_group("activations",
               "Activation analyses over calibration windows: magnitude, kurtosis, quant error, Fisher, ...")

STATS = "llmprobe.analyses.activation_stats"
QUANT = "llmprobe.analyses.activation_quant"
PLOTS = "llmprobe.plots.activations"
QPLOTS = "llmprobe.plots.activation_quant"


class Collection(Options):
    """How activations are collected (every activation command)."""

    site: str = option("input", "--site", choices=("input", "output"), help="input|output of each linear module.")
    exclude_bos: bool = option(False, "--exclude-bos", help="Drop each window's first token (and BOS ids).")
    exclude_tokens: Optional[list[str]] = option(
        None, "--exclude-tokens", help="Drop these tokens (text as the tokenizer writes it, or ids); repeatable.")
    rotate: str = option("none", "--rotate", choices=("none", "hadamard"),
                         help="none|hadamard: rotate the feature dimension first.")


class BatchSize(Options):
    batch_size: int = option(1, "--batch-size", ge=1, help="Windows per forward pass.")


class ActivationOptions(RuntimeOptions, CalibrationOptions, SelectionOptions, Collection, BatchSize,
                        OutputOptions, FigureOptions):
    """Options shared by every activation command over calibration windows."""


class TokenRanking(Options):
    top_k: int = option(10, "--top-k", ge=1, help="Tokens listed per scope.")
    min_count: int = option(1, "--min-count", ge=1, help="Only rank tokens that occur at least this many times.")


RANK_BY = ("max", "mean")


def activation(name: str, help: str, options, compute: str, figures: str | None, *summary: Show,
               needs=("calibration",), **extra) -> Analysis:
    return register(Analysis(name=f"activations.{name}", help=help, options=options, needs=needs,
                             compute=compute, figures=figures, summary=summary,
                             shares_pass="calibration" in needs, **extra))


class MagnitudeOptions(ActivationOptions, TokenRanking):
    rank_by: str = option("max", "--rank-by", choices=RANK_BY, help="Order tokens by the max or the mean of their max|x|.")


activation(
    "magnitude", "max|x| per module, layer, role and role×layer, and the tokens with the largest max|x|.",
    MagnitudeOptions, f"{STATS}:magnitude_job", f"{PLOTS}:magnitude_figures",
    Show("magnitude_layers", "activation max|x| per layer",
         ("layer", "modules", "abs_max", "module_abs_max_mean", "window_abs_max_mean")),
    Show("magnitude_tokens", lambda o, r: f"top tokens by {o.rank_by} max|x| (all modules)",
         ("rank", "token_id", "token_text", "occurrences", "mean_max_abs", "max_max_abs"),
         where=lambda row: row.scope == "all"))


class KurtosisOptions(ActivationOptions):
    pass


activation(
    "kurtosis", "Excess (Fisher, biased) kurtosis of each module's activations: per-window mean and pooled.",
    KurtosisOptions, f"{STATS}:kurtosis_job", f"{PLOTS}:kurtosis_figures",
    Show("kurtosis_layers", f"excess kurtosis per layer ({ESTIMATOR})",
         ("layer", "modules", "kurtosis_window_mean", "kurtosis_pooled_mean", "kurtosis_pooled_max")),
    Show("kurtosis_roles", "excess kurtosis per role",
         ("role", "modules", "kurtosis_window_mean", "kurtosis_pooled_mean", "kurtosis_pooled_max")))


class TokenKurtosisOptions(ActivationOptions, TokenRanking):
    layers: Optional[str] = option(
        None, "--layers", check="layers_or_all",
        help="Layers to analyse: '0,5,10', '0-3' or 'all' (default: first, middle and last).")


activation(
    "token-kurtosis", "Tokens whose feature vectors have the highest excess kurtosis, per role, layer and role×layer.",
    TokenKurtosisOptions, f"{STATS}:token_kurtosis_job", f"{PLOTS}:token_kurtosis_figures",
    Show("token_kurtosis", f"tokens with the highest excess kurtosis per role ({ESTIMATOR})",
         ("role", "rank", "token_id", "token_text", "occurrences", "mean_kurtosis", "max_kurtosis"),
         where=lambda row: row.scope == "role"))


class DownProjSpikesOptions(ActivationOptions, TokenRanking):
    top_k: int = option(5, "--top-k", ge=1, help="Tokens listed per scope.")
    rank_by: str = option("mean", "--rank-by", choices=RANK_BY,
                          help="Order tokens by the max or the mean of their max|x|.")
    roles: Optional[list[str]] = option(None, "--roles", "--role", hidden=True,
                                        help="Not used: this command always looks at the MLP down projections.")


activation(
    "down-proj-spikes", "Top tokens by max|x| at each layer's MLP down projection (mlp.down / mlp.fc2); largest spikes.",
    DownProjSpikesOptions, f"{STATS}:down_proj_spikes_job", f"{PLOTS}:down_proj_spikes_figures",
    Show("down_proj_spikes", lambda o, r: f"down projection: top token per layer (by {o.rank_by} max|x|)",
         ("layer", "token_id", "token_text", "occurrences", "mean_max_abs", "max_max_abs", "peak_channel"),
         where=lambda row: row.rank == 1),
    prepare=f"{STATS}:prepare_down_proj_job", json_table="down_proj_spikes")


class TokenOccurrenceOptions(ActivationOptions):
    target_token: str = option(..., "--target-token", "--target_token",
                               help="Token text as it appears in text; '\\n', '\\t', '\\s' (space) are read as escapes.")
    exact: bool = option(False, "--exact", help="Match only the token written exactly so, not also its after-a-space form.")
    max_occurrence: Optional[int] = option(None, "--max-occurrence", ge=1, help="Report occurrences 1..N only.")

    def check(self) -> None:
        from ..core.errors import LLMProbeError

        if self.target_token == "":
            raise LLMProbeError("--target-token is empty; give the token's text, e.g. '\\n' or 'the'")


activation(
    "token-occurrence", "max|x| at the 1st, 2nd, ... occurrence of a token within each window, per module and role.",
    TokenOccurrenceOptions, f"{STATS}:token_occurrence_job", f"{PLOTS}:token_occurrence_figures",
    Show("token_occurrence_roles", lambda o, r: f"max|x| at each occurrence of {r['token_occurrence_summary'][0].target!r}",
         ("role", "occurrence", "samples", "mean_max_abs", "max_max_abs")))


class PromptOptions(RuntimeOptions, SelectionOptions, Collection, OutputOptions, FigureOptions):
    text: str = option(..., "--text", "--prompt", "--analyze-prompt", help="The input to analyse.")
    plot_layers: Optional[str] = option(None, "--plot-layers", check="layers",
                                        help="Layers drawn as lines in the line plot (default: up to 8, evenly spread).")

    def check(self) -> None:
        from ..core.errors import LLMProbeError

        if not self.text.strip():
            raise LLMProbeError("--text is empty; give the prompt to analyse, e.g. --text 'The quick brown fox'")


activation(
    "prompt", "Per-token max|x| at every selected layer and role for one input text.",
    PromptOptions, f"{STATS}:prompt_job", f"{PLOTS}:prompt_figures",
    Show("prompt_token_peaks", "per-token peak max|x| over the selected modules",
         ("position", "token_text", "max_abs", "layer", "role", "channel")),
    needs=("model",), prepare=f"{STATS}:prepare_prompt_job")


class MaxMedianOptions(ActivationOptions):
    pass


activation(
    "max-median", "QFeP max-to-median ratio of per-token scales (max|x| over features), per module and layer.",
    MaxMedianOptions, f"{STATS}:max_median_job", f"{PLOTS}:max_median_figures",
    Show("max_median_layers", "max-to-median ratio of token scales per layer",
         ("layer", "inputs", "tokens", "scale_max", "scale_median", "ratio")))


class NormsOptions(ActivationOptions):
    top_channels: int = option(5, "--top-channels", ge=1, help="Channels with the largest max|x| listed per module.")


activation(
    "norms", "Per input channel E[x²] (Wanda's norm) and max|x| (SmoothQuant's scale), and a per-module summary.",
    NormsOptions, f"{STATS}:norms_job", f"{PLOTS}:norms_figures",
    Show("norms_modules", "per-module channel scales",
         ("module", "tokens", "mean_sq_mean", "sqrt_mean_sq_max", "abs_max", "outlier_ratio", "top_channels")))


# -- quantization error and gradient sensitivities ----------------------------------------------

class Quantizer(Options):
    """One activation quantizer (LMAnalyser spellings --quant-bits / --quant-granularity accepted)."""

    bits: int = option(4, "--bits", "--quant-bits", ge=2, le=16, help="Integer width for --format int (2-16).")
    granularity: str = option(
        "per-token", "--granularity", "--quant-granularity", choices=("per-token", "per-tensor", "per-group"),
        help="per-token (a scale per token) | per-tensor (a scale per window's activation matrix) | "
             "per-group (a scale per --group-size features).")
    group_size: Optional[int] = option(None, "--group-size", ge=1,
                                       help="Features per scale for --granularity per-group (block size for nf4, default 64).")
    format: str = option("int", "--format",
                         help="int (width from --bits) | int2..int16 | fp8 (= fp8_e4m3) | fp8_e4m3 | fp8_e5m2 | nf4 | "
                              "fp4 | fp16 | bf16.")
    symmetric: bool = option(True, "--symmetric/--asymmetric",
                             help="Integer grid symmetric about zero, or min/max with a zero point.")

    def spec(self):
        from ..analyses.activation_quant import quant_spec

        return quant_spec(self.bits, self.format, self.granularity, self.group_size, self.symmetric)

    def check(self) -> None:
        self.spec()


class QuantErrorOptions(ActivationOptions, Quantizer):
    pass


activation(
    "quant-error", "MSE between each module's activation and its fake-quantized copy; per module, layer, role, model.",
    QuantErrorOptions, f"{QUANT}:quant_error_job", f"{QPLOTS}:quant_error_figures",
    Show("quant_error_summary", lambda o, r: f"activation quantization error ({o.spec().label})",
         ("scope", "layer", "role", "modules", "mse_mean", "mse_pooled", "rel_mse_pooled")),
    prepare=f"{QUANT}:prepare_quant_job")


class TopTokenErrorOptions(ActivationOptions, Quantizer):
    top_k: int = option(20, "--top-k", ge=1, help="Tokens listed per scope (model, each layer, each role).")
    min_count: int = option(1, "--min-count", ge=1, help="Only rank tokens that occur at least this many times.")


activation(
    "top-token-error", "Per-token quantization MSE by token id (mean, std, count, max); top-k tokens overall, per layer, "
    "per role.",
    TopTokenErrorOptions, f"{QUANT}:top_token_error_job", f"{QPLOTS}:top_token_error_figures",
    Show("top_token_error", lambda o, r: f"tokens with the largest quantization error ({o.spec().label})",
         ("rank", "token_id", "token", "occurrences", "count", "mean_mse", "std_mse", "max_mse"),
         where=lambda row: row.scope == "model"),
    prepare=f"{QUANT}:prepare_quant_job")


class GradientOptions(ActivationOptions):
    def check(self) -> None:
        from ..core.errors import LLMProbeError

        if self.site != "input":
            raise LLMProbeError(f"this is a gradient statistic of module inputs; use --site input (got {self.site})")


class FisherOptions(GradientOptions):
    pass


activation(
    "fisher", "Fisher information Σ(∂L/∂x)² of each module's input (next-token loss); mean and log-sum-exp over windows.",
    FisherOptions, f"{QUANT}:fisher_job", f"{QPLOTS}:fisher_figures",
    Show("fisher_summary", "activation Fisher information",
         ("scope", "layer", "role", "modules", "fisher_mean", "fisher_logsumexp")))


class FgmpOptions(GradientOptions):
    block_size: int = option(32, "--block-size", ge=1, help="Features per block; each block has its own scale in both formats.")
    low_format: str = option("int4", "--low-format",
                             help="Low-precision block format (int2..int16, fp4 = fp4_e2m1, fp8_e4m3, fp8_e5m2, nf4).")
    high_format: str = option("int8", "--high-format", help="High-precision block format (e.g. int8, fp8_e4m3).")
    keep_frac: float = option(0.1, "--keep-frac", ge=0, le=1,
                              help="Fraction of blocks (model-wide, most sensitive first) kept in the high format.")
    symmetric: bool = option(True, "--symmetric/--asymmetric",
                             help="Integer grid symmetric about zero, or min/max with a zero point.")

    def formats(self):
        from ..analyses.activation_quant import block_spec

        return (block_spec(self.low_format, self.block_size, "--low-format", self.symmetric),
                block_spec(self.high_format, self.block_size, "--high-format", self.symmetric))

    def check(self) -> None:
        super().check()
        self.formats()


activation(
    "fgmp", "FGMP sensitivity Σ g²·(Q_low(x) − Q_high(x))² per module and per feature block (arXiv 2504.14152).",
    FgmpOptions, f"{QUANT}:fgmp_job", f"{QPLOTS}:fgmp_figures",
    Show("fgmp_summary", lambda o, r: f"FGMP sensitivity ({o.formats()[0].fmt} vs {o.formats()[1].fmt}, "
                                      f"block {o.block_size})",
         ("scope", "layer", "role", "modules", "blocks", "sensitivity", "blocks_high", "high_frac", "high_share")),
    prepare=f"{QUANT}:prepare_fgmp_job")
