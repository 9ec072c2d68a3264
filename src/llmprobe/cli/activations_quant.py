"""`llmprobe activations quant-error | top-token-error | fisher | fgmp` (registered on the
activations group's app; see cli/activations.py).

Every option is checked before the model is loaded where it can be (bits, format, granularity,
plot format); sizes that depend on the model (group and block sizes against each module's
feature count) are checked after loading and before the output directory is opened, so bad input
never leaves a half-written run behind.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..analyses import activation_quant as aq
from ..core import progress
from ..core.collect import check_site
from ..core.errors import LLMProbeError
from ..plots import activation_quant as plots
from .activations import (
    BatchSizeOpt,
    ExcludeBosOpt,
    ExcludeTokensOpt,
    FilterOpt,
    LayersOpt,
    RolesOpt,
    RotateOpt,
    SiteOpt,
    app,
    setup_calibration,
)
from .common import (
    DatasetOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    NSamplesOpt,
    OutOpt,
    OverwriteOpt,
    PlotFormatOpt,
    PlotOpt,
    QuietOpt,
    RevisionOpt,
    SeedOpt,
    SeqlenOpt,
    TrustRemoteCodeOpt,
    check_plot_format,
    check_range,
    emit,
    emit_done,
    open_run,
)

GROUP = "activations"

# Quantization options (LMAnalyser spellings --quant-bits / --quant-granularity accepted).
BitsOpt = Annotated[int, typer.Option("--bits", "--quant-bits", help="Integer width for --format int (2-16).")]
GranularityOpt = Annotated[str, typer.Option(
    "--granularity", "--quant-granularity",
    help="per-token (a scale per token) | per-tensor (a scale per window's activation matrix) | "
         "per-group (a scale per --group-size features).")]
GroupSizeOpt = Annotated[Optional[int], typer.Option(
    "--group-size", help="Features per scale for --granularity per-group (block size for nf4, default 64).")]
FormatOpt = Annotated[str, typer.Option(
    "--format",
    help="int (width from --bits) | int2..int16 | fp8 (= fp8_e4m3) | fp8_e4m3 | fp8_e5m2 | nf4 | fp16 | bf16.")]
SymmetricOpt = Annotated[bool, typer.Option(
    "--symmetric/--asymmetric", help="Integer grid symmetric about zero, or min/max with a zero point.")]
TopKOpt = Annotated[int, typer.Option("--top-k", help="Tokens listed per scope (model, each layer, each role).")]


def _start(quiet: bool, plot_format: str, batch_size: int, site: str) -> None:
    """Checks every command shares, before anything is loaded."""
    if quiet:
        progress.set_quiet(True)
    check_plot_format(plot_format)
    check_range("--batch-size", batch_size, low=1)
    check_site(site)


def _gradient_site(site: str, command: str) -> None:
    if site != "input":
        raise LLMProbeError(f"{command} is a gradient statistic of module inputs; use --site input (got {site})")


def _write(run, result) -> None:
    for name, records in result.tables().items():
        run.write_table(name, records)


@app.command("quant-error")
def quant_error_command(
    model: ModelOpt = None,
    dataset: DatasetOpt = "wikitext2",
    nsamples: NSamplesOpt = 128,
    seqlen: SeqlenOpt = 512,
    seed: SeedOpt = 0,
    bits: BitsOpt = 4,
    granularity: GranularityOpt = "per-token",
    group_size: GroupSizeOpt = None,
    fmt: FormatOpt = "int",
    symmetric: SymmetricOpt = True,
    roles: RolesOpt = None,
    layers: LayersOpt = None,
    regex: FilterOpt = None,
    site: SiteOpt = "input",
    exclude_bos: ExcludeBosOpt = False,
    exclude_tokens: ExcludeTokensOpt = None,
    rotate: RotateOpt = "none",
    batch_size: BatchSizeOpt = 1,
    revision: RevisionOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    plot: PlotOpt = False,
    plot_format: PlotFormatOpt = "png",
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """MSE between each module's activation and its fake-quantized copy; per module, layer, role, model."""
    _start(quiet, plot_format, batch_size, site)
    spec = aq.quant_spec(bits, fmt, granularity, group_size, symmetric)
    calib = setup_calibration(model=model, revision=revision, trust_remote_code=trust_remote_code, dtype=dtype,
                              device=device, dataset=dataset, nsamples=nsamples, seqlen=seqlen, seed=seed,
                              roles=roles, layers=layers, regex=regex, exclude_bos=exclude_bos,
                              exclude_tokens=exclude_tokens, rotate=rotate)
    aq.check_divides(calib, spec.divisor, site=site)
    with open_run(GROUP, "quant-error", calib.lm.source, out, overwrite, quiet=quiet, format=spec.fmt,
                  granularity=spec.granularity, group_size=spec.group_size, symmetric=spec.symmetric, site=site,
                  batch_size=batch_size, seed=seed) as run:
        run.update(model={**run.manifest["model"], **calib.lm.manifest()}, **calib.manifest())
        result = aq.quant_error(calib, site=site, batch_size=batch_size, spec=spec)
        _write(run, result)
        if plot:
            run.save_figure(plots.quant_error_figure(result.modules), "quant_error_per_layer", plot_format)
    emit(result.summary, as_json=json_out, title=f"activation quantization error ({spec.label})",
         columns=["scope", "layer", "role", "modules", "mse_mean", "mse_pooled", "rel_mse_pooled"])
    emit_done(run, json_out)


@app.command("top-token-error")
def top_token_error_command(
    model: ModelOpt = None,
    dataset: DatasetOpt = "wikitext2",
    nsamples: NSamplesOpt = 128,
    seqlen: SeqlenOpt = 512,
    seed: SeedOpt = 0,
    bits: BitsOpt = 4,
    granularity: GranularityOpt = "per-token",
    group_size: GroupSizeOpt = None,
    fmt: FormatOpt = "int",
    symmetric: SymmetricOpt = True,
    top_k: TopKOpt = 20,
    min_count: Annotated[int, typer.Option(
        "--min-count", help="Only rank tokens that occur at least this many times.")] = 1,
    roles: RolesOpt = None,
    layers: LayersOpt = None,
    regex: FilterOpt = None,
    site: SiteOpt = "input",
    exclude_bos: ExcludeBosOpt = False,
    exclude_tokens: ExcludeTokensOpt = None,
    rotate: RotateOpt = "none",
    batch_size: BatchSizeOpt = 1,
    revision: RevisionOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    plot: PlotOpt = False,
    plot_format: PlotFormatOpt = "png",
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Per-token quantization MSE by token id (mean, std, count, max); top-k tokens overall, per layer, per role."""
    _start(quiet, plot_format, batch_size, site)
    check_range("--top-k", top_k, low=1)
    check_range("--min-count", min_count, low=1)
    spec = aq.quant_spec(bits, fmt, granularity, group_size, symmetric)
    calib = setup_calibration(model=model, revision=revision, trust_remote_code=trust_remote_code, dtype=dtype,
                              device=device, dataset=dataset, nsamples=nsamples, seqlen=seqlen, seed=seed,
                              roles=roles, layers=layers, regex=regex, exclude_bos=exclude_bos,
                              exclude_tokens=exclude_tokens, rotate=rotate)
    aq.check_divides(calib, spec.divisor, site=site)
    with open_run(GROUP, "top-token-error", calib.lm.source, out, overwrite, quiet=quiet, format=spec.fmt,
                  granularity=spec.granularity, group_size=spec.group_size, symmetric=spec.symmetric, site=site,
                  top_k=top_k, min_count=min_count, batch_size=batch_size, seed=seed) as run:
        run.update(model={**run.manifest["model"], **calib.lm.manifest()}, **calib.manifest())
        result = aq.top_token_error(calib, top_k=top_k, min_occurrences=min_count, site=site,
                                    batch_size=batch_size, spec=spec)
        _write(run, result)
        if plot:
            run.save_figure(plots.top_token_error_figure(result.top, top_k), "top_token_error", plot_format)
    emit([row for row in result.top if row.scope == "model"], as_json=json_out,
         title=f"tokens with the largest quantization error ({spec.label})",
         columns=["rank", "token_id", "token", "occurrences", "count", "mean_mse", "std_mse", "max_mse"])
    emit_done(run, json_out)


@app.command("fisher")
def fisher_command(
    model: ModelOpt = None,
    dataset: DatasetOpt = "wikitext2",
    nsamples: NSamplesOpt = 128,
    seqlen: SeqlenOpt = 512,
    seed: SeedOpt = 0,
    roles: RolesOpt = None,
    layers: LayersOpt = None,
    regex: FilterOpt = None,
    site: SiteOpt = "input",
    exclude_bos: ExcludeBosOpt = False,
    exclude_tokens: ExcludeTokensOpt = None,
    rotate: RotateOpt = "none",
    batch_size: BatchSizeOpt = 1,
    revision: RevisionOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    plot: PlotOpt = False,
    plot_format: PlotFormatOpt = "png",
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fisher information Σ(∂L/∂x)² of each module's input (next-token loss); mean and log-sum-exp over windows."""
    _start(quiet, plot_format, batch_size, site)
    _gradient_site(site, "fisher")
    calib = setup_calibration(model=model, revision=revision, trust_remote_code=trust_remote_code, dtype=dtype,
                              device=device, dataset=dataset, nsamples=nsamples, seqlen=seqlen, seed=seed,
                              roles=roles, layers=layers, regex=regex, exclude_bos=exclude_bos,
                              exclude_tokens=exclude_tokens, rotate=rotate)
    with open_run(GROUP, "fisher", calib.lm.source, out, overwrite, quiet=quiet, site=site,
                  batch_size=batch_size, seed=seed) as run:
        run.update(model={**run.manifest["model"], **calib.lm.manifest()}, **calib.manifest())
        result = aq.fisher(calib, batch_size=batch_size)
        _write(run, result)
        if plot:
            run.save_figure(plots.fisher_figure(result.modules), "fisher_per_layer", plot_format)
    emit(result.summary, as_json=json_out, title="activation Fisher information",
         columns=["scope", "layer", "role", "modules", "fisher_mean", "fisher_logsumexp"])
    emit_done(run, json_out)


@app.command("fgmp")
def fgmp_command(
    model: ModelOpt = None,
    dataset: DatasetOpt = "wikitext2",
    nsamples: NSamplesOpt = 128,
    seqlen: SeqlenOpt = 512,
    seed: SeedOpt = 0,
    block_size: Annotated[int, typer.Option(
        "--block-size", help="Features per block; each block has its own scale in both formats.")] = 32,
    low_format: Annotated[str, typer.Option(
        "--low-format", help="Low-precision block format (int2..int16, fp4 = fp4_e2m1, fp8_e4m3, fp8_e5m2, nf4).")] = "int4",
    high_format: Annotated[str, typer.Option(
        "--high-format", help="High-precision block format (e.g. int8, fp8_e4m3).")] = "int8",
    keep_frac: Annotated[float, typer.Option(
        "--keep-frac", help="Fraction of blocks (model-wide, most sensitive first) kept in the high format.")] = 0.1,
    symmetric: SymmetricOpt = True,
    roles: RolesOpt = None,
    layers: LayersOpt = None,
    regex: FilterOpt = None,
    site: SiteOpt = "input",
    exclude_bos: ExcludeBosOpt = False,
    exclude_tokens: ExcludeTokensOpt = None,
    rotate: RotateOpt = "none",
    batch_size: BatchSizeOpt = 1,
    revision: RevisionOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    plot: PlotOpt = False,
    plot_format: PlotFormatOpt = "png",
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """FGMP sensitivity Σ g²·(Q_low(x) − Q_high(x))² per module and per feature block (arXiv 2504.14152)."""
    _start(quiet, plot_format, batch_size, site)
    _gradient_site(site, "fgmp")
    check_range("--block-size", block_size, low=1)
    check_range("--keep-frac", keep_frac, low=0, high=1)
    low = aq.block_spec(low_format, block_size, "--low-format", symmetric)
    high = aq.block_spec(high_format, block_size, "--high-format", symmetric)
    calib = setup_calibration(model=model, revision=revision, trust_remote_code=trust_remote_code, dtype=dtype,
                              device=device, dataset=dataset, nsamples=nsamples, seqlen=seqlen, seed=seed,
                              roles=roles, layers=layers, regex=regex, exclude_bos=exclude_bos,
                              exclude_tokens=exclude_tokens, rotate=rotate)
    aq.check_divides(calib, block_size, option="--block-size", backward=True)
    with open_run(GROUP, "fgmp", calib.lm.source, out, overwrite, quiet=quiet, low_format=low.fmt,
                  high_format=high.fmt, block_size=block_size, keep_frac=keep_frac, symmetric=symmetric,
                  site=site, batch_size=batch_size, seed=seed) as run:
        run.update(model={**run.manifest["model"], **calib.lm.manifest()}, **calib.manifest())
        result = aq.fgmp(calib, block_size, low.fmt, high.fmt, keep_frac=keep_frac, symmetric=symmetric,
                         batch_size=batch_size)
        _write(run, result)
        if plot:
            run.save_figure(plots.fgmp_figure(result.modules, result.blocks), "fgmp_sensitivity", plot_format)
    emit(result.summary, as_json=json_out, title=f"FGMP sensitivity ({low.fmt} vs {high.fmt}, block {block_size})",
         columns=["scope", "layer", "role", "modules", "blocks", "sensitivity", "blocks_high", "high_frac",
                  "high_share"])
    emit_done(run, json_out)
