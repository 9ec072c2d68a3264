"""Figures for ``weights embeddings``: the F-vs-k curve (``anova_curve``, seed 003's name) and
the cluster sizes.

Plain :class:`matplotlib.figure.Figure` objects on the Agg backend (no pyplot state), saved by
the CLI through ``RunOutput.save_figure``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")

from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

# Above this many clusters the size bars drop their per-bar token labels (they would overlap).
MAX_LABELLED_BARS = 40


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


def f_curve(scan: Sequence, *, title: str = "variance-ratio F (Calinski–Harabasz) vs k") -> Figure:
    """F on the fit sample against k, coarse and fine points marked apart, the chosen k as a
    vertical line; silhouette (where computed) on a second axis."""
    rows = sorted(scan, key=lambda r: r.k)
    fig = Figure(figsize=(8.0, 4.2), layout="constrained")
    ax = fig.add_subplot()
    points = [(r.k, r.calinski_harabasz) for r in rows if _finite(r.calinski_harabasz)]
    if points:
        ks, fs = zip(*points)
        ax.plot(ks, fs, color="tab:blue", linewidth=1.2, label="F (fit sample)")
    for stage, marker in (("coarse", "o"), ("fine", "x")):
        staged = [(r.k, r.calinski_harabasz) for r in rows if r.stage == stage and _finite(r.calinski_harabasz)]
        if staged:
            ax.scatter(*zip(*staged), marker=marker, color="tab:blue", s=22, label=f"{stage} grid", zorder=3)
    chosen = next((r for r in rows if r.chosen), None)
    if chosen is not None:
        ax.axvline(chosen.k, color="tab:red", linestyle="--", linewidth=1.0,
                   label=f"chosen k = {chosen.k} (F = {chosen.calinski_harabasz:.4g})")
    # k spans 2..max_k geometrically: a log axis keeps the dense small-k end readable.
    if rows and rows[-1].k / rows[0].k > 20:
        ax.set_xscale("log")
        # Label the coarse grid's k values themselves, not powers of ten.
        coarse = [r.k for r in rows if r.stage == "coarse"]
        ax.set_xticks(coarse, [str(k) for k in coarse])
        ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("k (clusters)")
    ax.set_ylabel("F = between / within variance ratio")
    ax.grid(True, alpha=0.3)
    silhouettes = [(r.k, r.silhouette) for r in rows if _finite(r.silhouette)]
    handles, labels = ax.get_legend_handles_labels()
    if silhouettes:
        twin = ax.twinx()
        twin.plot(*zip(*silhouettes), color="tab:green", linewidth=1.0, marker=".", label="silhouette (sample)")
        twin.set_ylabel("silhouette", color="tab:green")
        more_handles, more_labels = twin.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    if handles:
        ax.legend(handles, labels, fontsize=8, loc="upper right", frameon=False)
    ax.set_title(title, fontsize=10)
    return fig


def cluster_sizes(clusters: Sequence, *, title: str = "cluster sizes") -> Figure:
    """Bars of cluster size; each bar labelled with its nearest-to-centroid token when there
    are few enough clusters to read them."""
    rows = sorted(clusters, key=lambda r: r.cluster)
    fig = Figure(figsize=(min(24.0, max(6.0, 2.5 + 0.25 * len(rows))), 4.2), layout="constrained")
    ax = fig.add_subplot()
    positions = list(range(len(rows)))
    sizes = [r.size for r in rows]
    ax.bar(positions, sizes, color="tab:blue")
    if sizes and min(sizes) > 0 and max(sizes) / min(sizes) > 100:
        ax.set_yscale("log")
    labels = [str(r.cluster) for r in rows]
    if len(rows) <= MAX_LABELLED_BARS:
        for i, r in enumerate(rows):
            if r.representative_tokens:
                first = r.representative_tokens[0]
                if first is not None:
                    # repr keeps whitespace tokens (" ", "\n") visible; cut long ones.
                    text = repr(first)
                    labels[i] = f"{r.cluster}: {text if len(text) <= 14 else text[:13] + '…'}"
        ax.set_xticks(positions)
        ax.set_xticklabels(labels, rotation=90, fontsize=7)
    ax.set_xlabel("cluster" + (" (nearest token)" if len(rows) <= MAX_LABELLED_BARS else ""))
    ax.set_ylabel("rows (tokens)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(title, fontsize=10)
    return fig


def embedding_figures(result, o):
    """F against k, and the cluster sizes (llmprobe.catalog.weights)."""
    embedding = result.data["embedding"]
    name = embedding.summary.tensor
    return [("anova_curve", f_curve(embedding.scan, title=f"{name}: variance-ratio F vs k")),
            ("cluster_sizes", cluster_sizes(embedding.clusters,
                                            title=f"{name}: cluster sizes (k = {embedding.summary.chosen_k})"))]
