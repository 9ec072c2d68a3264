"""`llmprobe quant`: mixed-precision weight plans from measured sensitivity, and their check."""

from __future__ import annotations

from typing import Optional

from ..core.errors import LLMProbeError
from ..options import (
    DATA,
    CalibrationOptions,
    DeviceMapOptions,
    FigureOptions,
    OutputOptions,
    SelectionOptions,
    option,
)
from ..registry import Analysis, Show, register, register_group

register_group("quant", "Weight quantization plans: per-module formats under a bit budget, checked by fake quantization.")

QP = "llmprobe.analyses.quant_plan"
PLOTS = "llmprobe.plots.quant"
METRICS = ("output", "kl", "delta-loss", "fgmp", "alpha", "kurtosis")


class PlanOptions(DeviceMapOptions, CalibrationOptions, SelectionOptions, OutputOptions, FigureOptions):
    avg_bits: str = option(..., "--avg-bits", help="Budget: average bits per parameter over the selected modules, "
                                                   "group scales included (exact decimal).")
    candidates: str = option("2,3,4,5,6,8", "--candidates",
                             help="Candidate formats, comma-separated: N = intN, or nf4, fp4_e2m1, fp8_e4m3, fp16...")
    group_size: int = option(128, "--group-size", ge=0,
                             help="Elements per scale along the input dimension; 0 = per output channel.")
    symmetric: bool = option(True, "--symmetric/--asymmetric", help="Integer grids symmetric or asymmetric.")
    metric: str = option("kl", "--metric", choices=METRICS,
                         help="Sensitivity: output (E||(W-Q(W))x||^2), kl (measured next-token KL, one module at a time), "
                              "delta-loss, fgmp, alpha, kurtosis.")
    fisher_weighted: bool = option(False, "--fisher-weighted",
                                   help="Weight the output error by the diagonal output Fisher (metric output).")
    keep: Optional[list[str]] = option(None, "--keep", help="REGEX=FORMAT: pin matching modules; repeatable.")
    solver: str = option("auto", "--solver", choices=("auto", "dp", "lagrangian"),
                         help="Knapsack solver: exact DP, Lagrangian+greedy, or auto (exact when small).")
    layers_per_pass: int = option(0, "--layers-per-pass", ge=0,
                                  help="Collect input second moments N layers per pass (memory); 0 = all at once.")
    batch_size: int = option(1, "--batch-size", ge=1, help="Calibration windows per forward pass.")
    measure_windows: int = option(4, "--measure-windows", ge=0,
                                  help="Metrics kl and delta-loss: measure on the first N calibration windows "
                                       "(one partial forward per module and format); 0 = all.")

    def check(self) -> None:
        _positive_number(self.avg_bits, "--avg-bits")
        _formats(self.candidates)
        from ..analyses.quant_plan import parse_keep

        parse_keep(self.keep or ())
        if self.fisher_weighted and self.metric != "output":
            raise LLMProbeError("--fisher-weighted applies to --metric output only")


def _positive_number(text, flag: str) -> None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise LLMProbeError(f"{flag} must be a number; got {text!r}") from None
    if not value > 0:
        raise LLMProbeError(f"{flag} must be positive; got {text}")


def _formats(candidates: str) -> None:
    from ..analyses.quant_plan import parse_candidates

    parse_candidates(candidates)


def _plan_title(options, result) -> str:
    s = result["quant_plan_summary"][0]
    return f"plan: {s.plan_avg_bits:.4f} bits/param (budget {s.budget_avg_bits:g}), metric {s.metric}"


register(Analysis(
    name="quant.plan",
    help="Per-module weight formats minimising the summed sensitivity under an average-bit budget; "
         "JSON plan, table and an llm-compressor recipe.",
    options=PlanOptions,
    needs=("calibration",),
    compute=f"{QP}:plan_job",
    figures=f"{PLOTS}:plan_result_figures",
    summary=(Show("quant_plan_summary", _plan_title,
                  ("modules", "plan_avg_bits", "total_sensitivity", "solver", "formats")),),
    json_table="quant_plan",
))


class EvalOptions(DeviceMapOptions, SelectionOptions, OutputOptions, FigureOptions):
    plan: Optional[str] = option(None, "--plan", help="quant_plan.json written by 'quant plan'.")
    uniform: Optional[str] = option(None, "--uniform", help="Every selected module in this format (4 = int4).")
    random: bool = option(False, "--random", help="A random plan of --avg-bits (seed --seed).")
    avg_bits: Optional[str] = option(None, "--avg-bits", help="Budget of --random.")
    seed: int = option(0, "--seed", help="Seed of --random.")
    candidates: str = option("2,3,4,5,6,8", "--candidates", help="Formats of --random.")
    group_size: int = option(128, "--group-size", ge=0, help="For --uniform/--random (a plan carries its own).")
    symmetric: bool = option(True, "--symmetric/--asymmetric", help="For --uniform/--random.")
    sweep: bool = option(False, "--sweep", help="With --plan: plan, uniform and random plans at several budgets.")
    budgets: Optional[str] = option(None, "--budgets", help="Sweep budgets, e.g. 2.75,3.25,3.75.")
    seeds: str = option("0,1,2,3,4", "--seeds", help="Random plans per sweep budget.")
    dataset: str = option("wikitext2", "--dataset", panel=DATA, help="Evaluation text (wikitext2 test | c4 | a path).")
    seqlen: int = option(512, "--seqlen", panel=DATA, ge=2, help="Window length in tokens.")
    max_windows: Optional[int] = option(None, "--max-windows", panel=DATA, ge=1, help="Evaluate on N windows only.")
    batch_size: int = option(1, "--batch-size", ge=1, help="Windows per forward pass.")
    reference_cache_mb: float = option(1024.0, "--reference-cache-mb", ge=0,
                                       help="Unquantized logits kept between plans (MiB); beyond, recomputed.")

    def check(self) -> None:
        chosen = [flag for flag, on in (("--plan", self.plan is not None), ("--uniform", self.uniform is not None),
                                        ("--random", self.random)) if on]
        if len(chosen) != 1:
            raise LLMProbeError("give exactly one of --plan PATH, --uniform FORMAT or --random"
                                + (f" (got {' and '.join(chosen)})" if chosen else ""))
        if self.sweep and self.plan is None:
            raise LLMProbeError("--sweep needs --plan (a plan file from 'quant plan')")
        if self.budgets and not self.sweep:
            raise LLMProbeError("--budgets only applies with --sweep")
        from ..analyses.quant_plan import parse_budgets, parse_candidate

        parse_budgets(self.budgets)
        if self.uniform is not None:
            parse_candidate(self.uniform, option="--uniform")
        if self.random:
            if self.avg_bits is None:
                raise LLMProbeError("--random needs --avg-bits")
            _positive_number(self.avg_bits, "--avg-bits")
            _formats(self.candidates)
        try:
            [int(s) for s in str(self.seeds).split(",") if s.strip()]
        except ValueError:
            raise LLMProbeError(f"--seeds must be comma-separated integers; got {self.seeds!r}") from None


register(Analysis(
    name="quant.eval",
    help="Apply a plan (or --uniform / --random) as fake quantization: perplexity and KL against the "
         "unquantized model; --sweep for a curve against average bits.",
    options=EvalOptions,
    needs=("evaluation", "model"),
    compute=f"{QP}:eval_job",
    figures=f"{PLOTS}:eval_result_figures",
    summary=(Show("quant_eval", "quantized vs unquantized",
                  ("label", "avg_bits", "ppl", "base_ppl", "delta_ppl", "kl_mean", "top1_agreement")),
             Show("quant_sweep", "sweep",
                  ("label", "kind", "budget_avg_bits", "avg_bits", "ppl", "kl_mean"), limit=80)),
))
