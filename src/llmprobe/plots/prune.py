"""Figures of the prune commands.

* ``layer_metrics_figures``: seed 004's 3x3 panel, with the real Wanda metric. Rows: |W|, the
  per-input-channel activation norm sqrt(s_j) (s_j = mean x_j^2), the Wanda score |W|*sqrt(s).
  Columns: the matrix (heatmap; bars for the norm), its histogram (log-spaced bins, log
  counts), its statistics. Matrices larger than the panel are max-pooled, never cropped, and
  the pooling factor is written on the axis.
* ``prune_figures``: target/achieved sparsity per layer (with OWL's outlier ratio), the
  reconstruction error per layer and role, perplexity before/after.
"""

from __future__ import annotations

import math
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")

import numpy as np
from matplotlib.figure import Figure

from ..core.modulemap import ROLES

_QUANTITIES = (("weight_abs", "|W|"), ("activation_norm", "activation norm sqrt(s_j)"),
               ("wanda_score", "Wanda score |W|·sqrt(s_j)"))


def _pooled_label(axis: str, factor: int) -> str:
    return f"{axis} (max-pooled ×{factor})" if factor > 1 else axis


def _histogram(ax, hist: dict, title: str) -> None:
    edges, counts = hist.get("edges") or [], hist.get("counts") or []
    if edges:
        ax.stairs(counts, edges, fill=True, alpha=0.7)
        ax.set_xscale("log")
        if max(counts) > 0:
            ax.set_yscale("log")
    zeros = hist.get("zeros", 0)
    ax.set_title(f"{title}: histogram" + (f" ({zeros} exact zeros not shown)" if zeros else ""), fontsize=9)
    ax.set_xlabel("value (log-spaced bins)")
    ax.set_ylabel("count")


def _stats_panel(ax, row, title: str) -> None:
    ax.axis("off")
    if row is None:
        return
    lines = [f"{title}", f"shape {row.shape}   n = {row.count:,}", "",
             f"mean   {row.mean:.4g}", f"std    {row.std:.4g}", f"min    {row.min:.4g}", f"p01    {row.p01:.4g}",
             f"p25    {row.p25:.4g}", f"median {row.median:.4g}", f"p75    {row.p75:.4g}", f"p99    {row.p99:.4g}",
             f"max    {row.max:.4g}"]
    if row.mean > 0:
        lines.append(f"max/mean {row.max / row.mean:.3g}")
    ax.text(0.02, 0.98, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=9,
            transform=ax.transAxes)


def layer_metrics_figures(tables: dict, docs: dict) -> list[tuple[str, Figure]]:
    doc = docs["layer_metrics"]
    stats = {row.quantity: row for row in tables["layer_metrics"]}
    fig = Figure(figsize=(17, 13))
    axes = fig.subplots(3, 3, gridspec_kw={"width_ratios": [1.5, 1, 0.7]})
    rows_label = _pooled_label("output row", doc["row_factor"])
    cols_label = _pooled_label("input channel", doc["col_factor"])
    for r, (key, title) in enumerate(_QUANTITIES):
        ax = axes[r, 0]
        if key == "activation_norm":
            bars = np.asarray(doc["activation_norm_pooled"], dtype=float)
            ax.bar(np.arange(bars.size), bars, width=1.0)
            ax.set_xlabel(_pooled_label("input channel", doc["bar_factor"]))
            ax.set_ylabel("sqrt(mean x_j²)")
            ax.set_xlim(-0.5, bars.size - 0.5)
            ax.set_title(f"{title} per input channel", fontsize=9)
        else:
            values = np.asarray(doc[f"{key}_pooled"], dtype=float)
            image = ax.imshow(values, aspect="auto", interpolation="nearest", cmap="viridis")
            fig.colorbar(image, ax=ax, fraction=0.04)
            ax.set_xlabel(cols_label)
            ax.set_ylabel(rows_label)
            ax.set_title(f"{title} heatmap", fontsize=9)
        _histogram(axes[r, 1], doc["histograms"][key], title)
        _stats_panel(axes[r, 2], stats.get(key), title)
    fig.suptitle(f"{doc['module']}  ({doc['shape'][0]}×{doc['shape'][1]}, "
                 f"{doc['calibration_tokens']:,} calibration tokens)")
    fig.tight_layout()
    return [(f"layer_metrics_{doc['module']}", fig)]


def _role_key(role: str) -> int:
    return ROLES.index(role) if role in ROLES else len(ROLES)


def prune_figures(tables: dict, docs: dict | None = None) -> list[tuple[str, Figure]]:
    figures: list[tuple[str, Figure]] = []
    layers = tables.get("pruned_layers") or []
    if layers:
        fig = Figure(figsize=(min(24, max(7, 2 + 0.3 * len(layers))), 4.5))
        ax = fig.subplots()
        x = [r.layer for r in layers]
        ax.bar(x, [r.achieved_sparsity for r in layers], color="tab:blue", alpha=0.6, label="achieved")
        ax.plot(x, [r.target_sparsity for r in layers], "k_", markersize=14, mew=2, label="target")
        ax.set_xlabel("layer")
        ax.set_ylabel("sparsity")
        ax.set_ylim(0, 1)
        if any(r.outlier_ratio is not None for r in layers):
            twin = ax.twinx()
            twin.plot(x, [100 * (r.outlier_ratio or 0) for r in layers], "o-", color="tab:red",
                      label="OWL outlier ratio")
            twin.set_ylabel("outlier ratio (%)", color="tab:red")
            twin.legend(loc="upper right", fontsize=8, frameon=False)
        ax.legend(loc="upper left", fontsize=8, frameon=False)
        ax.set_title("sparsity per layer")
        fig.tight_layout()
        figures.append(("prune_layers", fig))
    matrices = [r for r in tables.get("pruned_matrices") or [] if r.reconstruction_error is not None]
    if matrices:
        by_role: dict[str, list] = defaultdict(list)
        for r in matrices:
            by_role[r.role].append((r.layer, r.reconstruction_error))
        fig = Figure(figsize=(min(24, max(7, 2 + 0.3 * len(layers))), 4.5))
        ax = fig.subplots()
        for role in sorted(by_role, key=_role_key):
            points = sorted(by_role[role])
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", markersize=3, label=role)
        positive = [r.reconstruction_error for r in matrices if r.reconstruction_error > 0]
        if positive and max(positive) / min(positive) > 100:
            ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel("‖WX − W′X‖² / ‖WX‖²")
        ax.set_title(f"reconstruction error on the calibration inputs ({matrices[0].method}, {matrices[0].pattern})")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        fig.tight_layout()
        figures.append(("prune_reconstruction_error", fig))
    ppl = tables.get("prune_perplexity") or []
    if ppl:
        fig = Figure(figsize=(4.5, 4))
        ax = fig.subplots()
        values = [r.ppl for r in ppl]
        ax.bar([r.stage for r in ppl], values, color=["tab:gray", "tab:blue"][:len(ppl)])
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.4g}" if math.isfinite(v) else "inf", ha="center", va="bottom")
        ax.set_ylabel("perplexity")
        ax.set_title(f"{ppl[0].dataset or 'eval'}, {ppl[0].windows} windows × {ppl[0].seqlen}")
        fig.tight_layout()
        figures.append(("prune_perplexity", fig))
    return figures


def prune_result_figures(result, options) -> list[tuple[str, Figure]]:
    return prune_figures(result.tables, result.documents)


def layer_metrics_result_figures(result, options) -> list[tuple[str, Figure]]:
    return layer_metrics_figures(result.tables, result.data)
