"""`llmprobe robustness`: modify weights or inputs, read out ppl / KL / top-1 against the
unmodified model on evaluation windows (docs/robustness.md)."""

from __future__ import annotations

import math
from typing import Optional

from pydantic import field_validator

from ..core.errors import LLMProbeError
from ..options import DATA, EvaluationOptions, FigureOptions, OutputOptions, RuntimeOptions, SelectionOptions, option
from ..registry import Analysis, Show, register, register_group

register_group("robustness",
               "Robustness: ablation, weight noise, bit flips, super weights and adversarial inputs, "
               "read out as ppl / KL against the unmodified model.")

JOBS = "llmprobe.analyses.robustness.jobs"
PLOTS = "llmprobe.plots.robustness"
READOUT = ("loss", "delta_ppl", "ppl_ratio", "kl", "top1_agreement", "finite")


def _split_list(value):
    """'0.1,0.2' (CLI) or ['0.1,0.2', '0.5'] (repeated flag) or a list of numbers -> flat list."""
    if value is None:
        return None
    if isinstance(value, (str, int, float)):
        value = [value]
    items = []
    for item in value:
        if isinstance(item, str):
            items.extend(part for part in item.replace(" ", "").split(",") if part)
        else:
            items.append(item)
    return items


class RobustnessData(EvaluationOptions):
    """Evaluation windows (GPTQ protocol) with robustness defaults: 8 windows of 512 tokens."""

    seqlen: int = option(512, "--seqlen", panel=DATA, ge=2, help="Window length in tokens.")
    max_windows: int = option(8, "--max-windows", panel=DATA, ge=1, help="Evaluation windows used.")
    no_prefix_cache: bool = option(False, "--no-prefix-cache", panel=DATA,
                                   help="Run the whole model for every target (no reuse of the unmodified "
                                        "hidden states before the first modified block).")
    cache_budget_mb: float = option(4096.0, "--cache-budget-mb", panel=DATA, gt=0,
                                    help="Memory allowed for the cached block inputs; above it every target "
                                         "runs the whole model.")


class RobustnessOptions(RuntimeOptions, RobustnessData, SelectionOptions, OutputOptions, FigureOptions):
    """Options shared by every weight-modifying robustness command."""


# -- ablation --------------------------------------------------------------------------------


class AblationOptions(RobustnessOptions):
    mode: str = option("zero", "--mode", choices=("zero", "mean"),
                       help="zero: weights set to 0; mean: every entry set to the mean of that matrix's weights.")
    granularity: str = option("matrix", "--granularity", choices=("matrix", "layer", "block"),
                              help="matrix: one linear matrix; layer: one block's attn or mlp matrices together; "
                                   "block: skip the whole decoder block (input passes through the residual).")
    span: int = option(1, "--span", ge=1, help="n of the angular distance between block l's input and block l+n's.")

    def check(self) -> None:
        if self.granularity == "block" and self.mode != "zero":
            raise LLMProbeError("--mode mean does not apply to --granularity block (a block is skipped: its input "
                                "passes through the residual)")


register(Analysis(
    name="robustness.ablation",
    help="Ablate one matrix / layer role group / block at a time; rank by Δppl with KL; Block Influence and "
         "angular distance from one pass, with their Spearman agreement with block-ablation Δppl.",
    options=AblationOptions,
    needs=("evaluation", "model"),
    prepare=f"{JOBS}:prepare_job",
    compute=f"{JOBS}:ablation_job",
    figures=f"{PLOTS}:ablation_figures_job",
    summary=(Show("reference", "unmodified model", ("windows", "seqlen", "tokens", "ppl", "prefix_cache",
                                                     "reference_logits")),
             Show("ablation", "ablation ranking (top 15 by Δppl)",
                  ("rank", "target", "role", "layer") + READOUT, limit=15),
             Show("similarity_agreement", "one-pass block metrics vs measured block Δppl (Spearman)",
                  ("metric", "span", "blocks", "spearman_delta_ppl", "spearman_kl"))),
))


# -- noise -----------------------------------------------------------------------------------


class NoiseOptions(RobustnessOptions):
    sigmas: list[float] = option([0.01, 0.05, 0.1, 0.2], "--sigmas",
                                 help="Noise scales, comma-separated or repeated (relative: σ·std(W)).")
    distribution: str = option("gaussian", "--distribution", choices=("gaussian", "uniform"),
                               help="gaussian N(0,1) or uniform U(-√3,√3) (same std), times the scale.")
    absolute: bool = option(False, "--absolute", help="Scale is σ itself, not σ·std(W).")
    per_target: bool = option(False, "--per-target", help="Perturb each chosen matrix alone (default: all at once).")
    repeats: int = option(3, "--repeats", ge=1, help="Seeds per σ (seed, seed+1, ...): mean and std reported.")
    seed: int = option(0, "--seed", ge=0, help="First noise seed.")

    _split = field_validator("sigmas", mode="before")(lambda cls, v: _split_list(v))

    def check(self) -> None:
        if not self.sigmas:
            raise LLMProbeError("--sigmas needs at least one value")
        for sigma in self.sigmas:
            if not math.isfinite(sigma) or sigma < 0:
                raise LLMProbeError(f"--sigmas values must be finite and >= 0; got {sigma}")


register(Analysis(
    name="robustness.noise",
    help="Gaussian or uniform weight noise over a σ sweep (relative to each matrix's std, or absolute); "
         "ppl and KL curves over seeded repeats.",
    options=NoiseOptions,
    needs=("evaluation", "model"),
    prepare=f"{JOBS}:prepare_job",
    compute=f"{JOBS}:noise_job",
    figures=f"{PLOTS}:noise_figures_job",
    summary=(Show("noise_summary", "noise sweep (mean over repeats)",
                  ("sigma", "target", "repeats", "ppl_mean", "ppl_std", "delta_ppl_mean", "kl_mean",
                   "top1_agreement_mean", "nonfinite_runs")),),
))


# -- bit flips -------------------------------------------------------------------------------


class BitFlipOptions(RobustnessOptions):
    target: Optional[str] = option(None, "--target", help="Module whose weight to flip (with --index); default: random weights.")
    index: Optional[list[str]] = option(None, "--index", help="ROW,COL of the [out, in] matrix; repeatable.")
    bits: Optional[list[int]] = option(None, "--bits", help="Bit positions (0 = least significant), comma-separated; "
                                                            "default: every position of the stored dtype.")
    count: int = option(4, "--count", ge=1, help="Random weights per bit position (without --target).")
    seed: int = option(0, "--seed", ge=0, help="Seed of the random draw of weights.")

    _split = field_validator("bits", mode="before")(lambda cls, v: _split_list(v))

    def check(self) -> None:
        if (self.target is None) != (self.index is None):
            raise LLMProbeError("--target and --index go together (or give neither for random weights)")
        for bit in self.bits or []:
            if bit < 0 or bit > 63:
                raise LLMProbeError(f"--bits value {bit} is not a bit position")
        for item in self.index or []:
            parts = str(item).replace(" ", "").split(",")
            if len(parts) != 2 or not all(p.lstrip("-").isdigit() for p in parts):
                raise LLMProbeError(f"--index must be ROW,COL (two integers); got '{item}'")


register(Analysis(
    name="robustness.bit-flip",
    help="Flip bit b (sign / exponent / mantissa of the stored dtype) of given or random weights; Δloss per "
         "flip and its distribution per bit position.",
    options=BitFlipOptions,
    needs=("evaluation", "model"),
    prepare=f"{JOBS}:prepare_job",
    compute=f"{JOBS}:bit_flip_job",
    figures=f"{PLOTS}:bit_flip_figures_job",
    summary=(Show("bit_positions", "Δloss per bit position",
                  ("bit", "bit_role", "dtype", "flips", "nonfinite", "delta_loss_median", "delta_loss_max",
                   "kl_median")),),
))


# -- super weights ---------------------------------------------------------------------------


class SuperWeightOptions(RuntimeOptions, RobustnessData, OutputOptions, FigureOptions):
    text: str = option("Apple Inc. is a worldwide tech company.", "--text",
                       help="Prompt the spikes are searched on (the paper's default).")
    detect_on_windows: bool = option(False, "--detect-on-windows",
                                     help="Search on the evaluation windows instead of --text.")
    threshold: float = option(50.0, "--threshold", gt=0, help="Spike: max|x| of input and output above this.")
    relative: Optional[float] = option(None, "--relative", gt=1,
                                       help="Instead: above R × the median over layers of that side's max|x|.")
    max_iterations: int = option(5, "--max-iterations", ge=1, help="Searches (zero what was found, search again).")
    outlier_fraction: float = option(5e-7, "--outlier-fraction", ge=0, lt=1,
                                     help="Largest-|w| fraction of each 2-D weight zeroed in the control runs.")


register(Analysis(
    name="robustness.super-weights",
    help="Super weights (arXiv 2411.07191): down-projection input/output spikes give W_down[row, col]; "
         "ppl/KL with each zeroed, all zeroed, and the paper's outlier control.",
    options=SuperWeightOptions,
    needs=("evaluation", "model"),
    prepare=f"{JOBS}:prepare_job",
    compute=f"{JOBS}:super_weights_job",
    figures=f"{PLOTS}:super_weight_figures_job",
    summary=(Show("super_weights", "super weights",
                  ("iteration", "layer", "weight_row", "weight_col", "value", "input_spike", "output_spike",
                   "token", "delta_ppl", "kl")),
             Show("super_weight_checks", "zeroing groups of weights",
                  ("condition", "weights_zeroed", "ppl", "delta_ppl", "kl", "top1_agreement"))),
))


# -- adversarial -----------------------------------------------------------------------------


class AdversarialOptions(RuntimeOptions, RobustnessData, OutputOptions, FigureOptions):
    text: Optional[str] = option(None, "--text", help="Attack this text (default: the evaluation windows).")
    attacks: list[str] = option(["random", "hotflip", "chars", "fgsm", "pgd"], "--attacks",
                                choices=("random", "hotflip", "chars", "fgsm", "pgd"),
                                help="Attacks to run, comma-separated or repeated.")
    budgets: list[int] = option([1, 4], "--budgets", help="Tokens swapped by random / hotflip.")
    rates: list[float] = option([0.02, 0.1], "--rates", help="Character edit rates.")
    eps: list[float] = option([0.05, 0.2], "--eps", help="FGSM / PGD radius relative to each token embedding's norm.")
    pgd_steps: int = option(10, "--pgd-steps", ge=1, help="PGD steps.")
    repeats: int = option(3, "--repeats", ge=1, help="Seeds for the random attacks (random, chars).")
    seed: int = option(0, "--seed", ge=0, help="First seed.")

    _split = field_validator("attacks", "budgets", "rates", "eps", mode="before")(lambda cls, v: _split_list(v))

    def check(self) -> None:
        if not self.attacks:
            raise LLMProbeError("--attacks needs at least one attack")
        for budget in self.budgets:
            if budget < 1:
                raise LLMProbeError(f"--budgets are token counts >= 1; got {budget}")
        for rate in self.rates:
            if not 0 < rate <= 1:
                raise LLMProbeError(f"--rates must be in (0, 1]; got {rate}")
        for eps in self.eps:
            if not (math.isfinite(eps) and eps > 0):
                raise LLMProbeError(f"--eps values must be positive; got {eps}")


register(Analysis(
    name="robustness.adversarial",
    help="Input attacks on the real next-token loss: random and HotFlip token swaps, character edits, "
         "embedding FGSM/PGD; Δloss, KL and greedy agreement per attack and budget.",
    options=AdversarialOptions,
    needs=("model",),   # the evaluation windows are opened by the job, only without --text
    prepare=f"{JOBS}:prepare_job",
    compute=f"{JOBS}:adversarial_job",
    figures=f"{PLOTS}:adversarial_figures_job",
    summary=(Show("adversarial_summary", "attacks",
                  ("attack", "budget", "unit", "runs", "delta_loss_mean", "kl_mean", "kl_final_mean",
                   "top1_mean", "top1_final_mean", "nonfinite_runs")),),
))
