"""``llmprobe weights alpha-hill``: seed 001 (analyze_precision_alpha_hill.py) as a command.

Every option of the seed is here under its seed name (``--output-dir`` is an alias of ``--out``).
Options and the matrix selection are checked *before* the output directory is opened, so bad
input leaves nothing behind. Plots are written by default, as the seed always did; ``--no-plot``
skips them (the tables are the same either way).
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..analyses.alpha_hill import (
    DEFAULT_PRECISIONS,
    alpha_hill_analysis,
    check_fit,
    check_k_frac,
    check_load_dtype,
    check_spectrum_dtype,
    parse_precisions,
    resolve_device,
    select_matrices,
)
from ..core import progress
from ..core.errors import LLMProbeError
from ..core.weightsource import WeightSource, compile_regex
from .common import (
    DeviceOpt,
    JsonOpt,
    ModelOpt,
    OverwriteOpt,
    PlotFormatOpt,
    QuietOpt,
    RevisionOpt,
    TrustRemoteCodeOpt,
    check_plot_format,
    emit,
    emit_done,
    open_run,
    source_from,
)
from .weights import app

RESULTS_TABLE = "precision_alpha_hill_results"
SUMMARY_TABLE = "precision_summary_statistics"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (the CLI runs in-process in tests and
    notebooks, where stderr is swapped between runs)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def configure_logging(level_name: str, quiet: bool) -> None:
    """``--log-level`` for llmprobe's own loggers (one stderr handler, installed once).
    ``--quiet`` raises the level to at least WARNING, like it silences progress bars."""
    level_name = level_name.upper()
    if level_name not in LOG_LEVELS:
        raise LLMProbeError(f"unknown --log-level '{level_name}'; use one of {', '.join(LOG_LEVELS)}")
    level = getattr(logging, level_name)
    if quiet:
        level = max(level, logging.WARNING)
    root = logging.getLogger("llmprobe")
    root.setLevel(level)
    if not any(isinstance(handler, _CurrentStderrHandler) for handler in root.handlers):
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)


@app.command("alpha-hill")
def alpha_hill_command(
    model: ModelOpt = None,
    precisions: Annotated[str, typer.Option(
        "--precisions", help="Comma list of formats the weight is put through: fp64, fp32, fp16, bf16, "
        "fp8_e4m3, fp8_e5m2, int8, int4 (any int2…int16, per output channel), nf4.")] = ",".join(DEFAULT_PRECISIONS),
    k_frac: Annotated[float, typer.Option(
        "--k-frac", help="Alpha-Hill uses the top k = max(10, ⌊k_frac·n⌋) eigenvalues; in (0, 1).")] = 0.1,
    filter_layers: Annotated[str | None, typer.Option(
        "--filter-layers", "--filter", help="Regex (re.search) on weight names; picks any 2-D weight. "
        "Default: every 2-D weight inside the decoder blocks (no embeddings / lm_head).")] = None,
    fit: Annotated[str, typer.Option(
        "--fit", help="hill: Alpha-Hill; powerlaw: Clauset MLE with xmin by KS distance (WeightWatcher's "
        "alpha), Hill kept as alpha_hill_<p>.")] = "hill",
    device: DeviceOpt = "auto",
    load_dtype: Annotated[str, typer.Option(
        "--load-dtype", help="fp32|fp16|bf16: every weight is first cast to this (as the seed's model load).")]
    = "fp32",
    spectrum_dtype: Annotated[str, typer.Option(
        "--spectrum-dtype", help="Arithmetic of the spectra: auto (fp64 when comparing 2+ precisions, whose "
        "differences are below fp32 noise, or with --fit powerlaw; fp32 for a single precision with Hill), "
        "fp64, or fp32 (fastest). The fp64 precision is always computed in fp64.")] = "auto",
    plot: Annotated[bool, typer.Option("--plot/--no-plot", help="Write the figures under plots/ (default on).")]
    = True,
    plot_format: PlotFormatOpt = "png",
    max_layers_per_plot: Annotated[int, typer.Option(
        "--max-layers-per-plot", help="Matrices per combined_batch figure; 0 puts all in one.")] = 10,
    log_level: Annotated[str, typer.Option(
        "--log-level", help="DEBUG|INFO|WARNING|ERROR|CRITICAL (DEBUG logs every matrix's alphas).")] = "INFO",
    revision: RevisionOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", "--output-dir", help="Output directory (default: results/<model>/weights-alpha-hill/).")]
    = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Alpha-Hill (or a power-law fit) of every weight matrix at several precisions (seed 001)."""
    chosen = parse_precisions(precisions)
    check_k_frac(k_frac)
    check_fit(fit)
    check_load_dtype(load_dtype)
    check_spectrum_dtype(spectrum_dtype)
    check_plot_format(plot_format)
    if max_layers_per_plot < 0:
        raise LLMProbeError(f"--max-layers-per-plot must be >= 0 (0 = all in one figure); got {max_layers_per_plot}")
    compile_regex(filter_layers)
    target = resolve_device(device)
    configure_logging(log_level, quiet)
    if quiet:
        progress.set_quiet(True)

    source = source_from(model, revision, trust_remote_code)
    ws = WeightSource.open(source)
    plans = select_matrices(ws, filter_layers)  # an empty selection fails here, before any output
    with open_run("weights", "alpha-hill", source, out, overwrite, quiet=quiet, precisions=chosen, k_frac=k_frac,
                  fit=fit, filter_layers=filter_layers, load_dtype=load_dtype, spectrum_dtype=spectrum_dtype,
                  device=str(target), matrices=len(plans), weight_source=ws.kind) as run:
        rows, summary = alpha_hill_analysis(ws, chosen, k_frac=k_frac, regex=filter_layers, device=target,
                                            load_dtype=load_dtype, fit=fit, spectrum_dtype=spectrum_dtype)
        run.write_table(RESULTS_TABLE, rows)
        run.write_table(SUMMARY_TABLE, summary)
        flagged = {status: sum(row.status == status for row in rows) for status in ("non_finite", "nan_alpha")}
        run.update(flagged_matrices={k: v for k, v in flagged.items() if v})
        if plot:
            write_plots(run, [row.row() for row in rows], chosen, fmt=plot_format,
                        max_layers_per_plot=max_layers_per_plot, fit=fit)
    emit(rows if json_out else summary, as_json=json_out,
         title=f"alpha ({fit}) by precision over {len(rows)} matrices")
    if flagged["non_finite"] and not json_out:
        progress.info(f"[yellow]{flagged['non_finite']} matrices hold NaN/Inf: status non_finite, alphas NaN[/]")
    emit_done(run, json_out)


def write_plots(run, rows: list[dict], precisions: list[str], *, fmt: str, max_layers_per_plot: int,
                fit: str) -> None:
    """Seed 001's figure set under ``plots/``, plus alpha against depth per category."""
    from ..plots import alpha_hill as figures

    label = "Alpha-Hill" if fit == "hill" else "alpha (power-law fit)"
    run.save_figure(figures.alpha_distribution_figure(rows, precisions, label),
                    "plots/alpha_distribution_by_precision", fmt=fmt)
    for category, figure in figures.category_figures(rows, precisions, label):
        run.save_figure(figure, f"plots/category_{_file_part(category)}", fmt=fmt)
    for number, figure in figures.combined_batch_figures(rows, precisions, label, max_layers_per_plot):
        run.save_figure(figure, f"plots/combined_batch_{number}", fmt=fmt)
    for category, figure in figures.alpha_vs_depth_figures(rows, precisions, label):
        run.save_figure(figure, f"plots/alpha_vs_depth_{_file_part(category)}", fmt=fmt)
    numbered = progress.track(figures.individual_layer_figures(rows, precisions, label), "per-layer plots",
                              total=len(rows))
    for (number, figure), row in zip(numbered, rows):
        # Hundreds of per-layer figures share one fixed layout: skip the tight bounding box (a
        # second full draw) and keep the figure open for the next matrix.
        run.save_figure(figure, f"plots/individual_layers/layer_{number:03d}_{_file_part(row['layer_name'])}",
                        fmt, dpi=90, tight=False, close=False)


def _file_part(name: str) -> str:
    """``model.layers.0.self_attn.q_proj.weight`` -> ``model_layers_0_self_attn_q_proj`` (seed 001)."""
    return re.sub(r"[^A-Za-z0-9]+", "_", str(name).removesuffix(".weight")).strip("_") or "matrix"
