"""ModuleMap on a tiny random model of every supported architecture, plus the tiny-model helpers."""

from __future__ import annotations

import json
from functools import cache

import pytest
import torch
from safetensors import safe_open
from tiny import ARCHS, save_tiny_model_dir, shard_files, tiny_config, tiny_model, tiny_tokenizer
from torch import nn

from llmprobe.core.errors import LLMProbeError
from llmprobe.core.modulemap import ROLES, LinearSite, ModuleMap, model_structure, skeleton_model

LLAMA_ROLES = {"attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"}
SPLIT_QKV_FC = {"attn.q", "attn.k", "attn.v", "attn.o", "mlp.fc1", "mlp.fc2"}
FUSED_QKV_FC = {"attn.qkv", "attn.o", "mlp.fc1", "mlp.fc2"}

EXPECTED_ROLES = {
    "llama": LLAMA_ROLES,
    "mistral": LLAMA_ROLES,
    "qwen2": LLAMA_ROLES,
    "gemma": LLAMA_ROLES,
    "phi3": {"attn.qkv", "attn.o", "mlp.gate_up", "mlp.down"},
    "gpt2": FUSED_QKV_FC,
    "gpt_neox": FUSED_QKV_FC,
    "gptj": SPLIT_QKV_FC,
    "opt": SPLIT_QKV_FC,
    "bloom": FUSED_QKV_FC,
    "falcon": FUSED_QKV_FC,
    "bert": SPLIT_QKV_FC,
}

# Role sets that read one shared tensor, per architecture (everything else reads its own input).
EXPECTED_SHARED = {arch: [] for arch in ARCHS}
for _arch in ("llama", "mistral", "qwen2", "gemma"):
    EXPECTED_SHARED[_arch] = [{"attn.q", "attn.k", "attn.v"}, {"mlp.gate", "mlp.up"}]
for _arch in ("gptj", "opt", "bert"):
    EXPECTED_SHARED[_arch] = [{"attn.q", "attn.k", "attn.v"}]


@cache
def cached_model(arch: str) -> nn.Module:
    return tiny_model(arch)


@cache
def cached_map(arch: str) -> ModuleMap:
    return ModuleMap(cached_model(arch))


def config_layers(arch: str) -> int:
    config = cached_model(arch).config
    return config.num_hidden_layers


# -- structure ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_blocks_and_roles_per_layer(arch):
    module_map = cached_map(arch)
    assert module_map.num_layers == config_layers(arch) == 2
    assert len(module_map.blocks) == 2
    for index, block in enumerate(module_map.blocks):
        assert module_map.model.get_submodule(f"{module_map.blocks_path}.{index}") is block

    layers_seen = {site.layer for site in module_map.linears if site.layer is not None}
    assert layers_seen == {0, 1}, "layer 0 must be a layer like any other"
    for layer in range(2):
        roles = [site.role for site in module_map.linears if site.layer == layer]
        assert set(roles) == EXPECTED_ROLES[arch]
        assert len(roles) == len(set(roles)), f"duplicate role in layer {layer}: {roles}"
    assert all(site.role in ROLES for site in module_map.linears)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_linear_listed_in_model_order(arch):
    module_map = cached_map(arch)
    model = module_map.model
    expected = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
    ]
    assert [site.name for site in module_map.linears] == expected

    heads = [site for site in module_map.linears if site.role == "lm_head"]
    if arch == "bert":
        assert heads == []
        assert module_map.site("pooler.dense").role == "other"
    else:
        assert len(heads) == 1 and heads[0].layer is None
        assert heads[0].out_features == model.config.vocab_size


@pytest.mark.parametrize("arch", ARCHS)
def test_shapes_and_orientation(arch):
    module_map = cached_map(arch)
    for site in module_map.linears:
        weight = site.weight()
        assert tuple(weight.shape) == (site.out_features, site.in_features), site.name
        assert site.weight_name == f"{site.name}.weight"
        stored = site.module.weight
        assert weight.data_ptr() == stored.data_ptr(), "weight() must not copy"
        if site.transposed:
            assert tuple(stored.shape) == (site.in_features, site.out_features)
            # Conv1D computes x @ W; the oriented weight must reproduce it as a Linear would.
            sample = torch.randn(3, site.in_features)
            with torch.no_grad():
                assert torch.allclose(site.module(sample), sample @ weight.T + site.module.bias, atol=1e-6)
        else:
            assert tuple(stored.shape) == (site.out_features, site.in_features)
    hidden = module_map.model.config.hidden_size
    first = next(site for site in module_map.linears if site.layer == 0)
    assert first.in_features == hidden


def test_gpt2_is_transposed_and_others_are_not():
    assert all(site.transposed for site in cached_map("gpt2").linears if site.role != "lm_head")
    assert not any(site.transposed for site in cached_map("llama").linears)
    qkv = cached_map("gpt2").select(roles="attn.qkv", layers=0)[0]
    assert (qkv.in_features, qkv.out_features) == (32, 96)


def test_fused_shapes_follow_config():
    phi3 = cached_map("phi3")
    qkv = phi3.select(roles="attn.qkv", layers=0)[0]
    gate_up = phi3.select(roles="mlp.gate_up", layers=0)[0]
    # 4 query heads + 2 key + 2 value heads of dim 8; gate and up stacked.
    assert qkv.out_features == 32 + 2 * 16
    assert gate_up.out_features == 2 * 64
    falcon_qkv = cached_map("falcon").select(roles="attn.qkv", layers=0)[0]
    assert falcon_qkv.out_features == 32 + 2 * 8  # multi-query: one shared key/value head


# -- input groups ------------------------------------------------------------------------------


def test_llama_input_groups():
    module_map = cached_map("llama")
    by_role = {site.role: site for site in module_map.select(layers=0)}
    assert by_role["attn.q"].input_group == "model.layers.0.attn_in"
    assert by_role["attn.k"].input_group == by_role["attn.v"].input_group == by_role["attn.q"].input_group
    assert by_role["mlp.gate"].input_group == by_role["mlp.up"].input_group == "model.layers.0.mlp_in"
    assert by_role["attn.o"].input_group == by_role["attn.o"].name
    assert by_role["mlp.down"].input_group == by_role["mlp.down"].name

    groups = module_map.input_groups()
    assert [site.role for site in groups["model.layers.1.attn_in"]] == ["attn.q", "attn.k", "attn.v"]
    assert len(groups) == 2 * 4 + 1  # per layer: attn_in, o, mlp_in, down; plus lm_head
    subset = module_map.input_groups(module_map.select(roles=["attn.q", "attn.k"], layers=1))
    assert list(subset) == ["model.layers.1.attn_in"] and len(subset["model.layers.1.attn_in"]) == 2


@pytest.mark.parametrize("arch", ARCHS)
def test_input_groups_only_share_provable_siblings(arch):
    module_map = cached_map(arch)
    for layer in range(module_map.num_layers):
        shared = [
            {site.role for site in members}
            for members in module_map.input_groups(module_map.select(layers=layer)).values()
            if len(members) > 1
        ]
        assert sorted(map(sorted, shared)) == sorted(map(sorted, EXPECTED_SHARED[arch]))
    for site in module_map.linears:
        if site.role not in ("attn.q", "attn.k", "attn.v", "mlp.gate", "mlp.up"):
            assert site.input_group == site.name


# -- parameter names ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_param_info_for_every_parameter(arch):
    module_map = cached_map(arch)
    model = module_map.model
    linear_roles = {site.name: (site.layer, site.role) for site in module_map.linears}
    for name, _param in model.named_parameters():
        owner = name.rpartition(".")[0]
        module = model.get_submodule(owner)
        layer, role = module_map.param_info(name)
        if owner in linear_roles:
            assert (layer, role) == linear_roles[owner], name
        elif isinstance(module, nn.Embedding):
            assert role == "embed", name
        elif "Norm" in type(module).__name__:
            assert role == "norm", name
        if owner.startswith(module_map.blocks_path + "."):
            assert layer == int(owner[len(module_map.blocks_path) + 1 :].split(".")[0]), name
        else:
            assert layer is None, name

    embedding = model.get_input_embeddings()
    embed_name = next(name for name, module in model.named_modules() if module is embedding)
    assert module_map.param_info(f"{embed_name}.weight") == (None, "embed")
    if arch != "bert":
        assert module_map.param_info("lm_head.weight") == (None, "lm_head")


def test_param_info_names_and_unknowns():
    module_map = cached_map("llama")
    assert module_map.param_info("model.norm.weight") == (None, "norm")
    assert module_map.param_info("model.layers.0.input_layernorm.weight") == (0, "norm")
    assert module_map.param_info("model.layers.1.post_attention_layernorm.weight") == (1, "norm")
    assert module_map.param_info("model.layers.0.self_attn.q_proj.weight") == (0, "attn.q")
    # A checkpoint saved from the bare LlamaModel lacks the "model." prefix.
    assert module_map.param_info("layers.1.mlp.down_proj.weight") == (1, "mlp.down")
    assert module_map.param_info("embed_tokens.weight") == (None, "embed")
    # Unknown names keep whatever layer their path implies.
    assert module_map.param_info("model.layers.1.self_attn.rotary.inv_freq") == (1, "other")
    assert module_map.param_info("model.layers.1.brand_new.thing.weight") == (1, "other")
    assert module_map.param_info("completely.unknown.weight") == (None, "other")

    qwen = cached_map("qwen2")
    assert qwen.param_info("model.layers.0.self_attn.k_proj.bias") == (0, "attn.k")


def test_param_info_gpt2_checkpoint_names_without_prefix(tmp_path):
    model = cached_model("gpt2")
    # GPT-2 checkpoints are saved from the bare GPT2Model: no "transformer." in their keys.
    model.base_model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        keys = list(handle.keys())
    assert "h.0.attn.c_attn.weight" in keys and not any(key.startswith("transformer.") for key in keys)

    module_map = cached_map("gpt2")
    for key in keys:
        assert module_map.param_info(key) == module_map.param_info(f"transformer.{key}"), key
    assert module_map.param_info("h.0.attn.c_attn.weight") == (0, "attn.qkv")
    assert module_map.param_info("h.1.attn.c_proj.bias") == (1, "attn.o")
    assert module_map.param_info("h.1.mlp.c_proj.weight") == (1, "mlp.fc2")
    assert module_map.param_info("h.0.ln_1.weight") == (0, "norm")
    assert module_map.param_info("wte.weight") == (None, "embed")
    assert module_map.param_info("wpe.weight") == (None, "embed")
    assert module_map.param_info("ln_f.bias") == (None, "norm")


def test_param_info_gguf_names():
    llama = cached_map("llama")
    assert llama.param_info("token_embd.weight") == (None, "embed")
    assert llama.param_info("output.weight") == (None, "lm_head")
    assert llama.param_info("output_norm.weight") == (None, "norm")
    assert llama.param_info("blk.1.attn_q.weight") == (1, "attn.q")
    assert llama.param_info("blk.0.attn_output.weight") == (0, "attn.o")
    assert llama.param_info("blk.0.ffn_norm.weight") == (0, "norm")
    assert llama.param_info("blk.1.ffn_up.weight") == (1, "mlp.up")
    assert llama.param_info("blk.1.ffn_down.weight") == (1, "mlp.down")
    # GGUF's ffn_up/ffn_down mean the plain MLP's two matrices in GPT-2, the fused one in Phi-3.
    assert cached_map("gpt2").param_info("blk.0.ffn_up.bias") == (0, "mlp.fc1")
    assert cached_map("gpt2").param_info("blk.0.ffn_down.weight") == (0, "mlp.fc2")
    assert cached_map("phi3").param_info("blk.0.ffn_up.weight") == (0, "mlp.gate_up")


def test_param_info_bert_names_with_head_prefix():
    # BertModel has no prefix; checkpoints saved from BertFor* carry "bert.".
    module_map = cached_map("bert")
    assert module_map.param_info("bert.encoder.layer.1.attention.self.query.weight") == (1, "attn.q")
    assert module_map.param_info("bert.encoder.layer.0.attention.output.dense.weight") == (0, "attn.o")
    assert module_map.param_info("encoder.layer.0.output.dense.weight") == (0, "mlp.fc2")
    assert module_map.param_info("bert.embeddings.word_embeddings.weight") == (None, "embed")
    assert module_map.param_info("embeddings.LayerNorm.weight") == (None, "norm")
    assert module_map.param_info("encoder.layer.0.output.LayerNorm.bias") == (0, "norm")


# -- meta-device construction ------------------------------------------------------------------


def _signature(module_map: ModuleMap):
    return [
        (s.name, s.layer, s.role, s.in_features, s.out_features, s.transposed, s.input_group)
        for s in module_map.linears
    ]


@pytest.mark.parametrize("arch", ARCHS)
def test_from_config_builds_on_meta(arch):
    config = tiny_config(arch)
    if arch == "bert":
        config.architectures = ["BertModel"]  # the class tiny_model uses; config says which to build
    meta_map = ModuleMap.from_config(config)
    real_map = cached_map(arch)
    assert _signature(meta_map) == _signature(real_map)
    assert meta_map.blocks_path == real_map.blocks_path and meta_map.num_layers == real_map.num_layers
    assert all(param.is_meta for param in meta_map.model.parameters())
    assert all(site.weight().is_meta for site in meta_map.linears)
    for name, _ in real_map.model.named_parameters():
        assert meta_map.param_info(name) == real_map.param_info(name)


def _everything_a_map_reads(module_map: ModuleMap) -> dict:
    model = module_map.model
    return {
        "modules": [(name, type(module).__name__) for name, module in model.named_modules()],
        "parameters": [(n, tuple(p.shape), p.dtype) for n, p in model.named_parameters(remove_duplicate=False)],
        "distinct parameters": [name for name, _ in model.named_parameters()],
        "buffers": [(n, tuple(b.shape), b.dtype) for n, b in model.named_buffers(remove_duplicate=False)],
        "prefix": getattr(model, "base_model_prefix", ""),
        "blocks": (module_map.blocks_path, module_map.num_layers),
        "linears": _signature(module_map),
        "modules info": module_map._module_info,
        "param_info": [module_map.param_info(n) for n, _ in model.named_parameters(remove_duplicate=False)],
        "input groups": {key: [s.name for s in sites] for key, sites in module_map.input_groups().items()},
        "census": module_map.census(),
    }


@pytest.mark.parametrize("arch", ARCHS)
def test_structure_skeleton_maps_like_the_model(arch):
    """The skeleton rebuilt from a model's structure (what weight commands map without
    transformers) is the same map: modules, classes, parameters (tied ones shared), buffers,
    blocks, roles, layers, input groups."""
    config = tiny_config(arch)
    if arch == "bert":
        config.architectures = ["BertModel"]
    meta_map = ModuleMap.from_config(config)
    structure = json.loads(json.dumps(model_structure(meta_map.model)))  # as it is cached
    skeleton_map = ModuleMap.from_structure(structure)
    assert type(skeleton_map.model).__module__ == "llmprobe.skeleton"
    assert _everything_a_map_reads(skeleton_map) == _everything_a_map_reads(meta_map)
    assert all(param.is_meta for param in skeleton_map.model.parameters())


def test_structure_skeleton_of_the_embedded_model():
    from llmprobe.core.loading import load_config

    meta_map = ModuleMap.from_config(load_config(None))
    skeleton_map = ModuleMap.from_structure(json.loads(json.dumps(model_structure(meta_map.model))))
    assert _everything_a_map_reads(skeleton_map) == _everything_a_map_reads(meta_map)
    assert skeleton_map.model.lm_head.weight is skeleton_map.model.model.embed_tokens.weight  # tied


def test_structure_of_another_format_is_refused():
    structure = model_structure(ModuleMap.from_config(tiny_config("llama")).model)
    with pytest.raises(ValueError, match="format"):
        skeleton_model({**structure, "format": -1})


def test_from_config_follows_layer_count():
    meta_map = ModuleMap.from_config(tiny_config("llama", num_layers=5))
    assert meta_map.num_layers == 5
    assert {site.layer for site in meta_map.select()} == set(range(5))


# -- select ------------------------------------------------------------------------------------


def test_select_filters():
    module_map = cached_map("llama")
    everything = module_map.select()
    assert len(everything) == 14 and all(site.role != "lm_head" for site in everything)
    assert module_map.select(include_lm_head=True)[-1].role == "lm_head"
    assert [s.name for s in module_map.select(roles="lm_head")] == ["lm_head"]

    queries = module_map.select(roles=["attn.q"])
    assert [site.layer for site in queries] == [0, 1]
    assert {s.role for s in module_map.select(roles="mlp")} == {"mlp.gate", "mlp.up", "mlp.down"}
    assert module_map.select(roles="attn.qkv") == []  # a real role this arch lacks is just empty

    layer_zero = module_map.select(layers=0)
    assert len(layer_zero) == 7 and {site.layer for site in layer_zero} == {0}
    assert module_map.select(layers=[-1]) == module_map.select(layers=[1])
    assert len(module_map.select(layers=range(2))) == 14

    by_regex = module_map.select(regex=r"layers\.1\..*_proj$", roles=["mlp.down", "attn.o"])
    assert [site.name for site in by_regex] == [
        "model.layers.1.self_attn.o_proj",
        "model.layers.1.mlp.down_proj",
    ]
    assert module_map.select(regex="lm_head", include_lm_head=True)[0].role == "lm_head"
    assert all(isinstance(site, LinearSite) for site in everything)


def test_select_errors_name_what_exists():
    module_map = cached_map("gpt2")
    with pytest.raises(LLMProbeError, match=r"bad regex '\(unclosed'"):
        module_map.select(regex="(unclosed")
    with pytest.raises(
        LLMProbeError, match="unknown role 'attn.query'.*attn.o, attn.qkv, mlp.fc1, mlp.fc2, lm_head"
    ):
        module_map.select(roles=["attn.query"])
    with pytest.raises(LLMProbeError, match=r"layer 2 is out of range.*2 layers \(0\.\.1\)"):
        module_map.select(layers=[0, 2])
    with pytest.raises(LLMProbeError, match="out of range"):
        module_map.select(layers=-3)
    with pytest.raises(LLMProbeError, match="no linear module named") as raised:
        module_map.site("transformer.h.9.attn.c_attn")
    assert "\n" not in str(raised.value)


# -- structural discovery on a hand-made model -------------------------------------------------


class _Expert(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(8, 16)
        self.up_proj = nn.Linear(8, 16)
        self.down_proj = nn.Linear(16, 8)


class _MoeBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(8, 8)
        self.self_attn.k_proj = nn.Linear(8, 8)
        self.self_attn.v_proj = nn.Linear(8, 8)
        self.self_attn.o_proj = nn.Linear(8, 8)
        self.moe = nn.Module()
        self.moe.experts = nn.ModuleList([_Expert() for _ in range(6)])


class _OddlyNamedModel(nn.Module):
    """Blocks under an unusual name, each holding a longer list of experts than there are blocks."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(10, 8)
        self.stack = nn.ModuleList([_MoeBlock() for _ in range(3)])
        self.final_norm = nn.LayerNorm(8)


def test_blocks_found_by_structure_not_names():
    module_map = ModuleMap(_OddlyNamedModel())
    assert module_map.blocks_path == "stack" and module_map.num_layers == 3
    assert module_map.param_info("tok.weight") == (None, "embed")
    assert module_map.param_info("final_norm.weight") == (None, "norm")
    site = module_map.site("stack.2.moe.experts.5.down_proj")
    assert (site.layer, site.role) == (2, "mlp.down")
    # Each expert's gate/up share an input, but different experts see different tokens.
    gate = module_map.site("stack.0.moe.experts.1.gate_proj")
    assert gate.input_group == "stack.0.moe.experts.1.mlp_in"
    assert module_map.site("stack.0.self_attn.k_proj").input_group == "stack.0.attn_in"


def test_model_without_blocks():
    module_map = ModuleMap(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)))
    assert module_map.num_layers == 0 and module_map.blocks == [] and module_map.blocks_path == ""
    assert [(s.name, s.layer, s.role) for s in module_map.linears] == [("0", None, "other")]
    assert module_map.param_info("1.weight") == (None, "norm")
    with pytest.raises(LLMProbeError, match="0 layers"):
        module_map.select(layers=0)


def test_census():
    census = cached_map("llama").census()
    by_type = {entry["type"]: entry for entry in census}
    assert by_type["Linear"]["count"] == 15
    assert by_type["Linear"]["examples"] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.self_attn.v_proj",
    ]
    assert by_type["LlamaDecoderLayer"]["count"] == 2
    assert by_type["LlamaRMSNorm"]["count"] == 5
    assert census[0]["type"] == "Linear"
    assert all(len(entry["examples"]) <= 3 for entry in census)
    assert by_type["Embedding"]["parameters"] == 512 * 32


# -- tiny helpers ------------------------------------------------------------------------------


def test_tiny_models_are_deterministic():
    first, second = tiny_model("llama", seed=3), tiny_model("llama", seed=3)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    assert not torch.equal(tiny_model("llama", seed=4).lm_head.weight, first.lm_head.weight)
    assert tiny_config("gpt2", num_layers=3).n_layer == 3


def test_tiny_tokenizer():
    tokenizer = tiny_tokenizer()
    assert tokenizer is tiny_tokenizer()
    assert len(tokenizer) == 512
    assert tokenizer.bos_token == "<s>" and tokenizer.eos_token == "</s>"
    ids = tokenizer("The game began development in 2010 .")["input_ids"]
    assert ids and max(ids) < 512
    assert tokenizer.decode(ids) == "The game began development in 2010 ."


def test_save_tiny_model_dir_sharded(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = save_tiny_model_dir("llama", tmp_path / "llama", shards=3)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = shard_files(path)
    assert len(files) >= 3 and all((path / name).is_file() for name in files)
    assert set(index["weight_map"]) == set(tiny_model("llama").state_dict())
    assert (path / "config.json").is_file()

    reloaded = AutoModelForCausalLM.from_pretrained(path)
    original = tiny_model("llama")
    for name, tensor in original.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    assert len(AutoTokenizer.from_pretrained(path)) == 512

    single = save_tiny_model_dir("gpt2", tmp_path / "gpt2")
    assert (single / "model.safetensors").is_file()
    assert not (single / "model.safetensors.index.json").exists()
