"""Figures of ``report diff``: one metric of two runs overlaid across layers, one small panel
per role, so a change in one role is not averaged away by the others."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

COLUMNS = 4


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def overlay_by_layer(rows: Sequence[dict], *, title: str, ylabel: str, labels: tuple[str, str]) -> Figure:
    """``rows``: dicts with ``layer`` (int or None), ``role``, ``a`` and ``b`` (float or None).

    Panels: one per role with a layer index, in the order roles first appear in ``rows`` (the
    tables list modules in model order), A solid and B dashed; a log axis where a panel's values
    are all positive and span more than two decades. The layout is fixed (no constrained layout):
    drawing stays one pass, which matters with 7+ panels on a busy machine.
    """
    by_role: dict[str, list[tuple[int, float | None, float | None]]] = defaultdict(list)
    for row in rows:
        if row.get("layer") is None:
            continue
        by_role[str(row["role"])].append((int(row["layer"]), row.get("a"), row.get("b")))
    roles = list(by_role) or ["(no layers)"]
    ncols = min(COLUMNS, len(roles))
    nrows = math.ceil(len(roles) / ncols)
    height = 2.4 * nrows + 0.8
    fig = Figure(figsize=(3.4 * ncols + 0.8, height))
    fig.subplots_adjust(left=0.8 / (3.4 * ncols + 0.8), right=0.98, bottom=0.55 / height, top=1 - 0.55 / height,
                        wspace=0.3, hspace=0.5)
    fig.suptitle(title, fontsize=11)
    for i, role in enumerate(roles):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        points = sorted(by_role.get(role, []))
        values = []
        for index, (label, style) in enumerate(((labels[0], "-"), (labels[1], "--"))):
            xy = [(layer, pair[index]) for layer, *pair in points if _finite(pair[index])]
            if xy:
                xs, ys = zip(*xy)
                ax.plot(xs, ys, style, marker="o" if index == 0 else "x", markersize=3, linewidth=1.2, label=label)
                values.extend(ys)
        positive = [v for v in values if v > 0]
        if positive and len(positive) == len(values) and max(positive) / min(positive) > 100:
            ax.set_yscale("log")
        if not values:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center")
        ax.set_title(role, fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=8))
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
        if i % ncols == 0:
            ax.set_ylabel(ylabel, fontsize=8)
        if i >= len(roles) - ncols:
            ax.set_xlabel("layer", fontsize=8)
        if i == 0:
            ax.legend(fontsize=7, frameon=False)
    return fig
