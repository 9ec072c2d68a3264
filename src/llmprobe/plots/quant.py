"""Figures for ``quant plan`` (formats per layer and role, sensitivity per candidate) and
``quant eval --sweep`` (perplexity and KL against average bits for the plan, uniform and random
plans). Built on :class:`matplotlib.figure.Figure` directly (no pyplot state), Agg backend."""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")

from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from ..core.modulemap import ROLES  # noqa: E402

Figures = list[tuple[str, Figure]]


def _element_bits(fmt: str) -> float:
    from ..analyses.quant_plan import element_bits

    return element_bits(fmt)


def plan_figures(tables: dict[str, Sequence]) -> Figures:
    """quant_plan_formats: the chosen element width per module (layer × role grid);
    quant_sensitivity: each candidate's summed sensitivity per layer (log scale)."""
    figures: Figures = []
    plan_rows = list(tables.get("quant_plan", ()))
    if plan_rows:
        roles = [r for r in ROLES if any(row.role == r for row in plan_rows)]
        roles += sorted({row.role for row in plan_rows} - set(roles))
        layers = sorted({row.layer for row in plan_rows if row.layer is not None})
        if layers:
            grid = [[math.nan] * len(layers) for _ in roles]
            for row in plan_rows:
                if row.layer is not None:
                    grid[roles.index(row.role)][layers.index(row.layer)] = _element_bits(row.format)
            fig = Figure(figsize=(min(22.0, max(6.0, 2.0 + 0.3 * len(layers))), 1.2 + 0.45 * len(roles)))
            ax = fig.add_subplot(1, 1, 1)
            image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
            ax.set_yticks(range(len(roles)), roles, fontsize=8)
            ax.set_xticks(range(len(layers)), [str(layer) for layer in layers], fontsize=7)
            ax.set_xlabel("layer")
            fig.colorbar(image, ax=ax, label="bits per element")
            summary = list(tables.get("quant_plan_summary", ()))
            title = "chosen format per module"
            if summary:
                s = summary[0]
                title += f" — {s.plan_avg_bits:.3f} avg bits (budget {s.budget_avg_bits:g}), metric {s.metric}"
            ax.set_title(title, fontsize=10)
            fig.tight_layout()
            figures.append(("quant_plan_formats", fig))
    sens_rows = list(tables.get("quant_sensitivity", ()))
    if sens_rows and any(r.layer is not None for r in sens_rows):
        fig = Figure(figsize=(8, 4.5))
        ax = fig.add_subplot(1, 1, 1)
        formats = sorted({r.format for r in sens_rows}, key=lambda f: (_element_bits(f), f))
        for fmt in formats:
            per_layer: dict[int, float] = {}
            for r in sens_rows:
                if r.format == fmt and r.layer is not None:
                    per_layer[r.layer] = per_layer.get(r.layer, 0.0) + r.sensitivity
            points = sorted((k, v) for k, v in per_layer.items() if v > 0 and math.isfinite(v))
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", markersize=3, label=fmt)
        if ax.lines:
            ax.set_yscale("log")
            ax.legend(fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=16))
        ax.set_xlabel("layer")
        ax.set_ylabel(f"Σ sensitivity ({sens_rows[0].metric})")
        ax.set_title("sensitivity per layer and candidate format", fontsize=10)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        figures.append(("quant_sensitivity", fig))
    return figures


_STYLE = {"plan": dict(color="C0", marker="o", linestyle="-", label="plan"),
          "uniform": dict(color="C3", marker="s", linestyle="--", label="uniform"),
          "random": dict(color="0.55", marker=".", linestyle="none", label="random plans")}


def sweep_figures(tables: dict[str, Sequence]) -> Figures:
    """quant_sweep: perplexity (log) and mean KL against the plans' average bits."""
    rows = list(tables.get("quant_sweep", ()) or tables.get("quant_eval", ()))
    if not rows:
        return []
    fig = Figure(figsize=(11, 4.5))
    panels = (("ppl", "perplexity"), ("kl_mean", "mean KL(unquantized ‖ quantized), nats"))
    for index, (field, ylabel) in enumerate(panels):
        ax = fig.add_subplot(1, 2, index + 1)
        for kind in ("random", "uniform", "plan"):
            points = sorted((r.avg_bits, getattr(r, field)) for r in rows if r.kind == kind)
            points = [(x, y) for x, y in points if math.isfinite(y) and y > 0]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, markersize=8 if kind == "random" else 6, **_STYLE[kind])
        if field == "ppl":
            ax.axhline(rows[0].base_ppl, color="k", linewidth=0.8, linestyle=":", label="unquantized")
        ax.set_yscale("log")
        ax.set_xlabel("average bits per parameter (scales included)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("mixed-precision plan vs uniform and random plans of the same size", fontsize=10)
    fig.tight_layout()
    return [("quant_sweep", fig)]


def plan_result_figures(result, options) -> Figures:
    return plan_figures(result.tables)


def eval_result_figures(result, options) -> Figures:
    return sweep_figures(result.tables)
