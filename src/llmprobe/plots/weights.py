"""Figures for ``weights stats``, ``weights spectrum`` and ``weights bops``.

Built on :class:`matplotlib.figure.Figure` directly (no pyplot state, no display backend). Roles
are drawn in the canonical role order so colours mean the same role in every figure of a run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import matplotlib

matplotlib.use("Agg")

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..core.modulemap import ROLES


def _roles_in_order(roles) -> list[str]:
    known = [role for role in ROLES if role in roles]
    return known + sorted(set(roles) - set(known))


def _colours(roles: Sequence[str]) -> dict[str, tuple]:
    cmap = matplotlib.colormaps["tab20"]
    return {role: cmap(index % 20) for index, role in enumerate(roles)}


def _no_data(ax, text: str = "no data") -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center")


def _finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def _role_histograms(ax, rows: Sequence, value: Callable, xlabel: str, log_x: bool) -> None:
    """One step histogram per role over shared bins, so roles compare at a glance."""
    by_role: dict[str, list[float]] = {}
    for row in rows:
        v = value(row)
        if v is None or not math.isfinite(v) or (log_x and v <= 0):
            continue
        by_role.setdefault(row.role, []).append(math.log10(v) if log_x else v)
    everything = [v for values in by_role.values() for v in values]
    if not everything:
        _no_data(ax)
        return
    low, high = min(everything), max(everything)
    if low == high:
        low, high = low - 0.5, high + 0.5
    bins = np.linspace(low, high, min(50, max(10, int(math.sqrt(len(everything))) * 2)) + 1)
    roles = _roles_in_order(by_role)
    colours = _colours(roles)
    for role in roles:
        ax.hist(by_role[role], bins=bins, histtype="step", linewidth=1.4, color=colours[role],
                label=f"{role} ({len(by_role[role])})")
    ax.set_xlabel(f"log10 {xlabel}" if log_x else xlabel)
    ax.set_ylabel("tensors")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


def stats_figure(records: Sequence) -> Figure:
    """Histograms of excess kurtosis and of abs-max (log10) per role (WeightStats rows)."""
    fig = Figure(figsize=(12.0, 4.5), layout="constrained")
    left, right = fig.subplots(1, 2)
    _role_histograms(left, records, lambda r: r.kurtosis, "excess kurtosis (Fisher, population)", log_x=False)
    left.set_title("kurtosis per role", fontsize=10)
    _role_histograms(right, records, lambda r: r.abs_max, "abs-max |w|", log_x=True)
    right.set_title("abs-max per role", fontsize=10)
    return fig


def _depth_lines(ax, rows: Sequence, value: Callable, ylabel: str, title: str, legend: bool = True) -> None:
    """One line per role: x = layer index, y = value; non-layer matrices and NaN rows left out."""
    by_role: dict[str, dict[int, list[float]]] = {}
    for row in rows:
        y = value(row)
        if row.layer_index is None or y is None or not math.isfinite(y):
            continue
        by_role.setdefault(row.role, {}).setdefault(row.layer_index, []).append(y)
    if not by_role:
        _no_data(ax, "no per-layer matrices")
    roles = _roles_in_order(by_role)
    colours = _colours(roles)
    for role in roles:
        points = sorted((layer, sum(ys) / len(ys)) for layer, ys in by_role[role].items())
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, color=colours[role], label=role)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=16))
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if by_role and legend:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


def spectrum_figure(records: Sequence) -> Figure:
    """Numerical-rank ratio, energy-rank ratio and stable rank vs depth, one line per role
    (WeightSpectrum rows)."""
    layers = {r.layer_index for r in records if r.layer_index is not None}
    fig = Figure(figsize=(min(22.0, max(7.0, 3.0 + 0.22 * len(layers))) + 1.5, 10.0), layout="constrained")
    top, middle, bottom = fig.subplots(3, 1, sharex=True)
    rtol = records[0].rank_rtol if records else None
    energy = records[0].energy if records else None
    _depth_lines(top, records, lambda r: r.rank_ratio, "rank / min(rows, cols)",
                 f"numerical rank ratio (σ > {rtol:g}·σ_max)" if rtol else "numerical rank ratio")
    _depth_lines(middle, records, lambda r: r.energy_rank_ratio, "energy rank / min(rows, cols)",
                 f"energy rank ratio ({energy:.4g} of Σσ²)" if energy else "energy rank ratio", legend=False)
    # one legend (top panel) serves all three: the colours are the same roles
    _depth_lines(bottom, records, lambda r: r.stable_rank, "‖W‖_F² / ‖W‖_2²", "stable rank", legend=False)
    return fig


def bops_figure(modules: Sequence, summary: Sequence) -> Figure:
    """Left: BOPs per token per layer, stacked by role, with the fp16 baseline as a step line.
    Right: model total per role, quantized vs fp16 baseline (BopsModule and BopsSummary rows)."""
    layer_keys = sorted({m.layer_index for m in modules}, key=lambda k: (k is None, k or 0))
    labels = [str(k) if k is not None else "other" for k in layer_keys]
    roles = _roles_in_order({m.role for m in modules})
    colours = _colours(roles)
    fig = Figure(figsize=(min(22.0, max(7.0, 3.0 + 0.25 * len(layer_keys))) + 6.0, 4.8), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[3, 2])
    if not modules:
        _no_data(left)
        _no_data(right)
        return fig
    positions = np.arange(len(layer_keys))
    bottom = np.zeros(len(layer_keys))
    for role in roles:
        heights = np.array([sum(m.bops for m in modules if m.layer_index == key and m.role == role)
                            for key in layer_keys], dtype=float) / 1e9
        left.bar(positions, heights, bottom=bottom, color=colours[role], label=role, width=0.8)
        bottom += heights
    baseline = [row.baseline_fp16_bops / 1e9 for row in summary if row.scope == "layer"]
    if len(baseline) == len(layer_keys):
        left.step(positions, baseline, where="mid", color="black", linewidth=1.0, linestyle="--",
                  label="fp16 baseline")
    step = max(1, len(labels) // 30)
    left.set_xticks(positions[::step], labels[::step], fontsize=7)
    left.set_xlabel("layer")
    left.set_ylabel("GBOPs per token")
    first = modules[0]
    left.set_title(f"BOPs per layer (w{first.w_bits}a{first.a_bits}"
                   + (f", block {first.block_size}" if first.block_size else "") + ")", fontsize=10)
    left.grid(True, axis="y", alpha=0.3)
    left.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)

    role_rows = {row.role: row for row in summary if row.scope == "role"}
    shown = [role for role in roles if role in role_rows]
    x = np.arange(len(shown))
    right.bar(x - 0.2, [role_rows[r].bops / 1e9 for r in shown], width=0.4, label="quantized",
              color=[colours[r] for r in shown])
    right.bar(x + 0.2, [role_rows[r].baseline_fp16_bops / 1e9 for r in shown], width=0.4, label="fp16 baseline",
              color="lightgray", edgecolor="gray")
    right.set_xticks(x, shown, rotation=45, ha="right", fontsize=8)
    right.set_ylabel("GBOPs per token (whole model)")
    right.set_title("per role: quantized vs fp16", fontsize=10)
    right.grid(True, axis="y", alpha=0.3)
    right.legend(fontsize=8, frameon=False)
    return fig


__all__ = ["bops_figure", "spectrum_figure", "stats_figure"]


# -- figure sets of the registered analyses (llmprobe.catalog.weights) -------------------------


def stats_figures(result, o):
    return [("weight_stats", stats_figure(result.tables["weight_stats"]))]


def spectrum_figures(result, o):
    return [("weight_spectrum", spectrum_figure(result.tables["weight_spectrum"]))]


def bops_figures(result, o):
    return [("bops", bops_figure(result.tables["bops"], result.data["summary"]))]
