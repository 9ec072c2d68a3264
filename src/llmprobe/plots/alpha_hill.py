"""Figures for ``weights alpha-hill`` (seed 001's plots, plus alpha against depth).

Every function takes the result rows as dicts (``PrecisionAlphaHill.row()``) and the precisions
in column order, and returns or yields plain :class:`matplotlib.figure.Figure` objects (Agg, no
pyplot state). The figure set :func:`alpha_hill_figures` yields them described as data
(:class:`~llmprobe.core.figures.Deferred`), so the writer draws them in worker processes and the
main process never imports matplotlib (it is imported inside the drawing functions).

Precision effects on alpha are tiny next to alpha itself (fp16 moves it by ~1e-6 relative), so
bars of alpha alone look identical across precisions. Wherever there is more than one precision,
a second panel shows ``Δα = α_p − α_ref`` against the first precision listed (the reference,
usually fp32), where the differences are visible.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..core.figures import Deferred, DeferredSet

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Per-matrix figures drawn by one worker call (each call reuses one Figure for its chunk).
INDIVIDUAL_CHUNK = 24
DEPTH_CHUNK = 1  # depth figures per worker call: one, as the category charts

MAX_TICK_LABELS = 60
_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")


def _alpha(row: dict, precision: str) -> float:
    value = row.get(f"alpha_{precision}")
    # NaN extras come back as None from Record.row() (JSON mode)
    return float(value) if isinstance(value, (int, float)) else math.nan


def _color(index: int) -> str:
    return _COLORS[index % len(_COLORS)]


def short_label(row: dict) -> str:
    """``L3 attn_q`` for a block matrix, else the weight name without ``.weight``."""
    if row.get("layer_index") is not None:
        return f"L{row['layer_index']} {row['category']}"
    return str(row["layer_name"]).removesuffix(".weight")


def _width(count: int, per_item: float, base: float = 6.0, cap: float = 30.0) -> float:
    return min(cap, max(base, 2.0 + per_item * count))


def _Figure(*args, **kwargs) -> Figure:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(*args, **kwargs)


def _new_figure(width: float, with_delta: bool) -> tuple[Figure, list]:
    figure = _Figure(figsize=(width, 5.5 if with_delta else 3.6), layout="constrained")
    if with_delta:
        axes = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
        return figure, list(axes)
    return figure, [figure.subplots()]


def _grouped_bars(axes: list, rows: Sequence[dict], precisions: Sequence[str], alpha_label: str) -> None:
    """Alpha bars per matrix, one bar per precision; Δα bars underneath when there are several."""
    count = len(rows)
    positions = np.arange(count)
    width = 0.8 / len(precisions)
    reference = np.array([_alpha(row, precisions[0]) for row in rows])
    for index, precision in enumerate(precisions):
        values = np.array([_alpha(row, precision) for row in rows])
        offset = (index - (len(precisions) - 1) / 2) * width
        axes[0].bar(positions + offset, np.nan_to_num(values, nan=0.0), width, label=precision,
                    color=_color(index))
        if len(axes) > 1 and index > 0:
            axes[1].bar(positions + offset, np.nan_to_num(values - reference, nan=0.0), width,
                        color=_color(index))
    axes[0].set_ylabel(alpha_label)
    axes[0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    if len(axes) > 1:
        axes[1].axhline(0.0, color="black", linewidth=0.6)
        axes[1].set_ylabel(f"Δα vs {precisions[0]}")
        axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    bottom = axes[-1]
    step = max(1, math.ceil(count / MAX_TICK_LABELS))
    bottom.set_xticks(positions[::step], [short_label(row) for row in rows][::step], rotation=70,
                      ha="right", fontsize=7)
    bottom.set_xlim(-0.6, count - 0.4)


def alpha_distribution_figure(rows: Sequence[dict], precisions: Sequence[str], alpha_label: str) -> Figure:
    """Box plot of alpha over all matrices, one box per precision (finite values)."""
    figure = _Figure(figsize=(_width(len(precisions), 1.0, base=5.0), 4.0), layout="constrained")
    ax = figure.subplots()
    data = []
    for precision in precisions:
        values = np.array([_alpha(row, precision) for row in rows])
        finite = values[np.isfinite(values)]
        data.append(finite if finite.size else np.array([np.nan]))
    ax.boxplot(data)
    ax.set_xticks(range(1, len(precisions) + 1), [
        f"{precision}\n(n={int(np.isfinite(values).sum())})" for precision, values in zip(precisions, data)])
    ax.set_ylabel(alpha_label)
    ax.set_title(f"{alpha_label} distribution by precision ({len(rows)} matrices)", fontsize=10)
    return figure


def _bars_figure(rows: Sequence[dict], precisions: Sequence[str], alpha_label: str, title: str) -> Figure:
    figure, axes = _new_figure(_width(len(rows), 0.12 * len(precisions) + 0.15), len(precisions) > 1)
    _grouped_bars(axes, rows, precisions, alpha_label)
    axes[0].set_title(title, fontsize=10)
    return figure


def category_figures(rows: Sequence[dict], precisions: Sequence[str],
                     alpha_label: str) -> Iterator[tuple[str, Figure]]:
    """One grouped-bar figure per category (``attn_q``, ``mlp_up``, ...), its matrices in depth order."""
    categories: dict[str, list[dict]] = {}
    for row in rows:
        categories.setdefault(str(row["category"]), []).append(row)
    for category, members in categories.items():
        yield category, _bars_figure(members, precisions, alpha_label,
                                     f"{alpha_label} by precision — {category} ({len(members)} matrices)")


def combined_batch_figures(rows: Sequence[dict], precisions: Sequence[str], alpha_label: str,
                           max_layers_per_plot: int) -> Iterator[tuple[int, Figure]]:
    """Grouped bars for consecutive batches of ``max_layers_per_plot`` matrices (0: all in one),
    numbered from 1."""
    size = len(rows) if max_layers_per_plot <= 0 else max_layers_per_plot
    for number, start in enumerate(range(0, len(rows), max(size, 1)), start=1):
        batch = rows[start:start + size]
        yield number, _bars_figure(batch, precisions, alpha_label,
                                   f"{alpha_label} by precision — matrices {start + 1}–{start + len(batch)}"
                                   f" of {len(rows)}")


def combined_batch_count(total: int, max_layers_per_plot: int) -> int:
    """How many ``combined_batch_<i>`` figures :func:`combined_batch_figures` makes."""
    if total == 0:
        return 0
    return 1 if max_layers_per_plot <= 0 else math.ceil(total / max_layers_per_plot)


def individual_layer_figures(rows: Sequence[dict], precisions: Sequence[str],
                             alpha_label: str) -> Iterator[tuple[int, Figure]]:
    """One small figure per matrix (alpha per precision, Δα beside it), numbered from 1.

    There is one per weight matrix (hundreds for a real model), so one Figure with a fixed
    layout is built once and its bars, labels and limits are updated in place for each matrix
    (~3x faster than redrawing axes). The same Figure is yielded every time: save it before
    advancing the iterator. The layout is fixed, so it needs no tight bounding box when saved.
    """
    count = len(precisions)
    with_delta = count > 1
    panel_width = 1.4 + 0.45 * count
    figure = _Figure(figsize=(2 * panel_width + 0.6 if with_delta else panel_width + 0.6, 3.2))
    figure.subplots_adjust(left=0.12 if with_delta else 0.2, right=0.97, bottom=0.2, top=0.84, wspace=0.45)
    axes = list(figure.subplots(1, 2)) if with_delta else [figure.subplots()]
    rotation = 45 if count > 3 else 0
    positions = np.arange(count)
    colors = [_color(index) for index in range(count)]

    alpha_bars = axes[0].bar(positions, np.ones(count), color=colors)
    value_labels = [axes[0].text(position, 0.0, "", ha="center", va="bottom", fontsize=6,
                                 rotation=90 if count > 3 else 0) for position in positions]
    axes[0].set_xticks(positions, precisions, fontsize=7, rotation=rotation)
    axes[0].set_ylabel(alpha_label, fontsize=8)
    axes[0].tick_params(axis="y", labelsize=7)
    delta_bars = None
    if with_delta:
        delta_bars = axes[1].bar(positions[1:], np.zeros(count - 1), color=colors[1:])
        axes[1].axhline(0.0, color="black", linewidth=0.6)
        axes[1].set_xticks(positions[1:], precisions[1:], fontsize=7, rotation=rotation)
        axes[1].set_ylabel(f"Δα vs {precisions[0]}", fontsize=8)
        axes[1].tick_params(axis="y", labelsize=7)
        axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    title = figure.suptitle("", fontsize=9)

    for number, row in enumerate(rows, start=1):
        values = np.array([_alpha(row, precision) for precision in precisions])
        finite = np.isfinite(values)
        for bar, label, value, ok in zip(alpha_bars, value_labels, values, finite):
            bar.set_height(value if ok else 0.0)
            label.set_y(value if ok else 0.0)
            label.set_text(f"{value:.4f}" if ok else "NaN")
        top = float(values[finite].max()) if finite.any() else 1.0
        axes[0].set_ylim(min(0.0, top * 1.3), max(top * 1.3, 1e-12))  # room for the labels
        if delta_bars is not None:
            deltas = np.nan_to_num(values[1:] - values[0], nan=0.0)
            for bar, delta in zip(delta_bars, deltas):
                bar.set_height(delta)
            reach = float(np.abs(deltas).max()) * 1.2 or 1.0
            axes[1].set_ylim(-reach, reach)
        status = row.get("status")
        suffix = "" if status in (None, "ok") else f" [{status}]"
        title.set_text(f"{str(row['layer_name']).removesuffix('.weight')}{suffix}")
        yield number, figure


def _depth_categories(rows: Sequence[dict]) -> dict[str, list[dict]]:
    categories: dict[str, list[dict]] = {}
    for row in rows:
        if row.get("layer_index") is not None:
            categories.setdefault(str(row["category"]), []).append(row)
    return {category: sorted(members, key=lambda row: row["layer_index"]) for category, members in categories.items()}


def alpha_vs_depth_figures(rows: Sequence[dict], precisions: Sequence[str],
                           alpha_label: str) -> Iterator[tuple[str, Figure]]:
    """Per category of block matrices: alpha against layer index, one line per precision."""
    for category, members in _depth_categories(rows).items():
        yield category, alpha_vs_depth_figure(members, precisions, alpha_label, category)


def alpha_vs_depth_figure(members: Sequence[dict], precisions: Sequence[str], alpha_label: str,
                          category: str) -> Figure:
    """Alpha against layer index for the matrices of one category (in depth order)."""
    from matplotlib.ticker import MaxNLocator

    depth = np.array([row["layer_index"] for row in members])
    figure, axes = _new_figure(_width(len(members), 0.15, base=6.0, cap=16.0), len(precisions) > 1)
    reference = np.array([_alpha(row, precisions[0]) for row in members])
    for index, precision in enumerate(precisions):
        values = np.array([_alpha(row, precision) for row in members])
        axes[0].plot(depth, values, marker="o", markersize=3, linewidth=1.2, label=precision,
                     color=_color(index))
        if len(axes) > 1 and index > 0:
            axes[1].plot(depth, values - reference, marker="o", markersize=3, linewidth=1.0,
                         color=_color(index))
    axes[0].set_ylabel(alpha_label)
    axes[0].set_title(f"{alpha_label} vs depth — {category}", fontsize=10, y=1.0)  # fixed: see _frozen_bar_figure
    axes[0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    if len(axes) > 1:
        axes[1].axhline(0.0, color="black", linewidth=0.6)
        axes[1].set_ylabel(f"Δα vs {precisions[0]}")
        axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    axes[-1].set_xlabel("layer index")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    return figure


def reused_depth_figures(groups: Sequence[tuple[str, list[dict], str]], precisions: Sequence[str],
                         alpha_label: str) -> Iterator[tuple[str, Figure, dict]]:
    """:func:`alpha_vs_depth_figure` for each of ``groups`` ((stem, members, category) each),
    drawn on one Figure per distinct member count whose lines, limits and title are updated: the
    constrained layout (half the cost of such a figure) runs once, against placeholder values as
    wide as any tick label, and is then frozen, as for the bar charts (and kept by the process
    for its next calls, like them)."""
    for stem, members, category in groups:
        key = ("depth", len(members), tuple(precisions), alpha_label)
        if key not in _FROZEN_LAYOUTS:
            placeholder = [{"layer_index": index, **{f"alpha_{p}": -1e4 if index % 2 else 1e4 for p in precisions}}
                           for index in range(len(members))]
            figure = alpha_vs_depth_figure(placeholder, precisions, alpha_label, "placeholder")
            _lay_out_once(figure)
            _FROZEN_LAYOUTS[key] = figure
        figure = _FROZEN_LAYOUTS[key]
        _update_depth_lines(figure, members, precisions)
        figure.axes[0].set_title(f"{alpha_label} vs depth — {category}", fontsize=10, y=1.0)
        yield stem, figure, {"tight": False, "close": False}


def _update_depth_lines(figure: Figure, members: Sequence[dict], precisions: Sequence[str]) -> None:
    axes = figure.axes
    depth = np.array([row["layer_index"] for row in members])
    reference = np.array([_alpha(row, precisions[0]) for row in members])
    deltas = iter(line for line in axes[1].get_lines() if line.get_marker() == "o") if len(axes) > 1 else iter(())
    for line, precision in zip(axes[0].get_lines(), precisions):
        values = np.array([_alpha(row, precision) for row in members])
        line.set_data(depth, values)
        if precision != precisions[0]:
            next(deltas).set_data(depth, values - reference)
    for ax in axes:  # the placeholder's fixed limits are dropped: autoscale to these lines
        ax.relim()
        ax.autoscale(enable=True)


def reused_bar_figures(groups: Sequence[tuple[str, list[dict], str]], precisions: Sequence[str],
                       alpha_label: str, longest: str | None = None) -> Iterator[tuple[str, Figure, dict]]:
    """The grouped-bar figures of ``groups`` ((stem, rows, title) each), drawing one Figure per
    distinct row count and updating its bars, labels and limits for each group.

    Constrained layout costs as much as the drawing itself, and the combined batches all have
    the same shape, so the layout is computed once per shape — against ``longest``, a tick label
    at least as wide as any (default: the longest of these groups), so no later label is clipped
    — and then frozen. The frozen figures stay with the process (a figure worker) for its next
    calls with the same shape and label: every combined batch of a run is drawn on one layout.
    """
    if longest is None:
        longest = max((short_label(row) for _, rows, _ in groups for row in rows), key=len, default="")
    for stem, rows, title in groups:
        key = (len(rows), tuple(precisions), alpha_label, longest)
        if key not in _FROZEN_LAYOUTS:
            _FROZEN_LAYOUTS[key] = _frozen_bar_figure(len(rows), precisions, alpha_label, longest)
        figure, axes, containers, delta_containers, step = _FROZEN_LAYOUTS[key]
        _update_bars(axes, containers, delta_containers, rows, precisions, step)
        axes[0].set_title(title, fontsize=10, y=1.0)
        yield stem, figure, {"tight": False, "close": False}


# Frozen layouts kept by this process (see reused_bar_figures and reused_depth_figures); a
# handful of figures per run.
_FROZEN_LAYOUTS: dict[tuple, object] = {}


def longest_label(rows: Sequence) -> str:
    """The longest :func:`short_label` of ``rows`` (dicts, or matrix plans with ``name``,
    ``layer_index`` and ``category``)."""
    labels = (short_label(row if isinstance(row, dict) else
                          {"layer_index": row.layer_index, "category": row.category, "layer_name": row.name})
              for row in rows)
    return max(labels, key=len, default="")


def _frozen_bar_figure(count: int, precisions: Sequence[str], alpha_label: str, longest: str) -> tuple:
    placeholder = [{"alpha_" + p: 1.0 for p in precisions} | {"layer_name": longest, "category": "",
                                                              "layer_index": None} for _ in range(count)]
    figure, axes = _new_figure(_width(count, 0.12 * len(precisions) + 0.15), len(precisions) > 1)
    _grouped_bars(axes, placeholder, precisions, alpha_label)
    # A title at a fixed height: matplotlib would otherwise search every axis's decorations
    # for overlaps at each draw (~15% of drawing such a figure); nothing sits above these axes.
    axes[0].set_title("title", fontsize=10, y=1.0)
    # No x label: skip placing one against the tick labels' boxes at every draw.
    axes[-1].xaxis.set_label_coords(0.5, 0.0)
    _lay_out_once(figure)
    containers = list(axes[0].containers)
    delta_containers = list(axes[1].containers) if len(axes) > 1 else []
    step = max(1, math.ceil(count / MAX_TICK_LABELS))
    return figure, axes, containers, delta_containers, step


def _lay_out_once(figure: Figure) -> None:
    """Run the constrained layout of a figure drawn with placeholder values as wide as any real
    label, then freeze it for the figures drawn on it after."""
    if len(figure.axes) > 1:
        figure.axes[1].set_ylim(-1.5e-5, 1.5e-5)  # sci-notation offset text laid out like the real ones
    figure.draw_without_rendering()  # the layout runs here, once
    _freeze_layout(figure)


def _freeze_layout(figure: Figure) -> None:
    """Keep the positions the layout engine found and drop the engine itself. ``"none"`` would
    leave a placeholder engine behind, and savefig runs a full layout draw before the real one
    whenever a figure has any engine: twice the drawing per save."""
    import matplotlib

    # None means "the rc default", so make that default no engine.
    with matplotlib.rc_context({"figure.autolayout": False, "figure.constrained_layout.use": False}):
        figure.set_layout_engine(None)


def _update_bars(axes: list, containers: list, delta_containers: list, rows: Sequence[dict],
                 precisions: Sequence[str], step: int) -> None:
    reference = np.array([_alpha(row, precisions[0]) for row in rows])
    tops, lows, reach = [], [0.0], 0.0
    for index, precision in enumerate(precisions):
        values = np.array([_alpha(row, precision) for row in rows])
        heights = np.nan_to_num(values, nan=0.0)
        for bar, height in zip(containers[index], heights):
            bar.set_height(height)
        tops.append(float(heights.max()) if heights.size else 0.0)
        lows.append(float(heights.min()) if heights.size else 0.0)
        if delta_containers and index > 0:
            deltas = np.nan_to_num(values - reference, nan=0.0)
            for bar, delta in zip(delta_containers[index - 1], deltas):
                bar.set_height(delta)
            reach = max(reach, float(np.abs(deltas).max()) if deltas.size else 0.0)
    top, low = max(tops + [0.0]), min(lows)
    span = (top - low) or 1.0
    axes[0].set_ylim(low - 0.05 * span if low < 0 else 0.0, top + 0.05 * span)
    if delta_containers:
        reach = reach * 1.1 or 1.0
        axes[1].set_ylim(-reach, reach)
    positions = np.arange(len(rows))
    axes[-1].set_xticks(positions[::step], [short_label(row) for row in rows][::step], rotation=70,
                        ha="right", fontsize=7)


# -- the figure set of weights alpha-hill (llmprobe.catalog.weights) ---------------------------


def _file_part(name: str) -> str:
    """``model.layers.0.self_attn.q_proj.weight`` -> ``model_layers_0_self_attn_q_proj`` (seed 001)."""
    return re.sub(r"[^A-Za-z0-9]+", "_", str(name).removesuffix(".weight")).strip("_") or "matrix"


def individual_layer_set(rows: Sequence[dict], first_number: int, precisions: Sequence[str],
                         alpha_label: str) -> Iterator[tuple[str, Figure, dict]]:
    """One chunk of the per-matrix figures, numbered from ``first_number``, one reused Figure."""
    # Hundreds of per-layer figures share one fixed layout: skip the tight bounding box (a
    # second full draw) and keep the figure open for the next matrix.
    options = {"dpi": 90, "tight": False, "close": False}
    for (number, figure), row in zip(individual_layer_figures(rows, precisions, alpha_label), rows):
        yield (f"plots/individual_layers/layer_{first_number + number - 1:03d}_{_file_part(row['layer_name'])}",
               figure, options)


# Combined batches per worker call when they are drawn as their rows arrive (FigureStreamer).
BATCHES_PER_TASK = 4


def _label(o) -> str:
    return "Alpha-Hill" if o.fit == "hill" else "alpha (power-law fit)"


def combined_batch_tasks(rows: Sequence[dict], total: int, precisions: Sequence[str], o,
                         longest: str) -> list[tuple[str, DeferredSet]]:
    """The combined-batch figures (seed 001: ``--max-layers-per-plot`` matrices each, in model
    order) whose rows are all in ``rows`` — the first rows of ``total`` in model order — as
    worker calls of :data:`BATCHES_PER_TASK` batches, laid out for the tick label ``longest`` (of
    all ``total`` matrices). A call is described the same whether it is made from the first rows
    (while the rest are computed) or from all of them."""
    label = _label(o)
    size = total if o.max_layers_per_plot <= 0 else o.max_layers_per_plot
    size = max(size, 1)
    starts = list(range(0, total, size))
    tasks = []
    for first in range(0, len(starts), BATCHES_PER_TASK):
        chunk = starts[first:first + BATCHES_PER_TASK]
        end = min(chunk[-1] + size, total)
        if len(rows) < end:
            break  # later batches are not complete yet
        groups = [(f"plots/combined_batch_{first + offset + 1}", list(rows[start:min(start + size, total)]),
                   f"{label} by precision — matrices {start + 1}–{min(start + size, total)} of {total}")
                  for offset, start in enumerate(chunk)]
        tasks.append(("plots", DeferredSet(f"{__name__}:reused_bar_figures", (groups, list(precisions), label, longest))))
    return tasks


class FigureStreamer:
    """The combined-batch figures of ``weights alpha-hill`` as the rows arrive (they need only
    their own rows): :meth:`ready` takes the rows of a finished chunk and returns the worker
    calls that became complete, once each (``Job.draw_early`` hands them to the workers)."""

    def __init__(self, plans: Sequence, precisions: Sequence[str], o):
        self.position = {plan.name: index for index, plan in enumerate(plans)}
        self.total, self.precisions, self.options = len(plans), list(precisions), o
        self.longest = longest_label(plans)
        self.arrived: dict[int, dict] = {}
        self.prefix: list[dict] = []  # the rows in model order up to the first one still missing
        self.sent = 0

    def ready(self, done: Sequence) -> list[tuple[str, DeferredSet]]:
        for row in done:
            self.arrived[self.position[row.layer_name]] = row.row()
        while len(self.prefix) in self.arrived:
            self.prefix.append(self.arrived.pop(len(self.prefix)))
        tasks = combined_batch_tasks(self.prefix, self.total, self.precisions, self.options, self.longest)
        new, self.sent = tasks[self.sent:], len(tasks)
        return new


def alpha_hill_figures(result, o):
    """Seed 001's figure set under ``plots/``, plus alpha against depth per category; the
    one-bar-chart-per-matrix set only with ``--individual-plots``. Every figure is described as
    data (the writer draws them in worker processes; the combined batches may already have been
    drawn while the spectra ran, see :class:`FigureStreamer`)."""
    rows = [row.row() for row in result.tables["precision_alpha_hill_results"]]
    precisions = list(result.manifest["precisions"])
    label = _label(o)
    here = __name__
    yield "plots/alpha_distribution_by_precision", Deferred(f"{here}:alpha_distribution_figure",
                                                            (rows, precisions, label))
    # Category bar charts, one per worker call so that the workers share the last figures
    # evenly; charts with the same number of bars share one layout in each worker, laid out for
    # the longest label among them.
    categories: dict[str, list[dict]] = {}
    for row in rows:
        categories.setdefault(str(row["category"]), []).append(row)
    longest: dict[int, str] = {}
    for members in categories.values():
        longest[len(members)] = max(longest.get(len(members), ""), longest_label(members), key=len)
    for category, members in categories.items():
        group = (f"plots/category_{_file_part(category)}", members,
                 f"{label} by precision — {category} ({len(members)} matrices)")
        yield "plots", DeferredSet(f"{here}:reused_bar_figures", ([group], precisions, label, longest[len(members)]))
    yield from combined_batch_tasks(rows, len(rows), precisions, o, longest_label(rows))
    depth = [(f"plots/alpha_vs_depth_{_file_part(category)}", members, category)
             for category, members in _depth_categories(rows).items()]
    for start in range(0, len(depth), DEPTH_CHUNK):
        yield "plots", DeferredSet(f"{here}:reused_depth_figures", (depth[start:start + DEPTH_CHUNK], precisions, label))
    if o.individual_plots:
        for start in range(0, len(rows), INDIVIDUAL_CHUNK):
            yield "plots/individual_layers", DeferredSet(
                f"{here}:individual_layer_set", (rows[start:start + INDIVIDUAL_CHUNK], start + 1, precisions, label))
