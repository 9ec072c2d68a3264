"""`llmprobe report`: the main job — measure a model with many analyses in one session and build
one report (HTML + Markdown) from their result folders."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..options import DATA, DATASET_HELP, OUTPUT, DeviceMapOptions, Options, OutputOptions, option
from ..registry import Analysis, register, register_group

register_group("report", "Reports: measure a model in one command, build HTML + Markdown from result folders, "
                         "compare two runs.")

PROFILES = ("quick", "standard", "full")


class ReportRunOptions(DeviceMapOptions, OutputOptions):
    profile: str = option("standard", "--profile", choices=PROFILES,
                          help="quick: perplexity, weights (alpha-hill, stats), activation outliers, super weights; "
                               "standard: + spectrum, quantization error, channel norms, block influence, layer "
                               "census; full: + Fisher/FGMP, per-layer ablation, noise, embedding clusters.")
    only: Optional[list[str]] = option(None, "--only",
                                       help="Run only these analyses of the profile (e.g. activations.kurtosis); "
                                            "repeatable.")
    skip: Optional[list[str]] = option(None, "--skip", help="Leave these analyses out; repeatable.")
    set: Optional[list[str]] = option(
        None, "--set",
        help="Any option of an underlying analysis: ANALYSIS.OPTION=VALUE, e.g. "
             "--set weights.alpha-hill.precisions=fp32,int8; repeatable.")
    dataset: str = option("wikitext2", "--dataset", panel=DATA, help=DATASET_HELP)
    nsamples: int = option(16, "--nsamples", panel=DATA, ge=1, help="Calibration windows of the activation analyses.")
    seqlen: int = option(256, "--seqlen", panel=DATA, ge=2, help="Tokens per calibration window.")
    seed: int = option(0, "--seed", panel=DATA, help="Seed for the calibration window offsets.")
    eval_seqlen: int = option(512, "--eval-seqlen", panel=DATA, ge=2,
                              help="Tokens per evaluation window (perplexity and robustness readouts).")
    max_windows: int = option(16, "--max-windows", panel=DATA, ge=1, help="Evaluation windows.")
    title: Optional[str] = option(None, "--title", help="Title of the report page (default: the model's name).")

    def check(self) -> None:
        from ..analyses.report_run import plan

        plan(self)  # unknown names in --only/--skip/--set fail before anything is loaded


register(Analysis(
    name="report.run",
    help="Measure a model with a profile of analyses in one session and build its report (HTML + Markdown).",
    options=ReportRunOptions,
    needs=("source",),
    prepare="llmprobe.analyses.report_run:prepare_job",
    compute="llmprobe.analyses.report_run:report_run_job",
    printer="llmprobe.analyses.report_run:print_summary",
    json_table="report_runs",
))


class ReportBuildOptions(Options):
    dirs: list[Path] = option(..., "DIRS...", argument=True,
                              help="Report folders (made by report run) or result folders of single commands.")
    into: Optional[Path] = option(None, "--out", "-o", panel=OUTPUT,
                                  help="Where report.html, report.md and report_figures/ go (default: the first DIR).")
    title: Optional[str] = option(None, "--title", help="Title of the page (default: 'llmprobe report: <model>').")
    max_extra_figures: Optional[int] = option(None, "--max-extra-figures", ge=0,
                                              help="Further figures per section behind a fold (default 8).")
    quiet: bool = option(False, "--quiet", "-q", panel=OUTPUT, help="No progress bars or status lines.")


register(Analysis(
    name="report.build",
    help="Build one self-contained HTML page (and the same as Markdown) from result folders.",
    options=ReportBuildOptions,
    compute="llmprobe.report.commands:build_job",
    printer="llmprobe.report.commands:print_built",
    writes_by_default=False,
))


class ReportDiffOptions(Options):
    a: Path = option(..., "A", argument=True, help="The first run: a report folder or a result folder.")
    b: Path = option(..., "B", argument=True, help="The second run, compared with the first.")
    into: Optional[Path] = option(None, "--out", "-o", panel=OUTPUT,
                                  help="Where diff.html, diff.md and diff_figures/ go "
                                       "(default: results/diff--<A>--vs--<B>).")
    labels: Optional[str] = option(None, "--labels", help="Names of the two runs, 'A,B' (default: the folder names).")
    title: Optional[str] = option(None, "--title", help="Title of the page.")
    quiet: bool = option(False, "--quiet", "-q", panel=OUTPUT, help="No progress bars or status lines.")

    def check(self) -> None:
        from ..core.errors import LLMProbeError

        if self.labels is not None and len(self.labels.split(",")) != 2:
            raise LLMProbeError(f"--labels '{self.labels}' must be two names separated by a comma, e.g. base,pruned")


register(Analysis(
    name="report.diff",
    help="Compare two runs (base vs pruned or quantized, or two models): per-layer deltas, largest first.",
    options=ReportDiffOptions,
    compute="llmprobe.report.commands:diff_job",
    printer="llmprobe.report.commands:print_built",
    writes_by_default=False,
))
