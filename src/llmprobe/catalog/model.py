"""`llmprobe model`: structure from the config, no weights loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..options import OUTPUT, ModelOptions, OutputOptions, SelectionOptions, option
from ..registry import Analysis, register, register_group

register_group("model", "Model structure: info and layer census.")


class InfoOptions(ModelOptions, OutputOptions):
    out: Optional[Path] = option(None, "--out", "-o", panel=OUTPUT, help="Also write model_info.csv/json here.")


register(Analysis(
    name="model.info",
    help="Parameters, layers, hidden size, heads / kv heads, vocab, rope, dtype, bytes on disk.",
    options=InfoOptions,
    needs=("source",),
    compute="llmprobe.analyses.model_info:info_job",
    printer="llmprobe.cli.printers:model_info",
    json_table="model_info",
    writes_by_default=False,
))


class LayersOptions(ModelOptions, SelectionOptions, OutputOptions):
    pass


register(Analysis(
    name="model.layers",
    help="Census of module types (count, example paths) and every linear module with layer, role, shape.",
    options=LayersOptions,
    needs=("source",),
    prepare="llmprobe.analyses.model_info:prepare_layers_job",
    compute="llmprobe.analyses.model_info:layers_job",
    printer="llmprobe.cli.printers:model_layers",
    json_table="linear_modules",
))
