"""`llmprobe weights stats | spectrum | bops`: per-tensor tables streamed from the weight source.

Options are checked and the tensor selection resolved *before* the output directory is opened,
so a typo in --filter or an out-of-range option leaves nothing behind.
"""

from __future__ import annotations

from typing import Annotated

import typer

from ..analyses.weight_tables import (
    bops,
    bops_summary,
    check_bits,
    check_block_size,
    check_device,
    check_energy,
    check_rank_rtol,
    check_zero_tol,
    seed_matrix_rows,
    select_tensors,
    weight_spectrum,
    weight_stats,
)
from ..core import progress
from ..core.weightsource import WeightSource
from .common import (
    DeviceOpt,
    JsonOpt,
    ModelOpt,
    OutOpt,
    OverwriteOpt,
    PlotFormatOpt,
    PlotOpt,
    QuietOpt,
    RevisionOpt,
    TrustRemoteCodeOpt,
    check_plot_format,
    emit,
    emit_done,
    open_run,
    source_from,
    stdout_console,
)
from .weights import app

FilterOpt = Annotated[str | None, typer.Option(
    "--filter", "--filter-layers", help="Regex (re.search) on tensor names; default: every tensor.")]
ZeroTolOpt = Annotated[float, typer.Option("--zero-tol", help="|w| <= this counts as zero for sparsity.")]


def _source_manifest(ws: WeightSource) -> dict:
    return {"weight_source": ws.kind, "bytes_on_disk": ws.bytes_on_disk()}


@app.command("stats")
def stats_command(
    model: ModelOpt = None,
    filter_regex: FilterOpt = None,
    zero_tol: ZeroTolOpt = 1e-8,
    revision: RevisionOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    plot: PlotOpt = False,
    plot_format: PlotFormatOpt = "png",
) -> None:
    """Per-tensor statistics in fp64: mean, std, min/max, abs-max, sparsity, kurtosis, NaN/Inf counts."""
    check_zero_tol(zero_tol)
    check_plot_format(plot_format)
    if quiet:
        progress.set_quiet(True)
    source = source_from(model, revision, trust_remote_code)
    ws = WeightSource.open(source)
    names = select_tensors(ws, filter_regex)
    with open_run("weights", "stats", source, out, overwrite, quiet=quiet, filter=filter_regex,
                  zero_tol=zero_tol, tensors=len(names), **_source_manifest(ws)) as run:
        records = weight_stats(ws, zero_tol=zero_tol, names=names)
        run.write_table("weight_stats", records)
        if plot:
            from ..plots.weights import stats_figure

            run.save_figure(stats_figure(records), "weight_stats", fmt=plot_format)
    emit(records, as_json=json_out, title=f"weight stats ({len(records)} tensors)",
         columns=["name", "layer_index", "role", "shape", "std", "abs_max", "kurtosis", "sparsity", "nan_count"])
    emit_done(run, json_out)


@app.command("spectrum")
def spectrum_command(
    model: ModelOpt = None,
    filter_regex: FilterOpt = None,
    rank_rtol: Annotated[float, typer.Option(
        "--rank-rtol", help="Numerical rank counts σ > rank_rtol·σ_max.")] = 1e-6,
    energy: Annotated[float, typer.Option(
        "--energy", help="Energy rank: fewest σ holding this fraction of Σσ², in (0, 1].")] = 0.9,
    zero_tol: ZeroTolOpt = 1e-8,
    device: DeviceOpt = "auto",
    revision: RevisionOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    plot: PlotOpt = False,
    plot_format: PlotFormatOpt = "png",
) -> None:
    """Ranks and norms of every 2-D weight from its full singular-value spectrum (fp64, never cropped)."""
    check_rank_rtol(rank_rtol)
    check_energy(energy)
    check_zero_tol(zero_tol)
    check_device(device)
    check_plot_format(plot_format)
    if quiet:
        progress.set_quiet(True)
    source = source_from(model, revision, trust_remote_code)
    ws = WeightSource.open(source)
    names = select_tensors(ws, filter_regex, min_dim=2, max_dim=2, floating_only=True, what="2-D weight matrix")
    with open_run("weights", "spectrum", source, out, overwrite, quiet=quiet, filter=filter_regex,
                  rank_rtol=rank_rtol, energy=energy, zero_tol=zero_tol, device=device, matrices=len(names),
                  **_source_manifest(ws)) as run:
        records = weight_spectrum(ws, rank_rtol=rank_rtol, energy=energy, device=device, zero_tol=zero_tol,
                                  names=names, created_at=run.manifest["started_at"])
        run.write_table("weight_spectrum", records)
        # seed 003's file name and columns, so its notebooks read llmprobe's output unchanged
        run.write_table("transformer_matrix_analysis", seed_matrix_rows(records), json_too=False)
        if plot:
            from ..plots.weights import spectrum_figure

            run.save_figure(spectrum_figure(records), "weight_spectrum", fmt=plot_format)
        broken = sum(record.status != "ok" for record in records)
        if broken:
            run.update(non_finite_matrices=broken)
    emit(records, as_json=json_out, title=f"weight spectrum ({len(records)} matrices)",
         columns=["name", "layer_index", "role", "shape", "actual_rank", "energy_rank", "stable_rank",
                  "effective_rank", "status"])
    if broken and not json_out:
        progress.info(f"[yellow]{broken} matrices hold NaN/Inf: status non_finite, spectral columns empty[/]")
    emit_done(run, json_out)


@app.command("bops")
def bops_command(
    model: ModelOpt = None,
    w_bits: Annotated[int, typer.Option(
        "--w-bits", "--quant-bits", help="Weight bits (LMAnalyser's --quant_bits).")] = 4,
    a_bits: Annotated[int, typer.Option("--a-bits", help="Activation bits.")] = 16,
    block_size: Annotated[int | None, typer.Option(
        "--block-size", help="Weights per fp16 scale; adds one 16x16-bit scale multiply per block per token.")]
    = None,
    revision: RevisionOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    plot: PlotOpt = False,
    plot_format: PlotFormatOpt = "png",
) -> None:
    """Bit operations per token of every linear module (in·out·b_w·b_a), per layer, role and model."""
    check_bits("--w-bits", w_bits)
    check_bits("--a-bits", a_bits)
    check_block_size(block_size)
    check_plot_format(plot_format)
    if quiet:
        progress.set_quiet(True)
    source = source_from(model, revision, trust_remote_code)
    module_map = _module_map_for_shapes(source)
    records = bops(module_map, w_bits=w_bits, a_bits=a_bits, block_size=block_size)
    summary = bops_summary(records)
    with open_run("weights", "bops", source, out, overwrite, quiet=quiet, w_bits=w_bits, a_bits=a_bits,
                  block_size=block_size) as run:
        run.write_table("bops", records)
        run.write_json("bops_summary", _summary_document(summary, w_bits, a_bits, block_size))
        if plot:
            from ..plots.weights import bops_figure

            run.save_figure(bops_figure(records, summary), "bops", fmt=plot_format)
    if json_out:
        emit(records, as_json=True, title="bops")
    else:
        layers = [row for row in summary if row.scope == "layer"]
        emit(layers, as_json=False, title=f"BOPs per token per layer (w{w_bits}a{a_bits}"
             + (f", block {block_size}" if block_size else "") + ")",
             columns=["layer_index", "modules", "macs", "bops", "baseline_fp16_bops", "ratio_to_fp16"])
        total = summary[-1]
        stdout_console.print(f"model: {total.bops:,} BOPs/token ({total.gbops:.4g} GBOPs), "
                             f"{total.ratio_to_fp16:.4g} x the fp16 baseline ({total.baseline_fp16_bops:,})")
    emit_done(run, json_out)


def _module_map_for_shapes(source):
    """Shapes come from the config alone. A hub model's config is a small download, where opening
    its weight source would fetch every safetensors shard."""
    if source.kind == "hub":
        from ..core.loading import load_config
        from ..core.modulemap import ModuleMap

        return ModuleMap.from_config(load_config(source), trust_remote_code=source.trust_remote_code)
    return WeightSource.open(source).module_map


def _summary_document(summary, w_bits: int, a_bits: int, block_size: int | None) -> dict:
    rows = [row.row() for row in summary]
    return {
        "w_bits": w_bits,
        "a_bits": a_bits,
        "block_size": block_size,
        "definition": ("BOPs per token: in*out*w_bits*a_bits per linear module, plus "
                       "out*ceil(in/block_size)*16*16 for the fp16 block-scale multiplies when block_size is "
                       "set; baseline_fp16_bops = in*out*16*16"),
        "model": next(row for row in rows if row["scope"] == "model"),
        "layers": [row for row in rows if row["scope"] == "layer"],
        "roles": [row for row in rows if row["scope"] == "role"],
    }
