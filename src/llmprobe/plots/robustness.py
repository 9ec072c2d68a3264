"""Figures for the robustness commands: ablation ranking and layer × role heatmaps, block
similarity against measured Δppl, noise curves, the bit-position chart, and the super-weight
spike plot. Non-finite values are never drawn at a fake height: ranking bars mark them with a
label, heatmap cells stay blank (hatched), curves break."""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch as LegendPatch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from ..core.modulemap import ROLES  # noqa: E402

Figures = list[tuple[str, Figure]]


def _finite(value) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


def ablation_ranking(rows: Sequence, top: int = 30) -> Figure:
    """Horizontal bars of Δppl for the ``top`` most damaging targets, KL as a second axis."""
    shown = list(rows)[:top]
    fig = Figure(figsize=(9, 0.28 * len(shown) + 1.6))
    ax = fig.add_subplot(1, 1, 1)
    labels = [r.target for r in shown][::-1]
    values = [r.delta_ppl for r in shown][::-1]
    ys = np.arange(len(shown))
    finite = [v if _finite(v) else 0.0 for v in values]
    ax.barh(ys, finite, color=["tab:red" if _finite(v) else "lightgray" for v in values])
    for y, v in zip(ys, values):
        if not _finite(v):
            ax.text(0, y, f"  {v}", va="center", fontsize=7)
    ax.set_yticks(ys, labels, fontsize=7)
    positive = [v for v in finite if v > 0]
    if positive and max(positive) / max(min(positive), 1e-12) > 1e3:
        ax.set_xscale("symlog", linthresh=max(min(positive), 1e-3))
    ax.set_xlabel("Δppl (ablated − unmodified)")
    kl_ax = ax.twiny()
    kls = [r.kl for r in shown][::-1]
    kl_ax.plot([k if _finite(k) else np.nan for k in kls], ys, "o", color="tab:blue", markersize=3)
    kl_ax.set_xlabel("mean KL(unmodified ‖ ablated), nats (dots)", color="tab:blue", fontsize=8)
    gran = shown[0].granularity if shown else ""
    ax.set_title(f"Ablation ranking ({gran}, top {len(shown)})", fontsize=10)
    fig.tight_layout()
    return fig


def ablation_heatmap(rows: Sequence, value: str = "delta_ppl") -> Figure:
    """Layer × role heatmap of ``value`` (Δppl or KL); blank cells: not measured or non-finite."""
    layers = sorted({r.layer for r in rows})
    roles = [role for role in ROLES if role in {r.role for r in rows}] or sorted({r.role for r in rows})
    roles += sorted({r.role for r in rows} - set(roles))
    grid = np.full((len(roles), len(layers)), np.nan)
    for r in rows:
        v = getattr(r, value)
        if _finite(v):
            grid[roles.index(r.role), layers.index(r.layer)] = v
    fig = Figure(figsize=(min(22, 3 + 0.3 * len(layers)), 1.2 + 0.4 * len(roles)))
    ax = fig.add_subplot(1, 1, 1)
    ax.set_facecolor("lightgray")
    data = np.ma.masked_invalid(grid)
    positive = data.compressed()
    if positive.size and positive.min() > 0 and positive.max() / positive.min() > 100:
        from matplotlib.colors import LogNorm
        image = ax.imshow(data, aspect="auto", cmap="magma_r", norm=LogNorm(positive.min(), positive.max()))
    else:
        image = ax.imshow(data, aspect="auto", cmap="magma_r")
    fig.colorbar(image, ax=ax, label=value)
    ax.set_xticks(range(len(layers)), [str(layer) for layer in layers], fontsize=7)
    ax.set_yticks(range(len(roles)), roles, fontsize=8)
    ax.set_xlabel("layer")
    ax.set_title(f"{value} per layer and role (gray: not measured / non-finite)", fontsize=10)
    fig.tight_layout()
    return fig


def block_similarity_plot(sims: Sequence) -> Figure:
    """BI and angular distance per block, with the measured block-ablation Δppl when present."""
    fig = Figure(figsize=(min(22, 4 + 0.25 * len(sims)), 4))
    ax = fig.add_subplot(1, 1, 1)
    xs = [s.layer for s in sims]
    ax.plot(xs, [s.block_influence for s in sims], marker="o", markersize=3, label="Block Influence")
    span = sims[0].span if sims else 1
    ax.plot(xs, [s.angular_distance for s in sims], marker="s", markersize=3, label=f"angular distance (n={span})")
    ax.set_xlabel("layer")
    ax.set_ylabel("BI / angular distance")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=16))
    measured = [(s.layer, s.block_delta_ppl) for s in sims if _finite(s.block_delta_ppl)]
    if measured:
        other = ax.twinx()
        other.plot(*zip(*measured), color="tab:red", marker="^", markersize=3, linewidth=1, label="Δppl (block skipped)")
        other.set_ylabel("Δppl (block skipped)", color="tab:red")
        if min(v for _, v in measured) > 0:
            other.set_yscale("log")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("One-pass block similarity vs measured block ablation", fontsize=10)
    fig.tight_layout()
    return fig


def noise_curves(summary: Sequence) -> Figure:
    """ppl and KL against σ (mean ± std over repeats), one line per target."""
    fig = Figure(figsize=(11, 4))
    axes = [fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)]
    targets = list(dict.fromkeys(s.target for s in summary))
    for target in targets[:12]:
        rows = sorted((s for s in summary if s.target == target), key=lambda s: s.sigma)
        sig = [s.sigma for s in rows]
        for ax, key in zip(axes, ("ppl", "kl")):
            mean = np.array([getattr(s, f"{key}_mean") for s in rows], dtype=float)
            std = np.array([getattr(s, f"{key}_std") for s in rows], dtype=float)
            mean[~np.isfinite(mean)] = np.nan
            ax.plot(sig, mean, marker="o", markersize=3, label=target)
            ok = np.isfinite(std)
            if ok.any():
                ax.fill_between(np.array(sig)[ok], (mean - std)[ok], (mean + std)[ok], alpha=0.2)
    dist = summary[0].distribution if summary else ""
    scale = "σ·std(W)" if summary and summary[0].scale == "relative" else "σ (absolute)"
    for ax, label in zip(axes, ("perplexity", "mean KL(unmodified ‖ noisy), nats")):
        ax.set_xlabel(f"noise scale: {scale}")
        ax.set_ylabel(label)
        ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{dist} weight noise (mean ± std over repeats)", fontsize=10)
    fig.tight_layout()
    return fig


def bit_position_chart(flips: Sequence, positions: Sequence) -> Figure:
    """Δloss of every flip per bit position (dots; non-finite at the top, marked ×), median bars,
    bit roles coloured."""
    fig = Figure(figsize=(12, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    colors = {"sign": "tab:red", "exponent": "tab:orange", "mantissa": "tab:blue"}
    finite = [f.delta_loss for f in flips if _finite(f.delta_loss)]
    top = max([abs(v) for v in finite] + [1e-6]) * 3
    linthresh = 1e-4
    for p in positions:
        if _finite(p.delta_loss_median):
            ax.bar(p.bit, p.delta_loss_median, color=colors[p.bit_role], alpha=0.35, width=0.8)
    for f in flips:
        if _finite(f.delta_loss):
            ax.plot(f.bit, f.delta_loss, ".", color=colors[f.bit_role], markersize=4)
        else:
            ax.plot(f.bit, top, "x", color="black", markersize=6)
    ax.set_yscale("symlog", linthresh=linthresh)
    ax.set_xlabel("bit position (0 = least significant mantissa bit)")
    ax.set_ylabel("Δloss (nats); × = inf/NaN")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=33))
    handles = [LegendPatch(color=c, label=r) for r, c in colors.items()]
    ax.legend(handles=handles, fontsize=8)
    dtype = positions[0].dtype if positions else ""
    ax.set_title(f"Bit flips in {dtype}: Δloss per bit position (bars: median of finite flips)", fontsize=10)
    fig.tight_layout()
    return fig


def super_weight_spikes(spikes: Sequence, massive: Sequence = ()) -> Figure:
    """max|x| of every down projection's input and output per layer on the intact model, with the
    thresholds; and the residual-stream max|h| intact vs super weights zeroed."""
    first = [s for s in spikes if s.iteration == 0]
    fig = Figure(figsize=(min(22, 6 + 0.25 * len(first)), 7 if massive else 4))
    ax = fig.add_subplot(2 if massive else 1, 1, 1)
    xs = [s.layer for s in first]
    ax.plot(xs, [s.input_max for s in first], marker="o", markersize=3, label="down_proj input max|x|")
    ax.plot(xs, [s.output_max for s in first], marker="s", markersize=3, label="down_proj output max|x|")
    if first:
        ax.axhline(first[0].input_threshold, color="tab:blue", linestyle=":", linewidth=1)
        ax.axhline(first[0].output_threshold, color="tab:orange", linestyle=":", linewidth=1, label="thresholds")
    for s in first:
        if s.spike:
            ax.annotate(f"[{s.output_channel},{s.input_channel}]", (s.layer, s.output_max), fontsize=7,
                        textcoords="offset points", xytext=(2, 4))
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("max|x|")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=16))
    ax.legend(fontsize=8)
    ax.set_title("Super-weight search: spikes of the MLP down projection (labels: W_down[row, col])", fontsize=10)
    if massive:
        bx = fig.add_subplot(2, 1, 2)
        bx.plot([m.layer for m in massive], [m.max_abs for m in massive], marker="o", markersize=3, label="intact")
        bx.plot([m.layer for m in massive], [m.max_abs_zeroed for m in massive], marker="s", markersize=3,
                label="super weights zeroed")
        bx.set_yscale("log")
        bx.set_xlabel("layer")
        bx.set_ylabel("residual max|h|")
        bx.legend(fontsize=8)
        bx.set_title("Massive activations in the residual stream", fontsize=10)
    fig.tight_layout()
    return fig


def ablation_figures(tables: dict) -> Figures:
    rows = tables.get("ablation", [])
    figures: Figures = []
    if rows:
        figures.append(("ablation_ranking", ablation_ranking(rows)))
        if rows[0].granularity != "block":
            figures.append(("ablation_heatmap_delta_ppl", ablation_heatmap(rows, "delta_ppl")))
            figures.append(("ablation_heatmap_kl", ablation_heatmap(rows, "kl")))
    if tables.get("block_similarity"):
        figures.append(("block_similarity", block_similarity_plot(tables["block_similarity"])))
    return figures


def noise_figures(tables: dict) -> Figures:
    return [("noise_curves", noise_curves(tables["noise_summary"]))] if tables.get("noise_summary") else []


def bit_flip_figures(tables: dict) -> Figures:
    if not tables.get("bit_flips"):
        return []
    return [("bit_positions", bit_position_chart(tables["bit_flips"], tables["bit_positions"]))]


def super_weight_figures(tables: dict) -> Figures:
    if not tables.get("down_proj_spikes"):
        return []
    return [("super_weight_spikes", super_weight_spikes(tables["down_proj_spikes"], tables.get("massive_activations", [])))]


# -- figure sets of the registered analyses: (result, options) -> [(stem, figure)] ----------------


def ablation_figures_job(result, options) -> Figures:
    return ablation_figures(result.tables)


def noise_figures_job(result, options) -> Figures:
    return noise_figures(result.tables)


def bit_flip_figures_job(result, options) -> Figures:
    return bit_flip_figures(result.tables)


def super_weight_figures_job(result, options) -> Figures:
    return super_weight_figures(result.tables)


def adversarial_chart(summary: Sequence) -> Figure:
    """Δloss (mean ± std) and last-position greedy agreement per attack against its budget; one
    panel per budget unit, since token counts, character rates and ε do not share an axis."""
    units = list(dict.fromkeys(s.unit for s in summary))
    fig = Figure(figsize=(4.2 * len(units), 4))
    for i, unit in enumerate(units, 1):
        ax = fig.add_subplot(1, len(units), i)
        for attack in dict.fromkeys(s.attack for s in summary if s.unit == unit):
            rows = sorted((s for s in summary if s.attack == attack), key=lambda s: s.budget)
            xs = [s.budget for s in rows]
            mean = np.array([s.delta_loss_mean if _finite(s.delta_loss_mean) else np.nan for s in rows])
            std = np.array([s.delta_loss_std if _finite(s.delta_loss_std) else 0.0 for s in rows])
            ax.errorbar(xs, mean, yerr=std, marker="o", markersize=4, capsize=3, label=attack)
        ax.set_xlabel(unit)
        ax.set_ylabel("Δloss (nats)")
        ax.legend(fontsize=8)
    fig.suptitle("Adversarial inputs: Δ next-token loss per attack and budget", fontsize=10)
    fig.tight_layout()
    return fig


def adversarial_figures_job(result, options) -> Figures:
    summary = result.tables.get("adversarial_summary", [])
    return [("adversarial", adversarial_chart(summary))] if summary else []
