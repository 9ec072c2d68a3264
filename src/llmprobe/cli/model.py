"""`llmprobe model` commands: structure from the config, no weights loaded."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..analyses.model_info import layer_census, model_info, structure_map
from ..core import progress
from .activations import LayersOpt, RolesOpt, parse_layers
from .common import (
    JsonOpt,
    ModelOpt,
    OutOpt,
    OverwriteOpt,
    QuietOpt,
    RevisionOpt,
    TrustRemoteCodeOpt,
    emit,
    emit_done,
    open_run,
    source_from,
)

app = typer.Typer(no_args_is_help=True)


@app.command("info")
def info_command(
    model: ModelOpt = None,
    revision: RevisionOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Also write model_info.csv/json here.")] = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Parameters, layers, hidden size, heads / kv heads, vocab, rope, dtype, bytes on disk."""
    if quiet:
        progress.set_quiet(True)
    source = source_from(model, revision, trust_remote_code)
    row = model_info(source)
    if out is not None:
        from pathlib import Path

        with open_run("model", "info", source, Path(out), overwrite, quiet=quiet) as run:
            run.write_table("model_info", [row])
    if json_out:
        emit([row], as_json=True, title="model info")
        return
    from rich.table import Table

    from .common import stdout_console

    table = Table(title=f"model info: {row.model}", show_header=False)
    for key, value in row.row().items():
        shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
        table.add_row(key, shown)
    stdout_console.print(table)


@app.command("layers")
def layers_command(
    model: ModelOpt = None,
    roles: RolesOpt = None,
    layers: LayersOpt = None,
    regex: Annotated[Optional[str], typer.Option("--filter", help="Regex on module names.")] = None,
    revision: RevisionOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Census of module types (count, example paths) and every linear module with layer, role, shape."""
    source = source_from(model, revision, trust_remote_code)
    mmap = structure_map(source)
    census, linears = layer_census(mmap, roles=roles, layers=parse_layers(layers), regex=regex)
    with open_run("model", "layers", source, out, overwrite, quiet=quiet, layers=mmap.num_layers,
                  blocks_path=mmap.blocks_path) as run:
        run.write_table("module_census", census)
        run.write_table("linear_modules", linears)
    if json_out:
        emit(linears, as_json=True, title="linear modules")
        return
    emit(census, as_json=False, title="module census", columns=["type", "count", "parameters", "examples"])
    by_role: dict[str, list] = {}
    for row in linears:
        by_role.setdefault(row.role, []).append(row)
    from rich.table import Table

    from .common import stdout_console

    table = Table(title=f"linear modules by role ({len(linears)} in {mmap.num_layers} layers)")
    for col in ("role", "count", "shape (out x in)", "example"):
        table.add_column(col)
    for role, rows in by_role.items():
        shapes = sorted({f"{r.out_features}x{r.in_features}" for r in rows})
        table.add_row(role, str(len(rows)), ", ".join(shapes), rows[0].name)
    stdout_console.print(table)
    emit_done(run, json_out)
