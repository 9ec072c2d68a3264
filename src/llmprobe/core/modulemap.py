"""Architecture-agnostic map of a model's modules: decoder blocks, linear sites and their roles.

Every analysis that walks weights or hooks activations goes through :class:`ModuleMap`, so the
rest of llmprobe never needs to know that GPT-2 calls its query/key/value projection ``c_attn``
(and stores it transposed) while Llama calls it ``q_proj``/``k_proj``/``v_proj``.

Discovery is structural: the decoder blocks are the biggest ``nn.ModuleList`` whose children all
share one class, and a module's layer is its position in that list. Roles come from attribute
names *relative to the block*, read together with the parent module, because the same leaf name
means different things in different places (``dense`` is the attention output under
``attention`` but the second MLP matrix under BERT's ``output``; ``c_proj`` is ``attn.o`` under
``attn`` and ``mlp.fc2`` under ``mlp``).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import LLMProbeError
from .specs import compile_regex  # noqa: F401  (re-exported)

if TYPE_CHECKING:  # torch is imported where a function needs it
    import torch
    from torch import nn


ROLES = (
    "attn.q",
    "attn.k",
    "attn.v",
    "attn.o",
    "attn.qkv",
    "mlp.gate",
    "mlp.up",
    "mlp.down",
    "mlp.gate_up",
    "mlp.fc1",
    "mlp.fc2",
    "embed",
    "lm_head",
    "norm",
    "other",
)

# Role families a caller may name instead of listing every member ("attn" -> attn.q, attn.k, ...).
ROLE_FAMILIES = {
    "attn": tuple(role for role in ROLES if role.startswith("attn.")),
    "mlp": tuple(role for role in ROLES if role.startswith("mlp.")),
}

# Leaf names of linears inside an attention submodule.
_ATTENTION_LEAVES = {
    "q_proj": "attn.q",
    "query": "attn.q",
    "q": "attn.q",
    "wq": "attn.q",
    "k_proj": "attn.k",
    "key": "attn.k",
    "k": "attn.k",
    "wk": "attn.k",
    "v_proj": "attn.v",
    "value": "attn.v",
    "v": "attn.v",
    "wv": "attn.v",
    "o_proj": "attn.o",
    "out_proj": "attn.o",
    "dense": "attn.o",
    "c_proj": "attn.o",
    "wo": "attn.o",
    "o": "attn.o",
    "qkv_proj": "attn.qkv",
    "query_key_value": "attn.qkv",
    "c_attn": "attn.qkv",
    "qkv": "attn.qkv",
    "wqkv": "attn.qkv",
    "w_pack": "attn.qkv",
}

# Leaf names of linears inside an MLP submodule.
_MLP_LEAVES = {
    "gate_proj": "mlp.gate",
    "w1": "mlp.gate",
    "up_proj": "mlp.up",
    "w3": "mlp.up",
    "down_proj": "mlp.down",
    "w2": "mlp.down",
    "gate_up_proj": "mlp.gate_up",
    "c_fc": "mlp.fc1",
    "fc_in": "mlp.fc1",
    "fc1": "mlp.fc1",
    "dense_h_to_4h": "mlp.fc1",
    "c_proj": "mlp.fc2",
    "fc_out": "mlp.fc2",
    "fc2": "mlp.fc2",
    "dense_4h_to_h": "mlp.fc2",
}

# BERT-style MLPs keep one ``dense`` per submodule; the submodule says which half it is.
_MLP_DENSE_BY_PARENT = {"intermediate": "mlp.fc1", "output": "mlp.fc2"}

# Linears sitting directly in the block (OPT keeps fc1/fc2 there). Only names that mean one
# thing wherever they appear; ambiguous ones (dense, c_proj) fall to "other".
_BLOCK_LEAVES = {
    name: role
    for name, role in {**_ATTENTION_LEAVES, **_MLP_LEAVES}.items()
    if name not in ("dense", "c_proj", "q", "k", "v", "o", "w1", "w2", "w3")
}

_MLP_PARENT_NAMES = {"mlp", "ffn", "feed_forward", "feedforward", "intermediate", "output", "moe", "experts"}

# Attention modules whose q and k/v read different tensors (encoder-decoder cross attention),
# so their projections must never share an input group.
_CROSS_ATTENTION_MARKERS = ("cross", "encoder_attn")

_SHARED_INPUT_SETS = {
    "attn_in": frozenset({"attn.q", "attn.k", "attn.v"}),
    "mlp_in": frozenset({"mlp.gate", "mlp.up"}),
}


# llama.cpp GGUF tensor names: top-level ones, and the per-block part after "blk.N.".
_GGUF_GLOBAL = {
    "token_embd": "embed",
    "position_embd": "embed",
    "token_types": "embed",
    "token_embd_norm": "norm",
    "output_norm": "norm",
    "output": "lm_head",
}
_GGUF_BLOCK = {
    "attn_q": "attn.q",
    "attn_k": "attn.k",
    "attn_v": "attn.v",
    "attn_qkv": "attn.qkv",
    "attn_output": "attn.o",
    "ffn_gate": "mlp.gate",
    "ffn_up": "ffn_up",
    "ffn_down": "ffn_down",
}
# Placeholder roles resolved against the model: first candidate the model has wins.
_GGUF_ROLE_BY_PRESENT = {
    "ffn_up": ("mlp.gate_up", "mlp.up", "mlp.fc1"),
    "ffn_down": ("mlp.down", "mlp.fc2"),
}


def _is_attention_name(part: str) -> bool:
    part = part.lower()
    return "attn" in part or "attention" in part


def _is_mlp_name(part: str) -> bool:
    part = part.lower()
    return part in _MLP_PARENT_NAMES or "mlp" in part or "ffn" in part or "moe" in part


def _linear_role(parents: tuple[str, ...], leaf: str) -> str:
    """Role of a linear from its path inside a block: ``parents`` are the submodule names between
    the block and the linear, ``leaf`` its own attribute name."""
    leaf = leaf.lower()
    if any(_is_attention_name(part) for part in parents):
        return _ATTENTION_LEAVES.get(leaf, "other")
    if any(_is_mlp_name(part) for part in parents):
        if leaf == "dense":
            return _MLP_DENSE_BY_PARENT.get(parents[-1].lower(), "other")
        return _MLP_LEAVES.get(leaf, "other")
    if not parents:
        return _BLOCK_LEAVES.get(leaf, "other")
    return "other"


def _conv1d_class():
    # Looked up, never imported: importing transformers costs ~2 s, and while it is not imported
    # no module can be one of its Conv1D (the class-name test below still catches look-alikes).
    utils = sys.modules.get("transformers.pytorch_utils")
    return getattr(utils, "Conv1D", None)


def _is_conv1d(module: nn.Module) -> bool:
    conv1d = _conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def _is_linear(module: nn.Module) -> bool:
    from torch import nn
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def _is_norm(module: nn.Module) -> bool:
    return "Norm" in type(module).__name__


def _linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features), read from attributes first because packed/quantized weights
    do not have the logical shape."""
    if _is_conv1d(module):
        if hasattr(module, "nx") and hasattr(module, "nf"):
            return int(module.nx), int(module.nf)
        rows, cols = module.weight.shape
        return int(rows), int(cols)
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    rows, cols = module.weight.shape
    return int(cols), int(rows)


@dataclass(frozen=True)
class WeightPlace:
    """Where a checkpoint's weight sits in the model, as plain data (:meth:`ModuleMap.weight_places`)."""

    layer: int | None
    role: str
    position: int | None  # index in the model's parameter order; None when the model has no such parameter
    # (out_features, in_features, transposed) of the linear layer it is the weight of, else None
    linear: tuple[int, int, bool] | None = None


@dataclass(frozen=True)
class LinearSite:
    """One linear layer (``nn.Linear`` or transformers' ``Conv1D``) and what it does."""

    name: str
    layer: int | None
    role: str
    in_features: int
    out_features: int
    transposed: bool
    input_group: str
    module: nn.Module = field(compare=False, repr=False)

    @property
    def weight_name(self) -> str:
        return f"{self.name}.weight"

    def weight(self) -> torch.Tensor:
        """The weight as [out, in], detached and sharing storage with the module (Conv1D's
        [in, out] weight comes back as a transposed view, so in-place edits still land)."""
        weight = self.module.weight.detach()
        return weight.t() if self.transposed else weight


def _find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList | None]:
    """The decoder blocks: the ModuleList of same-class children holding the most parameters.

    Ranking by parameters (not child count) keeps nested lists such as MoE experts from beating
    the list of layers that contains them; ties go to the shallower list.
    """
    from torch import nn
    best_key, best = None, ("", None)
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        numel = sum(param.numel() for param in module.parameters())
        depth = path.count(".")
        key = (numel, len(module), -depth)
        if best_key is None or key > best_key:
            best_key, best = key, (path, module)
    return best


_HEAD_NAMES = ("lm_head", "embed_out", "output")


def output_head(model: nn.Module) -> nn.Module | None:
    from torch import nn
    getter = getattr(model, "get_output_embeddings", None)
    if getter is None:
        return None
    try:
        head = getter()
    except (NotImplementedError, AttributeError):
        head = None
    if isinstance(head, nn.Module) and _is_linear(head):
        return head
    # Some models do not implement the getter; their head still sits at the top under a known name.
    for name in _HEAD_NAMES:
        candidate = getattr(model, name, None)
        if isinstance(candidate, nn.Module) and _is_linear(candidate):
            return candidate
    return None


class ModuleMap:
    """Blocks, linear sites and parameter roles of one model, found from its structure."""

    def __init__(self, model: nn.Module):
        from torch import nn
        self.model = model
        self.blocks_path, block_list = _find_blocks(model)
        self.blocks: list[nn.Module] = list(block_list) if block_list is not None else []
        self.num_layers = len(self.blocks)

        # Layer of every module inside a block, keyed by its name in model.named_modules().
        self._layer_of: dict[str, int] = {}
        self._block_path_of: dict[int, str] = {}
        for index, block in enumerate(self.blocks):
            block_path = f"{self.blocks_path}.{index}" if self.blocks_path else str(index)
            self._block_path_of[index] = block_path
            for sub_name, _ in block.named_modules(prefix=block_path):
                self._layer_of.setdefault(sub_name, index)

        head = output_head(model)
        self._module_info: dict[str, tuple[int | None, str]] = {}
        raw_sites: list[tuple[str, nn.Module, int | None, str]] = []
        for name, module in model.named_modules():
            layer = self._layer_of.get(name)
            if head is not None and module is head:
                role = "lm_head"
            elif _is_linear(module):
                role = self._role_in_block(name, layer)
            elif isinstance(module, nn.Embedding):
                role = "embed"
            elif _is_norm(module):
                role = "norm"
            else:
                role = "other"
            self._module_info[name] = (layer, role)
            if _is_linear(module):
                raw_sites.append((name, module, layer, role))

        groups = self._assign_input_groups(raw_sites)
        self.linears: list[LinearSite] = []
        for name, module, layer, role in raw_sites:
            in_features, out_features = _linear_shape(module)
            self.linears.append(
                LinearSite(
                    name=name,
                    layer=layer,
                    role=role,
                    in_features=in_features,
                    out_features=out_features,
                    transposed=_is_conv1d(module),
                    input_group=groups.get(name, name),
                    module=module,
                )
            )
        self._site_by_name = {site.name: site for site in self.linears}

    @classmethod
    def from_config(cls, config, model_class=None, trust_remote_code: bool = False) -> ModuleMap:
        """Map a model built on the meta device from its config: names, shapes and roles without
        allocating weights. The class is ``model_class`` if given, else the one named in
        ``config.architectures``, else the causal-LM auto class, else the base auto class."""
        import torch
        factory = model_class or _class_for_config(config, trust_remote_code)
        with torch.device("meta"):
            if hasattr(factory, "from_config"):
                kwargs = {"trust_remote_code": True} if trust_remote_code and _is_auto(factory) else {}
                model = factory.from_config(config, **kwargs)
            else:
                model = factory(config)
        return cls(model)

    @classmethod
    def from_structure(cls, structure: dict) -> ModuleMap:
        """Map the meta-device skeleton that :func:`skeleton_model` rebuilds from a
        :func:`model_structure` description: the same names, classes, shapes and roles as the
        model it was taken from, without importing the model's library."""
        return cls(skeleton_model(structure))

    # -- discovery helpers -------------------------------------------------------------------

    def _role_in_block(self, name: str, layer: int | None) -> str:
        if layer is None:
            return "other"
        block_path = self._block_path_of[layer]
        relative = name[len(block_path) + 1 :] if name.startswith(block_path + ".") else ""
        if not relative:
            return "other"
        *parents, leaf = relative.split(".")
        return _linear_role(tuple(parents), leaf)

    def _assign_input_groups(self, raw_sites) -> dict[str, str]:
        """Group linears that provably read the same tensor: q/k/v that are siblings under one
        self-attention module, gate/up that are siblings under one MLP. Nothing else is shared,
        even where an architecture happens to feed attention and MLP from one norm."""
        siblings: dict[tuple[str, str], list[str]] = {}
        for name, _module, layer, role in raw_sites:
            if layer is None:
                continue
            parent = name.rpartition(".")[0]
            if any(marker in parent.lower() for marker in _CROSS_ATTENTION_MARKERS):
                continue
            for suffix, members in _SHARED_INPUT_SETS.items():
                if role in members:
                    siblings.setdefault((parent, suffix), []).append(name)

        # A block with one attention (or MLP) gets the short "<block>.attn_in" key; blocks with
        # several (MoE experts) key each set by its parent so they stay apart.
        parents_per_block: dict[tuple[int, str], int] = {}
        for (parent, suffix), names in siblings.items():
            if len(names) > 1:
                layer = self._layer_of[parent]
                parents_per_block[(layer, suffix)] = parents_per_block.get((layer, suffix), 0) + 1

        groups: dict[str, str] = {}
        for (parent, suffix), names in siblings.items():
            if len(names) < 2:
                continue
            layer = self._layer_of[parent]
            owner = self._block_path_of[layer] if parents_per_block[(layer, suffix)] == 1 else parent
            for name in names:
                groups[name] = f"{owner}.{suffix}"
        return groups

    # -- queries -----------------------------------------------------------------------------

    def site(self, name: str) -> LinearSite:
        """The linear site with this module name (``.weight`` suffix tolerated)."""
        key = name.removesuffix(".weight")
        if key in self._site_by_name:
            return self._site_by_name[key]
        hint = ", ".join(site.name for site in self.linears[:3])
        raise LLMProbeError(
            f"no linear module named {name!r}; run 'llmprobe model layers' to list them (e.g. {hint})"
        )

    def roles_present(self) -> list[str]:
        present = {site.role for site in self.linears}
        return [role for role in ROLES if role in present]

    def select(
        self,
        roles: str | Iterable[str] | None = None,
        layers: int | Iterable[int] | None = None,
        regex: str | None = None,
        include_lm_head: bool = False,
    ) -> list[LinearSite]:
        """Linear sites filtered by role (or family "attn"/"mlp"), layer index (negative counts
        from the end) and a regex searched in the module name, in model order.

        The output head is left out unless ``include_lm_head`` or ``"lm_head"`` is among the roles.
        An empty result is not an error: asking every architecture for attn.q is legitimate.
        """
        wanted_roles = self._resolve_roles(roles)
        wanted_layers = self._resolve_layers(layers)
        pattern = compile_regex(regex)
        keep_head = include_lm_head or (wanted_roles is not None and "lm_head" in wanted_roles)

        selected = []
        for site in self.linears:
            if site.role == "lm_head":
                if not keep_head:
                    continue
            elif wanted_layers is not None and site.layer not in wanted_layers:
                continue
            if wanted_roles is not None and site.role not in wanted_roles and site.role != "lm_head":
                continue
            if pattern is not None and not pattern.search(site.name):
                continue
            selected.append(site)
        return selected

    def _resolve_roles(self, roles) -> set[str] | None:
        if roles is None:
            return None
        if isinstance(roles, str):
            roles = [roles]
        resolved: set[str] = set()
        for role in roles:
            if role in ROLE_FAMILIES:
                resolved.update(ROLE_FAMILIES[role])
            elif role in ROLES:
                resolved.add(role)
            else:
                present = ", ".join(self.roles_present())
                raise LLMProbeError(
                    f"unknown role {role!r}; this model's linears have roles: {present} "
                    f"(or use the families 'attn'/'mlp')"
                )
        return resolved

    def _resolve_layers(self, layers) -> set[int] | None:
        if layers is None:
            return None
        if isinstance(layers, int):
            layers = [layers]
        resolved: set[int] = set()
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise LLMProbeError(f"layer must be an integer, got {layer!r}")
            if not -self.num_layers <= layer < self.num_layers:
                raise LLMProbeError(
                    f"layer {layer} is out of range: this model has {self.num_layers} layers (0..{self.num_layers - 1})"
                )
            resolved.add(layer % self.num_layers)
        return resolved

    def input_groups(self, sites: Iterable[LinearSite] | None = None) -> dict[str, list[LinearSite]]:
        """Sites keyed by input group, in model order: one activation collection per key."""
        groups: dict[str, list[LinearSite]] = {}
        for site in self.linears if sites is None else sites:
            groups.setdefault(site.input_group, []).append(site)
        return groups

    def param_info(self, param_name: str) -> tuple[int | None, str]:
        """(layer, role) of any parameter or buffer name, as in the model or as stored in a
        checkpoint (with or without the base-model prefix). Unknown names get the layer their
        path implies, if any, and role "other"."""
        for spelling in self._spellings(param_name):
            owner = spelling.rpartition(".")[0]
            if owner in self._module_info:
                return self._module_info[owner]
            if spelling in self._module_info:  # a module path given without a parameter suffix
                return self._module_info[spelling]
        gguf = self._gguf_info(param_name)
        if gguf is not None:
            return gguf
        owner = self._match_by_suffix(param_name.rpartition(".")[0])
        if owner is not None:
            return self._module_info[owner]
        return self._layer_from_name(param_name), "other"

    def _gguf_info(self, name: str) -> tuple[int | None, str] | None:
        """(layer, role) of a llama.cpp GGUF tensor name ("blk.3.attn_q.weight", "token_embd.weight"),
        or None when the name is not one. GGUF says "ffn_up"/"ffn_down" for both gated and plain
        MLPs, so the roles this model actually has decide which one is meant."""
        parts = name.split(".")
        if len(parts) == 2 and parts[0] in _GGUF_GLOBAL:
            return None, _GGUF_GLOBAL[parts[0]]
        if len(parts) < 3 or parts[0] != "blk" or not parts[1].isdigit():
            return None
        layer = int(parts[1])
        tensor = parts[2].removesuffix("_exps").removesuffix("_shexp")
        if "norm" in tensor:
            return layer, "norm"
        role = _GGUF_BLOCK.get(tensor, "other")
        if role in _GGUF_ROLE_BY_PRESENT:
            present = {site.role for site in self.linears}
            role = next(
                (candidate for candidate in _GGUF_ROLE_BY_PRESENT[role] if candidate in present), "other"
            )
        return layer, role

    def _spellings(self, name: str) -> list[str]:
        """The name plus the same name with the base-model prefix added or removed, since
        checkpoints saved from a base model lack it and ones saved from a head model carry it."""
        spellings = [name]
        prefix = getattr(self.model, "base_model_prefix", "") or ""
        if prefix:
            if name.startswith(prefix + "."):
                spellings.append(name[len(prefix) + 1 :])
            else:
                spellings.append(f"{prefix}.{name}")
        return spellings

    def _match_by_suffix(self, module_name: str) -> str | None:
        """A unique module whose path ends with ``module_name`` (or vice versa), for checkpoints
        whose wrapper prefix differs from ``base_model_prefix``."""
        if not module_name:
            return None
        matches = [
            known
            for known in self._module_info
            if known and (known.endswith("." + module_name) or module_name.endswith("." + known))
        ]
        if len(matches) == 1:
            return matches[0]
        return None

    def _layer_from_name(self, name: str) -> int | None:
        if not self.blocks_path:
            return None
        list_name = self.blocks_path.rpartition(".")[2]
        pattern = re.compile(rf"(?:^|\.){re.escape(list_name)}\.(\d+)(?:\.|$)")
        for spelling in self._spellings(name):
            match = pattern.search(spelling)
            if match and int(match.group(1)) < self.num_layers:
                return int(match.group(1))
        return None

    def weight_places(self, names: Iterable[str]) -> dict[str, WeightPlace]:
        """:class:`WeightPlace` of each checkpoint weight name, matched with and without the
        base-model prefix (checkpoints saved from a bare base model lack ``model.``)."""
        prefix = getattr(self.model, "base_model_prefix", "") or ""

        def spellings(name: str) -> list[str]:
            if not prefix:
                return [name]
            if name.startswith(prefix + "."):
                return [name, name[len(prefix) + 1:]]
            return [name, f"{prefix}.{name}"]

        linears: dict[str, tuple[int, int, bool]] = {}
        for site in self.linears:
            for spelling in spellings(site.weight_name):
                linears.setdefault(spelling, (site.out_features, site.in_features, site.transposed))
        order: dict[str, int] = {}
        for position, (param_name, _) in enumerate(self.model.named_parameters(remove_duplicate=False)):
            for spelling in spellings(param_name):
                order.setdefault(spelling, position)
        return {name: WeightPlace(*self.param_info(name), order.get(name), linears.get(name)) for name in names}

    def census(self) -> list[dict]:
        """Module types with their count and up to three example paths, most frequent first."""
        by_type: dict[str, dict] = {}
        for name, module in self.model.named_modules():
            if not name:
                continue
            type_name = type(module).__name__
            entry = by_type.setdefault(
                type_name, {"type": type_name, "count": 0, "examples": [], "parameters": 0}
            )
            entry["count"] += 1
            entry["parameters"] += sum(param.numel() for param in module.parameters(recurse=False))
            if len(entry["examples"]) < 3:
                entry["examples"].append(name)
        return sorted(by_type.values(), key=lambda entry: -entry["count"])


def _is_auto(factory) -> bool:
    return getattr(factory, "__name__", "").startswith("Auto")


def _class_for_config(config, trust_remote_code: bool):
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM

    for name in getattr(config, "architectures", None) or []:
        model_class = getattr(transformers, name, None)
        if model_class is not None:
            return model_class
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        causal = getattr(config, "model_type", None) in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        causal = True
    if causal or (trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})):
        return AutoModelForCausalLM
    return AutoModel


# -- the structure of a model as data --------------------------------------------------------
#
# Building a model on the meta device needs its library (transformers: ~2-3 s of imports) for
# a few milliseconds of work. Weight commands only read the module tree, so its structure is
# kept as plain data (core/weightsource.py caches it per config) and a skeleton of plain
# nn.Modules is rebuilt from it. The skeleton reproduces everything ModuleMap and the weight
# commands read: module paths and order, class names and class identity (same-class blocks),
# nn.Linear / nn.Embedding / nn.ModuleList kinds, Linear and Conv1D sizes, parameters and
# buffers in registration order with shapes, dtypes and sharing (tied weights), the base-model
# prefix and the output head. It holds no weights and runs no forward pass.

STRUCTURE_FORMAT = 1
def _bases() -> dict:
    from torch import nn

    return {"linear": nn.Linear, "embedding": nn.Embedding, "modulelist": nn.ModuleList, "module": nn.Module}


def _base_kind(module: nn.Module) -> str:
    from torch import nn
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.ModuleList):
        return "modulelist"
    return "module"


def _size_attributes(module: nn.Module) -> dict:
    names = ("nf", "nx") if _is_conv1d(module) else ("in_features", "out_features", "num_embeddings",
                                                     "embedding_dim")
    return {name: int(getattr(module, name)) for name in names if isinstance(getattr(module, name, None), int)}


def model_structure(model: nn.Module) -> dict:
    """The module tree of ``model`` as JSON-able data (see the comment above); every module
    appears once, at its first path, and later paths to the same module or tensor refer back."""
    modules: list[dict] = []
    module_paths: dict[int, str] = {}
    tensor_paths: dict[int, str] = {}

    def tensors(named, path: str) -> list[list]:
        entries = []
        for attr, tensor in named:
            path_of_first = tensor_paths.setdefault(id(tensor), f"{path}.{attr}" if path else attr)
            entries.append([attr, list(tensor.shape), str(tensor.dtype).removeprefix("torch."), path_of_first])
        return entries

    def visit(module: nn.Module, path: str) -> None:
        if id(module) in module_paths:
            modules.append({"path": path, "same_as": module_paths[id(module)]})
            return
        module_paths[id(module)] = path
        kind = type(module)
        modules.append({
            "path": path, "class": kind.__name__, "class_id": f"{kind.__module__}.{kind.__qualname__}",
            "base": _base_kind(module), "sizes": _size_attributes(module),
            "parameters": tensors(module.named_parameters(recurse=False, remove_duplicate=False), path),
            "buffers": tensors(module.named_buffers(recurse=False, remove_duplicate=False), path),
        })
        for name, child in module.named_children():
            visit(child, f"{path}.{name}" if path else name)

    visit(model, "")
    head = output_head(model)
    return {"format": STRUCTURE_FORMAT, "modules": modules,
            "base_model_prefix": getattr(model, "base_model_prefix", "") or "",
            "output_head": module_paths.get(id(head)) if head is not None else None}


def skeleton_model(structure: dict) -> nn.Module:
    """A meta-device module tree rebuilt from :func:`model_structure` (the comment above)."""
    import torch
    from torch import nn
    if structure.get("format") != STRUCTURE_FORMAT:
        raise ValueError(f"module structure format {structure.get('format')!r}, expected {STRUCTURE_FORMAT}")
    classes: dict[tuple[str, str], type] = {}
    bases = _bases()
    built: dict[str, nn.Module] = {}
    shared: dict[str, torch.Tensor] = {}
    head_path = structure.get("output_head")

    def tensor(entry: list, parameter: bool) -> torch.Tensor:
        _, shape, dtype, path_of_first = entry
        if path_of_first not in shared:
            empty = torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
            shared[path_of_first] = nn.Parameter(empty, requires_grad=False) if parameter else empty
        return shared[path_of_first]

    for entry in structure["modules"]:
        path = entry["path"]
        if "same_as" in entry:
            module = built[entry["same_as"]]
        else:
            key = (entry["class_id"], entry["base"])
            if key not in classes:
                namespace = {"__module__": "llmprobe.skeleton", "__qualname__": entry["class"]}
                if not path:  # the root: what ModuleMap asks a transformers model for
                    namespace["base_model_prefix"] = structure.get("base_model_prefix", "")
                    namespace["get_output_embeddings"] = (
                        lambda self: self.get_submodule(head_path) if head_path is not None else None)
                classes[key] = type(entry["class"], (bases[entry["base"]],), namespace)
            module = classes[key].__new__(classes[key])
            nn.Module.__init__(module)  # not the base's own __init__: it would allocate weights
            for name, value in entry["sizes"].items():
                setattr(module, name, value)
            for item in entry["parameters"]:
                module.register_parameter(item[0], tensor(item, parameter=True))
            for item in entry["buffers"]:
                module.register_buffer(item[0], tensor(item, parameter=False))
            built[path] = module
        if path:
            parent, _, name = path.rpartition(".")
            built[parent].add_module(name, module)
    return built[""]
