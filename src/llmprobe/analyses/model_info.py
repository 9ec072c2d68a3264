"""Model structure without loading weights: `model info` and `model layers`.

Both work from the config alone: the architecture is instantiated on the meta device (no
memory), so a 70B model is described in about a second.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..core.errors import LLMProbeError
from ..core.loading import ModelSource, load_config
from ..core.modulemap import ModuleMap
from ..core.records import Record


class ModelInfo(Record):
    model: str
    source: str
    architecture: str
    model_class: str
    parameters: int
    embedding_parameters: int
    layers: int
    hidden_size: int | None
    intermediate_size: int | None
    heads: int | None
    kv_heads: int | None
    head_dim: int | None
    vocab_size: int | None
    max_positions: int | None
    rope_theta: float | None
    rope_type: str | None
    tie_word_embeddings: bool | None
    stored_dtype: str | None
    linear_modules: int
    bytes_on_disk: int | None


class ModuleTypeCount(Record):
    """One module type in the census (seed 004's layer census)."""

    type: str
    count: int
    parameters: int
    examples: str


class LinearModule(Record):
    """One linear module: the prunable-layers list (seed 004)."""

    name: str
    layer: int | None
    role: str
    in_features: int
    out_features: int
    parameters: int
    input_group: str
    transposed: bool


def _first(config, *names):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def _rope(config) -> tuple[float | None, str | None]:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    theta = theta if theta is not None else getattr(config, "rope_theta", None)
    kind = params.get("rope_type", params.get("type")) if isinstance(params, dict) else None
    if theta is None and kind is None:
        return None, None
    return (float(theta) if theta is not None else None), kind


def structure_map(source: ModelSource) -> ModuleMap:
    return ModuleMap.from_config(load_config(source), trust_remote_code=source.trust_remote_code)


def model_info(source: ModelSource, mmap: ModuleMap | None = None) -> ModelInfo:
    config = load_config(source)
    mmap = mmap or ModuleMap.from_config(config, trust_remote_code=source.trust_remote_code)
    net = mmap.model
    params = sum(p.numel() for p in net.parameters())  # shared (tied) parameters counted once
    embed = net.get_input_embeddings() if hasattr(net, "get_input_embeddings") else None
    heads = _first(config, "num_attention_heads", "n_head")
    hidden = _first(config, "hidden_size", "n_embd", "d_model")
    theta, rope_type = _rope(config)
    stored = _first(config, "dtype", "torch_dtype")
    return ModelInfo(
        model=source.display, source=source.kind, architecture=str(getattr(config, "model_type", "?")),
        model_class=type(net).__name__, parameters=params,
        embedding_parameters=int(embed.weight.numel()) if embed is not None else 0,
        layers=mmap.num_layers, hidden_size=hidden,
        intermediate_size=_first(config, "intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size"),
        heads=heads, kv_heads=_first(config, "num_key_value_heads", "num_kv_heads", "n_head_kv") or heads,
        head_dim=_first(config, "head_dim") or (hidden // heads if hidden and heads else None),
        vocab_size=_first(config, "vocab_size"),
        max_positions=_first(config, "max_position_embeddings", "n_positions", "max_seq_len"),
        rope_theta=theta, rope_type=rope_type, tie_word_embeddings=getattr(config, "tie_word_embeddings", None),
        stored_dtype=str(stored).replace("torch.", "") if stored is not None else None,
        linear_modules=len(mmap.linears), bytes_on_disk=_bytes_on_disk(source))


def _bytes_on_disk(source: ModelSource) -> int | None:
    from pathlib import Path

    if source.kind in ("embedded", "gguf"):
        return source.gguf_path.stat().st_size
    if source.kind == "local":
        return sum(f.stat().st_size for f in Path(source.location).iterdir()
                   if f.suffix in (".safetensors", ".bin", ".gguf", ".pt", ".pth"))
    return None  # a hub model's size is not known without downloading it


def layer_census(mmap: ModuleMap, *, roles: Sequence[str] | None = None, layers: Sequence[int] | None = None,
                 regex: str | None = None) -> tuple[list[ModuleTypeCount], list[LinearModule]]:
    census = [ModuleTypeCount(type=row["type"], count=row["count"], parameters=row.get("parameters", 0),
                              examples="; ".join(row["examples"])) for row in mmap.census()]
    linears = [LinearModule(name=s.name, layer=s.layer, role=s.role, in_features=s.in_features,
                            out_features=s.out_features, parameters=s.in_features * s.out_features,
                            input_group=s.input_group, transposed=s.transposed)
               for s in mmap.select(roles=roles or None, layers=layers or None, regex=regex,
                                    include_lm_head=not roles and not layers)]
    if not linears and (roles or layers or regex):
        # A selection that matches nothing is a typo, as in every other command: not an
        # empty table and exit 0.
        raise LLMProbeError("no linear module matches the given --roles/--layers/--filter")
    return census, linears


# -- registered analyses (declared in llmprobe.catalog.model) ---------------------------------


def info_job(job):
    from ..session import Result

    return Result(tables={"model_info": [model_info(job.source)]})


def prepare_layers_job(job):
    """The census is computed before the output folder exists: a selection that matches no
    module is an error, not an empty table."""
    from ..core.errors import LLMProbeError
    from ..core.specs import check_layers_exist

    o = job.options
    mmap = structure_map(job.source)
    check_layers_exist(o.layer_list(), mmap.num_layers)
    census, linears = layer_census(mmap, roles=o.roles, layers=o.layer_list(), regex=o.filter)
    if not linears:
        raise LLMProbeError("no linear module matches the given --roles/--layers/--filter")
    job.state.update(mmap=mmap, census=census, linears=linears)


def layers_job(job):
    from ..session import Result

    mmap = job.state["mmap"]
    return Result(tables={"module_census": job.state["census"], "linear_modules": job.state["linears"]},
                  manifest={"layers": mmap.num_layers, "blocks_path": mmap.blocks_path})
