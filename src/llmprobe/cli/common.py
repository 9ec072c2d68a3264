"""Options and plumbing shared by every command: one definition of each common option, one
way to open a run's output directory, one way to show records on the terminal."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from ..core import progress
from ..core.errors import LLMProbeError
from ..core.loading import ModelSource, resolve_source
from ..core.output import RunOutput, default_out_dir, dumps_json
from ..core.records import Record

stdout_console = Console(soft_wrap=False)

# -- model ----------------------------------------------------------------------------------
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="Hub id, local HF directory, or .gguf file. Default: the embedded SmolLM2-135M.")]
RevisionOpt = Annotated[Optional[str], typer.Option("--revision", help="Hub revision (branch, tag or commit).")]
TrustRemoteCodeOpt = Annotated[bool, typer.Option(
    "--trust-remote-code", help="Allow the model repository's own Python code to run (off by default).")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto|fp32|fp16|bf16 (auto: fp32 on CPU).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto|cpu|cuda|cuda:N.")]
DeviceMapOpt = Annotated[Optional[str], typer.Option(
    "--device-map", help="'auto' spreads a model too large for one GPU over several (accelerate).")]

# -- output ---------------------------------------------------------------------------------
OutOpt = Annotated[Optional[Path], typer.Option(
    "--out", "-o", help="Output directory (default: results/<model>/<group>-<command>/).")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output directory.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the records as JSON on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or status lines.")]
PlotOpt = Annotated[bool, typer.Option("--plot", "--plot-results", help="Write figures next to the tables.")]
PlotFormatOpt = Annotated[str, typer.Option("--plot-format", help="png|pdf|svg.")]

# -- data -----------------------------------------------------------------------------------
DatasetOpt = Annotated[str, typer.Option(
    "--dataset", "--calib-dataset", help="wikitext2 | c4 | a path (.txt, .jsonl, .json, .parquet, wiki.*.raw).")]
NSamplesOpt = Annotated[int, typer.Option("--nsamples", "--calib-samples", help="Calibration windows.")]
SeqlenOpt = Annotated[int, typer.Option("--seqlen", help="Tokens per window.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for the random window offsets.")]

PLOT_FORMATS = ("png", "pdf", "svg")


def check_plot_format(fmt: str) -> str:
    if fmt not in PLOT_FORMATS:
        raise LLMProbeError(f"unknown --plot-format '{fmt}'; use one of {', '.join(PLOT_FORMATS)}")
    return fmt


def check_range(name: str, value: float | int | None, *, low=None, high=None, low_open=False,
                high_open=False) -> None:
    """One wording for every out-of-range option."""
    if value is None:
        return
    bad = ((low is not None and (value <= low if low_open else value < low))
           or (high is not None and (value >= high if high_open else value > high)))
    if bad:
        lo = "" if low is None else ("(" if low_open else "[") + str(low)
        hi = "" if high is None else str(high) + (")" if high_open else "]")
        raise LLMProbeError(f"{name} must be in {lo or '(-inf'}, {hi or 'inf)'}; got {value}")


def source_from(model: str | None, revision: str | None = None, trust_remote_code: bool = False) -> ModelSource:
    return resolve_source(model, revision=revision, trust_remote_code=trust_remote_code)


def open_run(group: str, command: str, source: ModelSource, out: Path | None, overwrite: bool,
             quiet: bool = False, **manifest: Any) -> RunOutput:
    """Start a run: pick the output directory, refuse to clobber, seed the manifest."""
    if quiet:
        progress.set_quiet(True)
    out_dir = out if out is not None else default_out_dir(source.slug, group, command)
    run = RunOutput(out_dir, command=f"{group} {command}", overwrite=overwrite)
    run.manifest.update(model=source.manifest(), **manifest)
    return run


def emit(records: Sequence[Record], *, as_json: bool, title: str, columns: Sequence[str] | None = None,
         limit: int = 40) -> None:
    """Show results: JSON records on stdout with --json, else a summary table."""
    if as_json:
        sys.stdout.write(dumps_json([r.row() for r in records]))
        return
    if not records:
        stdout_console.print(f"[bold]{title}[/]: no rows")
        return
    rows = [r.row() for r in records]
    cols = list(columns) if columns else list(rows[0])
    table = Table(title=title, show_lines=False, header_style="bold")
    for col in cols:
        table.add_column(col, overflow="fold")
    for row in rows[:limit]:
        table.add_row(*(_fmt(row.get(c)) for c in cols))
    stdout_console.print(table)
    if len(rows) > limit:
        stdout_console.print(f"... {len(rows) - limit} more rows in the output files")


def emit_done(run: RunOutput, as_json: bool) -> None:
    if not as_json:
        progress.info(f"[green]wrote[/] {run.dir}")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)[:60]
    return "" if value is None else str(value)
