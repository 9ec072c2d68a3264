"""`llmprobe activations magnitude | kurtosis | token-kurtosis | down-proj-spikes | token-occurrence |
prompt | max-median | norms` (registered on the activations group's app; see cli/activations.py).

Each command: check the options that need no model, load the model and select modules/windows
(bad roles, layers, regexes and data sizes fail here, before any output directory exists), run
one analysis from :mod:`llmprobe.analyses.activation_stats`, write every table (CSV + JSON),
optionally the figures, and print the main table (``--json``: that table as JSON records).
"""

from __future__ import annotations

from typing import Annotated

import typer

from ..analyses import activation_stats as stats
from ..core import progress
from ..core.calibration import prepare
from ..core.errors import LLMProbeError
from ..core.loading import load_model
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
    parse_layers,
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
    source_from,
)

GROUP = "activations"

TopKOpt = Annotated[int, typer.Option("--top-k", help="Tokens listed per scope.")]
MinCountOpt = Annotated[int, typer.Option(
    "--min-count", help="Only rank tokens that occur at least this many times.")]
RankByOpt = Annotated[str, typer.Option(
    "--rank-by", help="Order tokens by the max or the mean of their max|x|.")]


def _start(quiet: bool, plot_format: str, batch_size: int, site: str) -> None:
    """Checks every command shares, before anything is loaded."""
    if quiet:
        progress.set_quiet(True)
    check_plot_format(plot_format)
    check_range("--batch-size", batch_size, low=1)
    stats.check_site(site)


def _write(run, tables: dict) -> None:
    for name, records in tables.items():
        run.write_table(name, records)


def _save_all(run, figures, name: str, fmt: str) -> None:
    """One figure -> NAME.fmt; several (panels split over figures) -> NAME_1.fmt, NAME_2.fmt, ..."""
    figures = figures if isinstance(figures, list) else [figures]
    for i, fig in enumerate(figures, start=1):
        run.save_figure(fig, name if len(figures) == 1 else f"{name}_{i}", fmt)


def _manifest(run, calib) -> None:
    run.update(model={**run.manifest["model"], **calib.lm.manifest()}, **calib.manifest())


# -- magnitude -------------------------------------------------------------------------------


@app.command("magnitude")
def magnitude_command(
    model: ModelOpt = None,
    dataset: DatasetOpt = "wikitext2",
    nsamples: NSamplesOpt = 128,
    seqlen: SeqlenOpt = 512,
    seed: SeedOpt = 0,
    top_k: TopKOpt = 10,
    rank_by: RankByOpt = "max",
    min_count: MinCountOpt = 1,
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
    """max|x| per module, layer, role and role×layer, and the tokens with the largest max|x|."""
    _start(quiet, plot_format, batch_size, site)
    check_range("--top-k", top_k, low=1)
    check_range("--min-count", min_count, low=1)
    stats.check_rank_by(rank_by)
    calib = setup_calibration(
        model=model, revision=revision, trust_remote_code=trust_remote_code, dtype=dtype, device=device,
        dataset=dataset, nsamples=nsamples, seqlen=seqlen, seed=seed, roles=roles, layers=layers, regex=regex,
        exclude_bos=exclude_bos, exclude_tokens=exclude_tokens, rotate=rotate)
    with open_run(GROUP, "magnitude", calib.lm.source, out, overwrite, quiet=quiet, site=site, top_k=top_k,
                  rank_by=rank_by, min_count=min_count, batch_size=batch_size, seed=seed) as run:
        _manifest(run, calib)
        tables = stats.magnitude(calib, site=site, top_k=top_k, rank_by=rank_by, min_count=min_count,
                                 batch_size=batch_size)
        _write(run, tables)
        if plot:
            from ..plots import activations as plots

            _save_all(run, plots.layer_lines(tables["magnitude_layers"], {
                "max over modules": "abs_max", "mean of module max": "module_abs_max_mean",
                "mean per-window max (LMAnalyser)": "window_abs_max_mean"},
                title="activation max|x| per layer", ylabel="max|x|"), "magnitude_per_layer", plot_format)
            _save_all(run, plots.role_bars(tables["magnitude_roles"], {
                "max": "abs_max", "mean per-window max": "window_abs_max_mean"},
                title="activation max|x| per role", ylabel="max|x|"), "magnitude_per_role", plot_format)
            _save_all(run, plots.role_layer_lines(
                tables["magnitude_modules"], "abs_max", title="activation max|x| per role and layer",
                ylabel="max|x|"), "magnitude_role_layers", plot_format)
            value = "max_max_abs" if rank_by == "max" else "mean_max_abs"
            _save_all(run, plots.token_bar_panels(
                plots.group_token_rows(tables["magnitude_tokens"], "scope", value),
                title=f"top tokens by {rank_by} of max|x|", xlabel=f"{rank_by} max|x|"),
                "magnitude_top_tokens", plot_format)
    emit(tables["magnitude_layers"], as_json=json_out, title="activation max|x| per layer",
         columns=["layer", "modules", "abs_max", "module_abs_max_mean", "window_abs_max_mean"])
    if not json_out:
        emit([r for r in tables["magnitude_tokens"] if r.scope == "all"], as_json=False,
             title=f"top tokens by {rank_by} max|x| (all modules)",
             columns=["rank", "token_id", "token_text", "occurrences", "mean_max_abs", "max_max_abs"])
    emit_done(run, json_out)


# -- kurtosis --------------------------------------------------------------------------------


@app.command("kurtosis")
def kurtosis_command(
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
    """Excess (Fisher, biased) kurtosis of each module's activations: per-window mean and pooled."""
    _start(quiet, plot_format, batch_size, site)
    calib = setup_calibration(
        model=model, revision=revision, trust_remote_code=trust_remote_code, dtype=dtype, device=device,
        dataset=dataset, nsamples=nsamples, seqlen=seqlen, seed=seed, roles=roles, layers=layers, regex=regex,
        exclude_bos=exclude_bos, exclude_tokens=exclude_tokens, rotate=rotate)
    with open_run(GROUP, "kurtosis", calib.lm.source, out, overwrite, quiet=quiet, site=site,
                  estimator=stats.ESTIMATOR, batch_size=batch_size, seed=seed) as run:
        _manifest(run, calib)
        tables = stats.kurtosis(calib, site=site, batch_size=batch_size)
        _write(run, tables)
        if plot:
            from ..plots import activations as plots

            _save_all(run, plots.layer_lines(tables["kurtosis_layers"], {
                "per-window, mean over windows (LMAnalyser)": "kurtosis_window_mean",
                "pooled over windows": "kurtosis_pooled_mean"},
                title="excess kurtosis per layer (mean over modules)", ylabel="excess kurtosis"),
                "kurtosis_per_layer", plot_format)
            _save_all(run, plots.role_bars(tables["kurtosis_roles"], {
                "per-window mean": "kurtosis_window_mean", "pooled": "kurtosis_pooled_mean"},
                title="excess kurtosis per role", ylabel="excess kurtosis"), "kurtosis_per_role", plot_format)
            _save_all(run, plots.role_layer_lines(
                tables["kurtosis_modules"], "kurtosis_window_mean",
                title="excess kurtosis (per-window mean) per role and layer", ylabel="excess kurtosis"),
                "kurtosis_role_layers", plot_format)
    emit(tables["kurtosis_layers"], as_json=json_out, title=f"excess kurtosis per layer ({stats.ESTIMATOR})",
         columns=["layer", "modules", "kurtosis_window_mean", "kurtosis_pooled_mean", "kurtosis_pooled_max"])
    if not json_out:
        emit(tables["kurtosis_roles"], as_json=False, title="excess kurtosis per role",
             columns=["role", "modules", "kurtosis_window_mean", "kurtosis_pooled_mean",
                      "kurtosis_pooled_max"])
    emit_done(run, json_out)


# -- token kurtosis --------------------------------------------------------------------------


@app.command("token-kurtosis")
def token_kurtosis_command(
    model: ModelOpt = None,
    dataset: DatasetOpt = "wikitext2",
    nsamples: NSamplesOpt = 128,
    seqlen: SeqlenOpt = 512,
    seed: SeedOpt = 0,
    top_k: TopKOpt = 10,
    min_count: MinCountOpt = 1,
    roles: RolesOpt = None,
    layers: Annotated[str | None, typer.Option(
        "--layers",
        help="Layers to analyse: '0,5,10', '0-3' or 'all' (default: first, middle and last).")] = None,
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
    """Tokens whose feature vectors have the highest excess kurtosis, per role, layer and role×layer."""
    _start(quiet, plot_format, batch_size, site)
    check_range("--top-k", top_k, low=1)
    check_range("--min-count", min_count, low=1)
    everything = layers is not None and layers.strip().lower() == "all"
    chosen = None if layers is None or everything else parse_layers(layers)
    calib = setup_calibration(
        model=model, revision=revision, trust_remote_code=trust_remote_code, dtype=dtype, device=device,
        dataset=dataset, nsamples=nsamples, seqlen=seqlen, seed=seed, roles=roles, layers=None if everything
        else layers, regex=regex, exclude_bos=exclude_bos, exclude_tokens=exclude_tokens, rotate=rotate)
    with open_run(GROUP, "token-kurtosis", calib.lm.source, out, overwrite, quiet=quiet, site=site,
                  top_k=top_k, min_count=min_count, estimator=stats.ESTIMATOR, batch_size=batch_size,
                  seed=seed) as run:
        _manifest(run, calib)
        tables = stats.token_kurtosis(calib, site=site, layers="all" if everything else chosen, top_k=top_k,
                                      min_count=min_count, batch_size=batch_size)
        rows = tables["token_kurtosis"]
        run.update(token_kurtosis_layers=sorted({r.layer for r in rows if r.layer is not None}))
        _write(run, tables)
        if plot:
            from ..plots import activations as plots

            _save_all(run, plots.token_bar_panels(
                plots.group_token_rows([r for r in rows if r.scope == "role"], "role", "mean_kurtosis"),
                title="top tokens by mean excess kurtosis, per role", xlabel="mean excess kurtosis"),
                "token_kurtosis_by_role", plot_format)
            _save_all(run, plots.token_bar_panels(
                plots.group_token_rows([r for r in rows if r.scope == "layer"], lambda r: f"layer {r.layer}",
                                       "mean_kurtosis"),
                title="top tokens by mean excess kurtosis, per layer", xlabel="mean excess kurtosis"),
                "token_kurtosis_by_layer", plot_format)
    emit([r for r in rows if r.scope == "role"], as_json=json_out,
         title=f"tokens with the highest excess kurtosis per role ({stats.ESTIMATOR})",
         columns=["role", "rank", "token_id", "token_text", "occurrences", "mean_kurtosis", "max_kurtosis"])
    emit_done(run, json_out)


# -- down projection spikes ------------------------------------------------------------------


@app.command("down-proj-spikes")
def down_proj_spikes_command(
    model: ModelOpt = None,
    dataset: DatasetOpt = "wikitext2",
    nsamples: NSamplesOpt = 128,
    seqlen: SeqlenOpt = 512,
    seed: SeedOpt = 0,
    top_k: TopKOpt = 5,
    rank_by: RankByOpt = "mean",
    min_count: MinCountOpt = 1,
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
    """Top tokens by max|x| at each layer's MLP down projection (mlp.down / mlp.fc2); largest spikes."""
    _start(quiet, plot_format, batch_size, site)
    check_range("--top-k", top_k, low=1)
    check_range("--min-count", min_count, low=1)
    stats.check_rank_by(rank_by)
    calib = setup_calibration(
        model=model, revision=revision, trust_remote_code=trust_remote_code, dtype=dtype, device=device,
        dataset=dataset, nsamples=nsamples, seqlen=seqlen, seed=seed, roles=None, layers=layers, regex=regex,
        exclude_bos=exclude_bos, exclude_tokens=exclude_tokens, rotate=rotate)
    stats.down_proj_sites(calib)  # fail before the output directory exists
    with open_run(GROUP, "down-proj-spikes", calib.lm.source, out, overwrite, quiet=quiet, site=site,
                  top_k=top_k, rank_by=rank_by, min_count=min_count, batch_size=batch_size, seed=seed) as run:
        _manifest(run, calib)
        tables = stats.down_proj_spikes(calib, site=site, top_k=top_k, rank_by=rank_by, min_count=min_count,
                                        batch_size=batch_size)
        _write(run, tables)
        if plot:
            from ..plots import activations as plots

            value = "max_max_abs" if rank_by == "max" else "mean_max_abs"
            _save_all(run, plots.token_bar_panels(
                plots.group_token_rows(tables["down_proj_spikes"], lambda r: f"layer {r.layer}", value),
                title=f"down projection: top tokens by {rank_by} max|x|", xlabel=f"{rank_by} max|x|"),
                "down_proj_spikes", plot_format)
    # The terminal shows each layer's top token; --json gives the whole table.
    shown = tables["down_proj_spikes"] if json_out else [r for r in tables["down_proj_spikes"] if r.rank == 1]
    emit(shown, as_json=json_out, title=f"down projection: top token per layer (by {rank_by} max|x|)",
         columns=["layer", "token_id", "token_text", "occurrences", "mean_max_abs", "max_max_abs",
                  "peak_channel"])
    emit_done(run, json_out)


# -- token occurrence ------------------------------------------------------------------------


@app.command("token-occurrence")
def token_occurrence_command(
    target_token: Annotated[str, typer.Option(
        "--target-token", "--target_token",
        help="Token text as it appears in text; '\\n', '\\t', '\\s' (space) are read as escapes.")],
    model: ModelOpt = None,
    dataset: DatasetOpt = "wikitext2",
    nsamples: NSamplesOpt = 128,
    seqlen: SeqlenOpt = 512,
    seed: SeedOpt = 0,
    exact: Annotated[bool, typer.Option(
        "--exact", help="Match only the token written exactly so, not also its after-a-space form.")] = False,
    max_occurrence: Annotated[int | None, typer.Option(
        "--max-occurrence", help="Report occurrences 1..N only.")] = None,
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
    """max|x| at the 1st, 2nd, ... occurrence of a token within each window, per module and role."""
    _start(quiet, plot_format, batch_size, site)
    if target_token == "":
        raise LLMProbeError("--target-token is empty; give the token's text, e.g. '\\n' or 'the'")
    check_range("--max-occurrence", max_occurrence, low=1)
    calib = setup_calibration(
        model=model, revision=revision, trust_remote_code=trust_remote_code, dtype=dtype, device=device,
        dataset=dataset, nsamples=nsamples, seqlen=seqlen, seed=seed, roles=roles, layers=layers, regex=regex,
        exclude_bos=exclude_bos, exclude_tokens=exclude_tokens, rotate=rotate)
    with open_run(GROUP, "token-occurrence", calib.lm.source, out, overwrite, quiet=quiet, site=site,
                  target_token=stats.unescape_token(target_token), exact=exact, max_occurrence=max_occurrence,
                  batch_size=batch_size, seed=seed) as run:
        _manifest(run, calib)
        tables = stats.token_occurrence(calib, target_token=target_token, site=site, exact=exact,
                                        max_occurrence=max_occurrence, batch_size=batch_size)
        summary = tables["token_occurrence_summary"][0]
        run.update(token_occurrence={"matched_token_ids": summary.matched_token_ids,
                                     "occurrences": summary.occurrences})
        _write(run, tables)
        if plot:
            from ..plots import activations as plots

            _save_all(run, plots.occurrence_curves(tables["token_occurrence_roles"], summary.target),
                      "token_occurrence", plot_format)
    if not json_out:
        progress.info(summary.note)
    emit(tables["token_occurrence_roles"], as_json=json_out,
         title=f"max|x| at each occurrence of {summary.target!r}",
         columns=["role", "occurrence", "samples", "mean_max_abs", "max_max_abs"])
    emit_done(run, json_out)


# -- prompt ----------------------------------------------------------------------------------


@app.command("prompt")
def prompt_command(
    text: Annotated[str, typer.Option(
        "--text", "--prompt", "--analyze-prompt", help="The input to analyse.")],
    model: ModelOpt = None,
    roles: RolesOpt = None,
    layers: LayersOpt = None,
    regex: FilterOpt = None,
    site: SiteOpt = "input",
    exclude_bos: ExcludeBosOpt = False,
    exclude_tokens: ExcludeTokensOpt = None,
    rotate: RotateOpt = "none",
    plot_layers: Annotated[str | None, typer.Option(
        "--plot-layers",
        help="Layers drawn as lines in the line plot (default: up to 8, evenly spread).")] = None,
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
    """Per-token max|x| at every selected layer and role for one input text."""
    _start(quiet, plot_format, 1, site)
    if not text.strip():
        raise LLMProbeError("--text is empty; give the prompt to analyse, e.g. --text 'The quick brown fox'")
    line_layers = parse_layers(plot_layers)
    source = source_from(model, revision, trust_remote_code)
    lm = load_model(source, dtype=dtype, device=device)
    ids = stats.prompt_windows(lm, text)
    calib = prepare(lm, windows=ids, nsamples=1, seqlen=int(ids.shape[1]), roles=roles,
                    layers=parse_layers(layers),
                    regex=regex, exclude_bos=exclude_bos, exclude_tokens=exclude_tokens or (), rotate=rotate)
    with open_run(GROUP, "prompt", source, out, overwrite, quiet=quiet, site=site, text=text) as run:
        _manifest(run, calib)
        tables = stats.prompt(calib, site=site)
        _write(run, tables)
        if plot:
            from ..plots import activations as plots

            _save_all(run, plots.prompt_heatmap(tables["prompt_tokens"], text), "prompt_heatmap", plot_format)
            _save_all(run, plots.prompt_lines(tables["prompt_tokens"], line_layers), "prompt_lines",
                      plot_format)
    emit(tables["prompt_token_peaks"], as_json=json_out,
         title="per-token peak max|x| over the selected modules",
         columns=["position", "token_text", "max_abs", "layer", "role", "channel"])
    emit_done(run, json_out)


# -- max / median ----------------------------------------------------------------------------


@app.command("max-median")
def max_median_command(
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
    """QFeP max-to-median ratio of per-token scales (max|x| over features), per module and layer."""
    _start(quiet, plot_format, batch_size, site)
    calib = setup_calibration(
        model=model, revision=revision, trust_remote_code=trust_remote_code, dtype=dtype, device=device,
        dataset=dataset, nsamples=nsamples, seqlen=seqlen, seed=seed, roles=roles, layers=layers, regex=regex,
        exclude_bos=exclude_bos, exclude_tokens=exclude_tokens, rotate=rotate)
    with open_run(GROUP, "max-median", calib.lm.source, out, overwrite, quiet=quiet, site=site,
                  batch_size=batch_size, seed=seed) as run:
        _manifest(run, calib)
        tables = stats.max_median(calib, site=site, batch_size=batch_size)
        _write(run, tables)
        if plot:
            from ..plots import activations as plots

            _save_all(run, plots.layer_lines(
                tables["max_median_layers"], {"max / median": "ratio"},
                title="max-to-median ratio of token scales per layer (QFeP)", ylabel="max(S) / median(S)"),
                "max_median_per_layer", plot_format)
            _save_all(run, plots.role_layer_lines(
                tables["max_median_modules"], "ratio", title="max-to-median ratio per role and layer (QFeP)",
                ylabel="max(S) / median(S)"), "max_median_role_layers", plot_format)
    emit(tables["max_median_layers"], as_json=json_out, title="max-to-median ratio of token scales per layer",
         columns=["layer", "inputs", "tokens", "scale_max", "scale_median", "ratio"])
    emit_done(run, json_out)


# -- channel norms ---------------------------------------------------------------------------


@app.command("norms")
def norms_command(
    model: ModelOpt = None,
    dataset: DatasetOpt = "wikitext2",
    nsamples: NSamplesOpt = 128,
    seqlen: SeqlenOpt = 512,
    seed: SeedOpt = 0,
    top_channels: Annotated[int, typer.Option(
        "--top-channels", help="Channels with the largest max|x| listed per module.")] = 5,
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
    """Per input channel E[x²] (Wanda's norm) and max|x| (SmoothQuant's scale), and a per-module summary."""
    _start(quiet, plot_format, batch_size, site)
    check_range("--top-channels", top_channels, low=1)
    calib = setup_calibration(
        model=model, revision=revision, trust_remote_code=trust_remote_code, dtype=dtype, device=device,
        dataset=dataset, nsamples=nsamples, seqlen=seqlen, seed=seed, roles=roles, layers=layers, regex=regex,
        exclude_bos=exclude_bos, exclude_tokens=exclude_tokens, rotate=rotate)
    with open_run(GROUP, "norms", calib.lm.source, out, overwrite, quiet=quiet, site=site,
                  top_channels=top_channels, batch_size=batch_size, seed=seed) as run:
        _manifest(run, calib)
        tables = stats.norms(calib, site=site, top_channels=top_channels, batch_size=batch_size)
        _write(run, tables)
        if plot:
            from ..plots import activations as plots

            summaries = tables["norms_modules"]
            _save_all(run, plots.role_layer_lines(
                summaries, "outlier_ratio", title="outlier channel ratio max|x| / median channel max|x|",
                ylabel="ratio"), "norms_outlier_ratio", plot_format)
            if summaries:
                worst = max(summaries, key=lambda r: r.abs_max if r.abs_max == r.abs_max else -1.0)
                _save_all(run, plots.channel_profile(tables["norms_channels"], worst.module),
                          "norms_channel_profile", plot_format)
    emit(tables["norms_modules"], as_json=json_out, title="per-module channel scales",
         columns=["module", "tokens", "mean_sq_mean", "sqrt_mean_sq_max", "abs_max", "outlier_ratio",
                  "top_channels"])
    emit_done(run, json_out)
