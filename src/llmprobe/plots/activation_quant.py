"""Figures for the activation quantization and sensitivity commands.

Figures are built on :class:`matplotlib.figure.Figure` directly (no pyplot state, no display
backend), so they are safe to make from any thread and under Agg. Per-layer figures draw one line
per role with integer layer ticks thinned by a locator and a legend outside the axes, so that a
30- or 80-layer model stays readable; widths grow with the layer count.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import matplotlib

matplotlib.use("Agg")

from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from ..core.modulemap import ROLES  # noqa: E402


def _width_for_layers(n_layers: int, base: float = 6.0) -> float:
    return min(22.0, max(base, 3.0 + 0.22 * n_layers))


def _role_order(roles) -> list[str]:
    known = [role for role in ROLES if role in roles]
    return known + sorted(set(roles) - set(known))


def _layer_lines(ax, rows: Sequence, value: Callable[[object], float | None], ylabel: str, title: str,
                 log: bool = True) -> None:
    """One line per role: x = layer, y = value(row); rows without a layer or a positive value
    (on a log axis) are left out rather than drawn at a fake height."""
    by_role: dict[str, dict[int, list[float]]] = {}
    for row in rows:
        y = value(row)
        if row.layer is None or y is None or not math.isfinite(y) or (log and y <= 0):
            continue
        # Modules of one role in one layer (MoE experts) are averaged into one point.
        by_role.setdefault(row.role, {}).setdefault(row.layer, []).append(y)
    # Roles that read one shared input (q/k/v, gate/up in forward statistics) have identical
    # series; draw them once under a joint label instead of stacking invisible lines.
    series: dict[tuple, list[str]] = {}
    for role in _role_order(by_role):
        points = tuple(sorted((layer, sum(ys) / len(ys)) for layer, ys in by_role[role].items()))
        series.setdefault(points, []).append(role)
    drawn = False
    for points, roles in series.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, label=" = ".join(roles))
        drawn = True
    if log and drawn:
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=16))
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    if drawn:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False)
    else:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center")


def _n_layers(rows: Sequence) -> int:
    layers = {row.layer for row in rows if row.layer is not None}
    return len(layers)


def token_label(text: str, limit: int = 18) -> str:
    """A token's text made visible on a plot: whitespace escaped, '$' kept from mathtext."""
    shown = repr(text)[1:-1]
    if len(shown) > limit:
        shown = shown[: limit - 1] + "…"
    return "'" + shown.replace("$", r"\$") + "'"


def quant_error_figure(modules: Sequence) -> Figure:
    """MSE and relative MSE per layer, one line per role (ActivationQuantError rows)."""
    fig = Figure(figsize=(_width_for_layers(_n_layers(modules)) + 1.5, 7.0), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    label = ""
    if modules:
        first = modules[0]
        label = f" ({first.format} {first.granularity}" + (f" g{first.group_size}" if first.group_size else "")
        label += f", {first.site}s)"
    _layer_lines(top, modules, lambda r: r.mse, "MSE", f"activation quantization error{label}")
    _layer_lines(bottom, modules, lambda r: r.rel_mse, "relative MSE  Σ(x−Q(x))² / Σx²", "relative error")
    return fig


def top_token_error_figure(rows: Sequence, top_k: int = 20) -> Figure:
    """The top tokens' mean per-token MSE (bars) and largest single error (markers), on a log
    axis because a few attention-sink tokens are orders of magnitude above the rest
    (TokenQuantError rows of the model scope)."""
    shown = [row for row in rows if row.scope == "model"][:top_k]
    fig = Figure(figsize=(8.0, max(3.0, 0.32 * len(shown) + 1.2)), layout="constrained")
    ax = fig.subplots()
    if not shown:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center")
        return fig
    positions = list(range(len(shown)))
    means = [row.mean_mse for row in shown]
    ax.barh(positions, means, color="tab:red", alpha=0.8, label="mean over modules and occurrences")
    ax.plot([row.max_mse for row in shown], positions, linestyle="none", marker="|", markersize=10,
            color="black", label="max")
    ax.set_yticks(positions, [f"{token_label(row.token)} ({row.occurrences}×)" for row in shown], fontsize=8)
    ax.invert_yaxis()  # rank 1 at the top
    if min(means) > 0:
        ax.set_xscale("log")
    ax.set_xlabel("per-token MSE (mean over features of one token row)")
    ax.set_title(f"top {len(shown)} tokens by quantization error ({shown[0].format} {shown[0].granularity})",
                 fontsize=10)
    ax.legend(fontsize=8, loc="lower right", frameon=False)
    ax.grid(True, axis="x", alpha=0.3)
    return fig


def fisher_figure(modules: Sequence) -> Figure:
    """Mean Fisher information per window, per layer, one line per role (ActivationFisher rows)."""
    fig = Figure(figsize=(_width_for_layers(_n_layers(modules)) + 1.5, 4.5), layout="constrained")
    ax = fig.subplots()
    _layer_lines(ax, modules, lambda r: r.fisher_mean, "mean over windows of Σ (∂L/∂x)²",
                 "activation Fisher information")
    return fig


def fgmp_figure(modules: Sequence, blocks: Sequence) -> Figure:
    """Left: FGMP sensitivity per layer per role. Right: histogram of log10 block sensitivity
    with the keep-high threshold (FgmpSensitivity and FgmpBlockSensitivity rows)."""
    fig = Figure(figsize=(_width_for_layers(_n_layers(modules)) + 6.0, 4.5), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[3, 2])
    formats = f"{modules[0].low_format} vs {modules[0].high_format}, block {modules[0].block_size}" if modules else ""
    _layer_lines(left, modules, lambda r: r.sensitivity, "Σ g²·(Q_low(x) − Q_high(x))²",
                 f"FGMP sensitivity ({formats})")
    positive = [b.sensitivity for b in blocks if b.sensitivity > 0]
    if positive:
        logs = [math.log10(v) for v in positive]
        right.hist(logs, bins=min(60, max(10, int(math.sqrt(len(logs))))), color="tab:blue", alpha=0.8)
        kept = [b.sensitivity for b in blocks if b.high and b.sensitivity > 0]
        if kept:
            right.axvline(math.log10(min(kept)), color="tab:red", linestyle="--",
                          label=f"keep-high threshold ({len(kept)}/{len(blocks)} blocks)")
            right.legend(fontsize=8, frameon=False)
        right.set_yscale("log")
    else:
        right.text(0.5, 0.5, "no positive block sensitivity", transform=right.transAxes, ha="center", va="center")
    right.set_xlabel("log10 block sensitivity")
    right.set_ylabel("blocks")
    right.set_title("block sensitivity distribution", fontsize=10)
    return fig


__all__ = ["quant_error_figure", "top_token_error_figure", "fisher_figure", "fgmp_figure", "token_label"]


# -- figure sets of the registered analyses (llmprobe.catalog.activations) ---------------------


def quant_error_figures(result, o):
    return [("quant_error_per_layer", quant_error_figure(result.tables["quant_error"]))]


def top_token_error_figures(result, o):
    return [("top_token_error", top_token_error_figure(result.tables["top_token_error"], o.top_k))]


def fisher_figures(result, o):
    return [("fisher_per_layer", fisher_figure(result.tables["fisher"]))]


def fgmp_figures(result, o):
    return [("fgmp_sensitivity", fgmp_figure(result.tables["fgmp"], result.tables["fgmp_blocks"]))]
