"""Terminal summaries: the tables a command prints after it ran (``--json``: records instead).

Most analyses declare their summary as data (:class:`~llmprobe.registry.Show`); the few that
print something else name a function here.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

stdout_console = Console(soft_wrap=False)


def records_json(records: Sequence) -> None:
    from ..core.output import dumps_json

    sys.stdout.write(dumps_json([r.row() for r in records]))


def table(records: Sequence, *, title: str, columns: Sequence[str] | None = None, limit: int = 40,
          console: Console | None = None) -> None:
    console = console or Console(soft_wrap=False)
    if not records:
        console.print(f"[bold]{title}[/]: no rows")
        return
    rows = [r.row() for r in records]
    cols = list(columns) if columns else list(rows[0])
    view = Table(title=title, show_lines=False, header_style="bold")
    for col in cols:
        view.add_column(col, overflow="fold")
    for row in rows[:limit]:
        view.add_row(*(_fmt(row.get(c)) for c in cols))
    console.print(view)
    if len(rows) > limit:
        console.print(f"... {len(rows) - limit} more rows in the output files")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)[:60]
    return "" if value is None else str(value)


# -- custom summaries ---------------------------------------------------------------------------


def model_info(result, options, console: Console) -> None:
    row = result.tables["model_info"][0]
    view = Table(title=f"model info: {row.model}", show_header=False)
    for key, value in row.row().items():
        shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
        view.add_row(key, shown)
    console.print(view)


def model_layers(result, options, console: Console) -> None:
    linears = result.tables["linear_modules"]
    table(result.tables["module_census"], title="module census", columns=["type", "count", "parameters", "examples"],
          console=console)
    by_role: dict[str, list] = {}
    for row in linears:
        by_role.setdefault(row.role, []).append(row)
    view = Table(title=f"linear modules by role ({len(linears)} in {result.manifest['layers']} layers)")
    for col in ("role", "count", "shape (out x in)", "example"):
        view.add_column(col)
    for role, rows in by_role.items():
        shapes = sorted({f"{r.out_features}x{r.in_features}" for r in rows})
        view.add_row(role, str(len(rows)), ", ".join(shapes), rows[0].name)
    console.print(view)


def bops(result, options, console: Console) -> None:
    o, summary = options, result.data["summary"]
    layers = [row for row in summary if row.scope == "layer"]
    table(layers, title=f"BOPs per token per layer (w{o.w_bits}a{o.a_bits}"
          + (f", block {o.block_size}" if o.block_size else "") + ")",
          columns=["layer_index", "modules", "macs", "bops", "baseline_fp16_bops", "ratio_to_fp16"], console=console)
    total = summary[-1]
    console.print(f"model: {total.bops:,} BOPs/token ({total.gbops:.4g} GBOPs), "
                  f"{total.ratio_to_fp16:.4g} x the fp16 baseline ({total.baseline_fp16_bops:,})")


def embeddings(result, options, console: Console) -> None:
    embedding = result.data["embedding"]
    table([embedding.summary], title="embedding clustering",
          columns=["rows", "dims", "fit_rows", "k_evaluated", "chosen_k", "calinski_harabasz", "silhouette",
                   "seconds"], console=console)
    table(embedding.clusters, title=f"clusters of {embedding.summary.tensor}",
          columns=["cluster", "size", "fraction", "mean_distance", "silhouette",
                   "representative_tokens" if result.data["has_tokenizer"] else "representative_ids"],
          console=console)
