"""Figures for the activation statistics commands (the plots LMAnalyser draws, kept readable at
30–80 layers).

Figures are plain :class:`matplotlib.figure.Figure` objects (no pyplot state, Agg backend), so
they are safe to build in tests, threads and headless jobs; the CLI saves them with
``RunOutput.save_figure``. Readability rules used throughout: figure width grows with the number
of layers or tokens (capped), tick labels are thinned to at most ~40, legends sit outside the
axes, long token texts are shown as short ``repr`` strings so whitespace tokens ("\\n", " ")
stay visible, and a magnitude axis switches to log scale when values span more than two decades.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..core.modulemap import ROLES

MAX_TICK_LABELS = 40
PANELS_PER_FIGURE = 12


def _role_key(role: str | None) -> tuple:
    first = (role or "").split("+")[0]
    return (ROLES.index(first) if first in ROLES else len(ROLES), role or "")


def _finite(value) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


def token_label(text: str, width: int = 14) -> str:
    """Short printable label: repr keeps '\\n' and leading spaces visible."""
    label = repr(text)
    return label if len(label) <= width else label[: width - 1] + "…"


def _wide(count: int, base: float = 6.0, per_item: float = 0.22, cap: float = 24.0) -> float:
    return min(cap, max(base, 2.5 + per_item * count))


def _maybe_log(ax, values: Sequence[float], axis: str = "y") -> None:
    positive = [v for v in values if _finite(v) and v > 0]
    if positive and max(positive) / min(positive) > 100:
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")


def _legend_outside(ax) -> None:
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False)


def _layer_axis(ax) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=20))
    ax.set_xlabel("layer")
    ax.grid(True, alpha=0.3)


def _thin_labels(ax, labels: Sequence[str], axis: str = "x", rotation: int = 90) -> None:
    """Show every label when there are few, else every k-th so at most MAX_TICK_LABELS remain."""
    step = max(1, math.ceil(len(labels) / MAX_TICK_LABELS))
    ticks = list(range(0, len(labels), step))
    if axis == "x":
        ax.set_xticks(ticks)
        ax.set_xticklabels([labels[i] for i in ticks], rotation=rotation, fontsize=7)
    else:
        ax.set_yticks(ticks)
        ax.set_yticklabels([labels[i] for i in ticks], fontsize=7)


def _no_data(ax, message: str = "no data") -> None:
    ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center")


# -- per layer / per role ----------------------------------------------------------------------


def layer_lines(rows: Sequence, series: dict[str, str], *, title: str, ylabel: str) -> Figure:
    """One line per column in ``series`` (legend label -> attribute) against ``row.layer``."""
    layered = sorted((r for r in rows if r.layer is not None), key=lambda r: r.layer)
    fig = Figure(figsize=(_wide(len(layered)), 4.0), layout="constrained")
    ax = fig.add_subplot()
    values = []
    for label, column in series.items():
        points = [(r.layer, getattr(r, column)) for r in layered if _finite(getattr(r, column))]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.3, label=label)
            values.extend(ys)
    if not values:
        _no_data(ax)
    _maybe_log(ax, values)
    _layer_axis(ax)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    _legend_outside(ax)
    return fig


def role_layer_lines(rows: Sequence, column: str, *, title: str, ylabel: str) -> Figure:
    """One line per role across layers (LMAnalyser's "per module per layer" plot); several
    modules of one role in one layer (MoE experts) are averaged into one point."""
    by_role: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        value = getattr(r, column)
        if r.layer is not None and _finite(value):
            by_role[r.role][r.layer].append(value)
    layers = {layer for points in by_role.values() for layer in points}
    fig = Figure(figsize=(_wide(len(layers)), 4.2), layout="constrained")
    ax = fig.add_subplot()
    values = []
    for role in sorted(by_role, key=_role_key):
        points = sorted((layer, float(np.mean(v))) for layer, v in by_role[role].items())
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, label=role)
        values.extend(ys)
    if not values:
        _no_data(ax)
    _maybe_log(ax, values)
    _layer_axis(ax)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    _legend_outside(ax)
    return fig


def role_bars(rows: Sequence, series: dict[str, str], *, title: str, ylabel: str) -> Figure:
    """Grouped bars per role (LMAnalyser's per-module-type plot)."""
    rows = sorted((r for r in rows if r.role is not None), key=lambda r: _role_key(r.role))
    width = max(5.0, 1.0 + 0.9 * len(rows) * max(1, len(series)) ** 0.5)
    fig = Figure(figsize=(width, 4.0), layout="constrained")
    ax = fig.add_subplot()
    if not rows:
        _no_data(ax)
        return fig
    width = 0.8 / max(1, len(series))
    x = np.arange(len(rows))
    values = []
    for i, (label, column) in enumerate(series.items()):
        ys = [getattr(r, column) if _finite(getattr(r, column)) else np.nan for r in rows]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, ys, width=width, label=label)
        values.extend(ys)
    ax.set_xticks(x)
    ax.set_xticklabels([r.role for r in rows], rotation=30, ha="right", fontsize=8)
    _maybe_log(ax, values)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    if len(series) > 1:
        _legend_outside(ax)
    return fig


# -- token bars (small multiples) ----------------------------------------------------------------


def _panel_grid(count: int, columns: int = 3) -> tuple[int, int]:
    columns = max(1, min(columns, count))
    return math.ceil(count / columns), columns


def token_bar_panels(groups: dict[str, list[tuple[str, float, int]]], *, title: str, xlabel: str,
                     per_figure: int = PANELS_PER_FIGURE) -> list[Figure]:
    """Horizontal bars of the top tokens, one panel per group (a role, a layer, ...), largest
    at the top, each bar annotated with its count; groups beyond ``per_figure`` go to further
    figures so panels stay legible for 30+ layers."""
    names = list(groups)
    if not names:
        fig = Figure(figsize=(6, 3), layout="constrained")
        _no_data(fig.add_subplot())
        return [fig]
    figures = []
    for start in range(0, len(names), per_figure):
        chunk = names[start:start + per_figure]
        bars = max(len(groups[n]) for n in chunk)
        n_rows, n_cols = _panel_grid(len(chunk))
        panel_height = max(2.2, 0.32 * bars + 1.0)
        # Fixed spacing instead of constrained layout: laying out a dozen panels of text labels
        # with the layout engine costs seconds per figure, and the grid here is regular.
        fig = Figure(figsize=(4.6 * n_cols, panel_height * n_rows + 0.6))
        fig.subplots_adjust(left=0.12, right=0.97, bottom=0.6 / (panel_height * n_rows + 0.6) + 0.02,
                            top=1 - 0.5 / (panel_height * n_rows + 0.6), wspace=0.6, hspace=0.55)
        axes = fig.subplots(n_rows, n_cols, squeeze=False)
        for ax, name in zip(axes.flat, chunk):
            entries = groups[name]
            labels = [token_label(text) for text, _, _ in entries]
            values = [value for _, value, _ in entries]
            y = np.arange(len(entries))
            ax.barh(y, values, color="tab:blue")
            ax.set_yticks(y)
            ax.set_yticklabels(labels, fontsize=7)
            ax.invert_yaxis()
            for yi, (_, value, count) in zip(y, entries):
                if _finite(value):
                    ax.text(value, yi, f" n={count}", va="center", fontsize=6)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.tick_params(axis="x", labelsize=7)
            ax.grid(True, axis="x", alpha=0.3)
            ax.margins(x=0.18)
        for ax in list(axes.flat)[len(chunk):]:
            ax.set_visible(False)
        pages = math.ceil(len(names) / per_figure)
        suffix = "" if pages == 1 else f" ({start // per_figure + 1}/{pages})"
        fig.suptitle(title + suffix, fontsize=11)
        figures.append(fig)
    return figures


def group_token_rows(rows: Sequence, group: str, value: str, count: str = "occurrences") -> dict:
    """Token records -> {group label: [(token_text, value, count), ...]} in rank order."""
    groups: dict[str, list] = {}
    for r in sorted(rows, key=lambda r: r.rank):
        label = group(r) if callable(group) else str(getattr(r, group))
        groups.setdefault(label, []).append((r.token_text, getattr(r, value), getattr(r, count)))
    return groups


# -- token occurrence ----------------------------------------------------------------------------


def occurrence_curves(role_rows: Sequence, target: str) -> Figure:
    """Mean (line) and max (dashed) max|x| against the occurrence number, one colour per role."""
    by_role: dict[str, list] = defaultdict(list)
    for r in role_rows:
        by_role[r.role].append(r)
    occurrences = {r.occurrence for r in role_rows}
    fig = Figure(figsize=(_wide(len(occurrences), base=7.0, per_item=0.15), 4.2), layout="constrained")
    ax = fig.add_subplot()
    values = []
    for i, role in enumerate(sorted(by_role, key=_role_key)):
        points = sorted(by_role[role], key=lambda r: r.occurrence)
        xs = [r.occurrence for r in points]
        colour = f"C{i % 10}"
        ax.plot(xs, [r.mean_max_abs for r in points], marker="o", markersize=3, color=colour,
                label=f"{role} mean")
        ax.plot(xs, [r.max_max_abs for r in points], linestyle="--", linewidth=0.9, color=colour, alpha=0.7,
                label=f"{role} max")
        values.extend(r.max_max_abs for r in points)
        values.extend(r.mean_max_abs for r in points)
    if not values:
        _no_data(ax, f"{target!r} does not occur")
    _maybe_log(ax, values)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=20))
    ax.set_xlabel(f"occurrence of {target!r} in the window")
    ax.set_ylabel("max|x| over features")
    ax.set_title(f"activation magnitude vs occurrence of {target!r}", fontsize=10)
    ax.grid(True, alpha=0.3)
    _legend_outside(ax)
    return fig


# -- prompt --------------------------------------------------------------------------------------


def _prompt_matrices(rows: Sequence) -> tuple[list[str], dict[str, tuple[list[int], np.ndarray]]]:
    """Token labels and, per role group, (layers, [layers × positions] max|x|)."""
    positions = sorted({r.position for r in rows})
    text_at = {r.position: r.token_text for r in rows}
    labels = [token_label(text_at[p], 10) for p in positions]
    column = {p: i for i, p in enumerate(positions)}
    # One matrix per hooked input: rows of q/k/v sharing an input are identical, so group by the
    # set of roles that read the input ("attn.q+attn.k+attn.v").
    roles_of: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        if r.role not in roles_of[r.input_group]:
            roles_of[r.input_group].append(r.role)
    matrices: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
    for r in rows:
        if r.layer is None:
            continue
        label = "+".join(sorted(roles_of[r.input_group], key=_role_key))
        vector = matrices[label].setdefault(r.layer, np.full(len(positions), np.nan))
        vector[column[r.position]] = np.fmax(vector[column[r.position]], r.max_abs)
    out = {}
    for label in sorted(matrices, key=_role_key):
        layers = sorted(matrices[label])
        out[label] = (layers, np.vstack([matrices[label][layer] for layer in layers]))
    return labels, out


def prompt_heatmap(rows: Sequence, text: str | None = None) -> Figure:
    """Layers × tokens heatmap of max|x| (log colour scale), one panel per role group."""
    labels, matrices = _prompt_matrices(rows)
    panels = max(1, len(matrices))
    n_rows, n_cols = _panel_grid(panels, columns=2)
    layers = max((len(v[0]) for v in matrices.values()), default=1)
    fig = Figure(figsize=(n_cols * _wide(len(labels), base=5.0, per_item=0.2, cap=14.0),
                          n_rows * max(2.5, 0.14 * layers + 1.6)), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    from matplotlib.colors import LogNorm

    for ax, (label, (layer_ids, matrix)) in zip(axes.flat, matrices.items()):
        finite = matrix[np.isfinite(matrix) & (matrix > 0)]
        norm = LogNorm(vmin=float(finite.min()), vmax=float(finite.max())) if finite.size and \
            finite.max() > finite.min() else None
        image = ax.imshow(matrix, aspect="auto", interpolation="nearest", cmap="magma", norm=norm)
        fig.colorbar(image, ax=ax, label="max|x|", shrink=0.9)
        _thin_labels(ax, labels, "x")
        _thin_labels(ax, [str(layer) for layer in layer_ids], "y")
        ax.set_ylabel("layer")
        ax.set_title(label, fontsize=9)
    if not matrices:
        _no_data(axes.flat[0])
    for ax in list(axes.flat)[len(matrices):]:
        if matrices:
            ax.set_visible(False)
    fig.suptitle("per-token max|x|" + (f": {text[:60]!r}" if text else ""), fontsize=11)
    return fig


def prompt_lines(rows: Sequence, layers: Sequence[int] | None = None, max_lines: int = 8) -> Figure:
    """Per-token max|x| along the prompt, one panel per role group and one line per layer
    (at most ``max_lines`` layers, evenly spread, unless ``layers`` names them)."""
    labels, matrices = _prompt_matrices(rows)
    panels = max(1, len(matrices))
    n_rows, n_cols = _panel_grid(panels, columns=2)
    fig = Figure(figsize=(n_cols * _wide(len(labels), base=5.5, per_item=0.2, cap=14.0), n_rows * 3.4),
                 layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for ax, (label, (layer_ids, matrix)) in zip(axes.flat, matrices.items()):
        if layers:
            picks = [i for i, layer in enumerate(layer_ids) if layer in set(layers)]
        else:
            spread = np.linspace(0, len(layer_ids) - 1, min(max_lines, len(layer_ids)))
            picks = sorted(set(spread.round().astype(int)))
        for i in picks:
            ax.plot(range(len(labels)), matrix[i], marker="o", markersize=2.5, linewidth=1.0,
                    label=f"layer {layer_ids[i]}")
        _maybe_log(ax, matrix[picks].ravel().tolist() if picks else [])
        _thin_labels(ax, labels, "x")
        ax.set_ylabel("max|x|")
        ax.set_title(label, fontsize=9)
        ax.grid(True, alpha=0.3)
        _legend_outside(ax)
    if not matrices:
        _no_data(axes.flat[0])
    for ax in list(axes.flat)[len(matrices):]:
        if matrices:
            ax.set_visible(False)
    fig.suptitle("per-token max|x| by layer", fontsize=11)
    return fig


# -- channels ------------------------------------------------------------------------------------


def channel_profile(rows: Sequence, module: str) -> Figure:
    """max|x_j| and sqrt(E[x_j²]) over the channels of one module: outlier channels stand out."""
    chosen = sorted((r for r in rows if r.module == module), key=lambda r: r.channel)
    fig = Figure(figsize=(_wide(len(chosen), base=7.0, per_item=0.01, cap=12.0), 4.0), layout="constrained")
    ax = fig.add_subplot()
    if not chosen:
        _no_data(ax)
        return fig
    channels = [r.channel for r in chosen]
    ax.plot(channels, [r.abs_max for r in chosen], linewidth=0.8, label="max|x| (SmoothQuant scale)")
    ax.plot(channels, [r.sqrt_mean_sq for r in chosen], linewidth=0.8, label="sqrt(E[x²]) (Wanda norm)")
    _maybe_log(ax, [r.abs_max for r in chosen] + [r.sqrt_mean_sq for r in chosen])
    ax.set_xlabel("input channel")
    ax.set_ylabel("activation scale")
    ax.set_title(f"channel scales of {module}", fontsize=10)
    ax.grid(True, alpha=0.3)
    _legend_outside(ax)
    return fig


# -- figure sets of the registered analyses (llmprobe.catalog.activations) ---------------------


def magnitude_figures(result, o):
    tables = result.tables
    value = "max_max_abs" if o.rank_by == "max" else "mean_max_abs"
    return [
        ("magnitude_per_layer", layer_lines(tables["magnitude_layers"], {
            "max over modules": "abs_max", "mean of module max": "module_abs_max_mean",
            "mean per-window max (LMAnalyser)": "window_abs_max_mean"},
            title="activation max|x| per layer", ylabel="max|x|")),
        ("magnitude_per_role", role_bars(tables["magnitude_roles"], {
            "max": "abs_max", "mean per-window max": "window_abs_max_mean"},
            title="activation max|x| per role", ylabel="max|x|")),
        ("magnitude_role_layers", role_layer_lines(tables["magnitude_modules"], "abs_max",
                                                   title="activation max|x| per role and layer", ylabel="max|x|")),
        ("magnitude_top_tokens", token_bar_panels(group_token_rows(tables["magnitude_tokens"], "scope", value),
                                                  title=f"top tokens by {o.rank_by} of max|x|",
                                                  xlabel=f"{o.rank_by} max|x|")),
    ]


def kurtosis_figures(result, o):
    tables = result.tables
    return [
        ("kurtosis_per_layer", layer_lines(tables["kurtosis_layers"], {
            "per-window, mean over windows (LMAnalyser)": "kurtosis_window_mean",
            "pooled over windows": "kurtosis_pooled_mean"},
            title="excess kurtosis per layer (mean over modules)", ylabel="excess kurtosis")),
        ("kurtosis_per_role", role_bars(tables["kurtosis_roles"], {
            "per-window mean": "kurtosis_window_mean", "pooled": "kurtosis_pooled_mean"},
            title="excess kurtosis per role", ylabel="excess kurtosis")),
        ("kurtosis_role_layers", role_layer_lines(
            tables["kurtosis_modules"], "kurtosis_window_mean",
            title="excess kurtosis (per-window mean) per role and layer", ylabel="excess kurtosis")),
    ]


def token_kurtosis_figures(result, o):
    rows = result.tables["token_kurtosis"]
    return [
        ("token_kurtosis_by_role", token_bar_panels(
            group_token_rows([r for r in rows if r.scope == "role"], "role", "mean_kurtosis"),
            title="top tokens by mean excess kurtosis, per role", xlabel="mean excess kurtosis")),
        ("token_kurtosis_by_layer", token_bar_panels(
            group_token_rows([r for r in rows if r.scope == "layer"], lambda r: f"layer {r.layer}", "mean_kurtosis"),
            title="top tokens by mean excess kurtosis, per layer", xlabel="mean excess kurtosis")),
    ]


def down_proj_spikes_figures(result, o):
    value = "max_max_abs" if o.rank_by == "max" else "mean_max_abs"
    return [("down_proj_spikes", token_bar_panels(
        group_token_rows(result.tables["down_proj_spikes"], lambda r: f"layer {r.layer}", value),
        title=f"down projection: top tokens by {o.rank_by} max|x|", xlabel=f"{o.rank_by} max|x|"))]


def token_occurrence_figures(result, o):
    summary = result.tables["token_occurrence_summary"][0]
    return [("token_occurrence", occurrence_curves(result.tables["token_occurrence_roles"], summary.target))]


def prompt_figures(result, o):
    from ..core.specs import parse_layers

    rows = result.tables["prompt_tokens"]
    return [("prompt_heatmap", prompt_heatmap(rows, o.text)),
            ("prompt_lines", prompt_lines(rows, parse_layers(o.plot_layers, "--plot-layers")))]


def max_median_figures(result, o):
    tables = result.tables
    return [
        ("max_median_per_layer", layer_lines(
            tables["max_median_layers"], {"max / median": "ratio"},
            title="max-to-median ratio of token scales per layer (QFeP)", ylabel="max(S) / median(S)")),
        ("max_median_role_layers", role_layer_lines(
            tables["max_median_modules"], "ratio", title="max-to-median ratio per role and layer (QFeP)",
            ylabel="max(S) / median(S)")),
    ]


def norms_figures(result, o):
    summaries = result.tables["norms_modules"]
    figures = [("norms_outlier_ratio", role_layer_lines(
        summaries, "outlier_ratio", title="outlier channel ratio max|x| / median channel max|x|", ylabel="ratio"))]
    if summaries:
        worst = max(summaries, key=lambda r: r.abs_max if r.abs_max == r.abs_max else -1.0)
        figures.append(("norms_channel_profile", channel_profile(result.tables["norms_channels"], worst.module)))
    return figures
