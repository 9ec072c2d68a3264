"""WeightSource: every backend returns the checkpoint's names, shapes and values, one tensor at a
time, and bad files become one clear LLMProbeError."""

from __future__ import annotations

import json
import os
import weakref
from pathlib import Path

import pytest
import torch
from tiny import save_tiny_model_dir, shard_files, tiny_model

from llmprobe.core.errors import LLMProbeError
from llmprobe.core.loading import embedded_gguf_path, resolve_source
from llmprobe.core.weightsource import (
    GGUFSource,
    ModelWeights,
    SafetensorsSource,
    WeightSource,
    compile_regex,
    no_match_error,
)


@pytest.fixture(scope="module")
def llama_single(tmp_path_factory) -> Path:
    return save_tiny_model_dir("llama", tmp_path_factory.mktemp("single"))


@pytest.fixture(scope="module")
def llama_sharded(tmp_path_factory) -> Path:
    return save_tiny_model_dir("llama", tmp_path_factory.mktemp("sharded"), shards=3)


def assert_matches_state_dict(ws: WeightSource, model: torch.nn.Module) -> None:
    state = model.state_dict()
    assert sorted(ws.names()) == sorted(state)
    for name, expected in state.items():
        assert ws.shape(name) == tuple(expected.shape), name
        got = ws.get(name)
        assert got.dtype == expected.dtype, name
        assert torch.equal(got, expected), name


# ---------------------------------------------------------------------------- safetensors


def test_single_file_checkpoint_equals_the_models_state_dict(llama_single):
    ws = WeightSource.open(str(llama_single))
    assert isinstance(ws, SafetensorsSource) and ws.kind == "safetensors"
    assert len(list(llama_single.glob("*.safetensors"))) == 1
    assert_matches_state_dict(ws, tiny_model("llama"))
    assert ws.stored_dtype("model.layers.0.self_attn.q_proj.weight") == "F32"
    assert ws.bytes_on_disk() == (llama_single / "model.safetensors").stat().st_size


def test_sharded_checkpoint_with_index_equals_the_models_state_dict(llama_sharded):
    assert len(shard_files(llama_sharded)) >= 3
    ws = WeightSource.open(str(llama_sharded))
    assert_matches_state_dict(ws, tiny_model("llama"))
    # every shard contributes, and the size counts each shard once
    assert ws.bytes_on_disk() == sum(f.stat().st_size for f in llama_sharded.glob("*.safetensors"))


def test_module_map_gives_layer_and_role_of_checkpoint_names(llama_sharded):
    ws = WeightSource.open(str(llama_sharded))
    info = ws.module_map.param_info
    assert info("model.layers.0.self_attn.q_proj.weight") == (0, "attn.q")
    assert info("model.layers.1.mlp.down_proj.weight") == (1, "mlp.down")
    assert info("model.embed_tokens.weight") == (None, "embed")
    assert info("model.norm.weight") == (None, "norm")


def test_select_by_regex_and_dimension(llama_single):
    ws = WeightSource.open(str(llama_single))
    matrices = ws.select(r"layers\.0\.", min_dim=2, max_dim=2)
    assert len(matrices) == 7 and all(len(ws.shape(n)) == 2 for n in matrices)
    vectors = ws.select(r"layers\.0\.", max_dim=1)
    assert sorted(vectors) == ["model.layers.0.input_layernorm.weight",
                               "model.layers.0.post_attention_layernorm.weight"]
    assert ws.select(None) == ws.names()


def test_bad_regex_is_one_clear_error(llama_single):
    ws = WeightSource.open(str(llama_single))
    with pytest.raises(LLMProbeError, match="bad regex"):
        ws.select("[unclosed")
    with pytest.raises(LLMProbeError, match="bad regex"):
        compile_regex("(")
    error = no_match_error("nope", ws.names())
    assert "nope" in str(error) and ws.names()[0] in str(error) and "\n" not in str(error)


# ------------------------------------------------------------------------ memory ~ one tensor


def test_iterating_a_sharded_checkpoint_holds_one_tensor_at_a_time(llama_sharded):
    """The source reads lazily (nothing ahead of the consumer), keeps no reference to what it
    handed out (no cache), and each tensor owns exactly its own bytes (not a view pinning a whole
    shard) — together: memory ~ one tensor whatever the number of shards."""
    ws = WeightSource.open(str(llama_sharded))
    reads: list[str] = []
    read = ws.get

    def counting_get(name):
        reads.append(name)
        return read(name)

    ws.get = counting_get
    count = 0
    for name, tensor in ws.iter_tensors():
        count += 1
        assert reads == ws.names()[:count], "read ahead of the consumer"
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size(), name
        released = weakref.ref(tensor)
        del tensor
        assert released() is None, f"{name} is still referenced after the consumer dropped it"
    assert count == len(ws.names()) and len(shard_files(llama_sharded)) >= 3


# ------------------------------------------------------------------------------ bad files


def test_garbage_safetensors_file_is_one_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
    with pytest.raises(LLMProbeError, match="corrupt or truncated safetensors"):
        SafetensorsSource(tmp_path)


def test_truncated_safetensors_shard_is_one_clear_error(tmp_path):
    path = save_tiny_model_dir("llama", tmp_path / "model", shards=3)
    shard = path / shard_files(path)[1]
    os.truncate(shard, shard.stat().st_size // 2)
    with pytest.raises(LLMProbeError, match="truncated") as caught:
        WeightSource.open(str(path))
    assert shard.name in str(caught.value)


def test_missing_shard_named_in_the_index_is_one_clear_error(tmp_path):
    path = save_tiny_model_dir("llama", tmp_path / "model", shards=3)
    missing = shard_files(path)[-1]
    (path / missing).unlink()
    with pytest.raises(LLMProbeError, match="missing") as caught:
        WeightSource.open(str(path))
    assert missing in str(caught.value)


def test_corrupt_index_is_one_clear_error(tmp_path):
    path = save_tiny_model_dir("llama", tmp_path / "model", shards=3)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(LLMProbeError, match="corrupt safetensors index"):
        WeightSource.open(str(path))


def test_directory_without_weights_is_one_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(LLMProbeError, match="no \\*.safetensors"):
        SafetensorsSource(tmp_path)


@pytest.mark.parametrize("keep", [1000, 5_000_000])
def test_truncated_gguf_is_one_clear_error(tmp_path, keep):
    truncated = tmp_path / "cut.gguf"
    with open(embedded_gguf_path(), "rb") as source:
        truncated.write_bytes(source.read(keep))
    with pytest.raises(LLMProbeError, match="corrupt or truncated GGUF"):
        GGUFSource(resolve_source(str(truncated)))


# ------------------------------------------------------------------------------ in memory


def test_from_model_reads_the_parameters_in_place():
    model = tiny_model("gpt2")
    ws = WeightSource.from_model(model)
    assert isinstance(ws, ModelWeights)
    params = dict(model.named_parameters())
    assert ws.names() == list(params)
    for name, param in params.items():
        assert ws.shape(name) == tuple(param.shape)
        assert ws.stored_dtype(name) == "float32"
        assert torch.equal(ws.get(name), param)
        assert not ws.get(name).requires_grad
    # the module map is the model's own (GPT-2's Conv1D c_attn is the fused qkv)
    assert ws.module_map.param_info("transformer.h.0.attn.c_attn.weight") == (0, "attn.qkv")


# ------------------------------------------------------------------------------ GGUF


@pytest.mark.slow
def test_gguf_tensors_equal_the_transformers_conversion():
    """The embedded GGUF read tensor by tensor (gguf dequantization + our undoing of llama.cpp's
    q/k rotary permutation) equals transformers' own GGUF conversion, under HF names."""
    source = resolve_source(None)
    gguf = GGUFSource(source)
    converted = SafetensorsSource(Path(source.pretrained_dir()))
    assert sorted(gguf.names()) == sorted(converted.names())
    for name in gguf.names():
        assert gguf.shape(name) == converted.shape(name), name
    checked = [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.29.self_attn.q_proj.weight",
        "model.layers.29.self_attn.k_proj.weight",
        "model.layers.7.self_attn.v_proj.weight",
        "model.layers.3.mlp.down_proj.weight",
        "model.layers.0.input_layernorm.weight",
        "model.norm.weight",
    ]
    for name in checked:
        ours, reference = gguf.get(name), converted.get(name)
        assert ours.dtype == torch.float32
        assert torch.equal(ours, reference), name
    # quantized storage is reported as such, norms stay F32
    assert gguf.stored_dtype("model.layers.0.self_attn.q_proj.weight").startswith("Q")
    assert gguf.stored_dtype("model.norm.weight") == "F32"
    assert gguf.module_map.param_info("model.layers.0.self_attn.k_proj.weight") == (0, "attn.k")


# -- the module map from the cached structure -----------------------------------------------------


def test_module_map_from_the_cached_structure_is_the_map_of_the_model(tmp_path, monkeypatch):
    """The first map of a config is built through transformers and its structure kept; later
    ones are rebuilt from it, the same map (a changed config is a new entry)."""
    monkeypatch.setenv("LLMPROBE_CACHE", str(tmp_path / "cache"))
    directory = save_tiny_model_dir("gpt2", tmp_path / "gpt2")  # Conv1D: transposed weights
    first = WeightSource.open(str(directory)).module_map
    assert type(first.model).__module__.startswith("transformers.")
    kept = list((tmp_path / "cache" / "module-structures").glob("*.json"))
    assert len(kept) == 1
    second = WeightSource.open(str(directory)).module_map
    assert type(second.model).__module__ == "llmprobe.skeleton"
    signature = [(s.name, s.layer, s.role, s.in_features, s.out_features, s.transposed, s.input_group)
                 for s in first.linears]
    assert signature == [(s.name, s.layer, s.role, s.in_features, s.out_features, s.transposed, s.input_group)
                         for s in second.linears]
    names = WeightSource.open(str(directory)).names()
    assert [first.param_info(n) for n in names] == [second.param_info(n) for n in names]
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "n_layer": 3}))
    third = WeightSource.open(str(directory)).module_map
    assert third.num_layers == 3 and len(list((tmp_path / "cache" / "module-structures").glob("*.json"))) == 2


def test_a_damaged_cached_structure_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMPROBE_CACHE", str(tmp_path / "cache"))
    directory = save_tiny_model_dir("llama", tmp_path / "llama")
    WeightSource.open(str(directory)).module_map  # noqa: B018
    [kept] = (tmp_path / "cache" / "module-structures").glob("*.json")
    kept.write_text("{not json")
    rebuilt = WeightSource.open(str(directory)).module_map
    assert rebuilt.num_layers == 2 and json.loads(kept.read_text())["format"] >= 1


def test_a_weight_command_with_a_cached_structure_does_not_import_transformers(tmp_path):
    import subprocess
    import sys

    directory = save_tiny_model_dir("llama", tmp_path / "llama")
    env = {**os.environ, "LLMPROBE_CACHE": str(tmp_path / "cache")}
    code = ("import sys; from llmprobe.core.weightsource import WeightSource; from llmprobe.core import progress; "
            f"progress.silence_libraries(); m = WeightSource.open({str(directory)!r}).module_map; "
            "print(len(m.linears), 'transformers' in sys.modules)")
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
            for _ in range(2)]
    assert runs == ["15 True\n", "15 False\n"]  # 2 x 7 block linears + the head; the first run builds it


def test_weight_places_are_kept_as_data_and_read_back_without_the_module_map(tmp_path, monkeypatch):
    """Where each weight sits (layer, role, model order, linear shape) is asked of the module map
    once per checkpoint and names; later sources read the kept answer (no module map, no torch),
    and a damaged entry is asked again."""
    monkeypatch.setenv("LLMPROBE_CACHE", str(tmp_path / "cache"))
    directory = save_tiny_model_dir("gpt2", tmp_path / "gpt2")  # Conv1D: transposed weights
    first_source = WeightSource.open(str(directory))
    names = first_source.select(None, min_dim=2, max_dim=2)
    first = first_source.weight_places(names)
    assert first == first_source.module_map.weight_places(names)
    attn = first["transformer.h.0.attn.c_attn.weight"]
    assert attn.layer == 0 and attn.linear is not None and attn.linear[2] is True  # stored [in, out]
    assert first["transformer.wte.weight"].linear is None and first["transformer.wte.weight"].position is not None

    later = WeightSource.open(str(directory))
    monkeypatch.setattr(type(later), "module_map", property(lambda self: pytest.fail("module map built")))
    assert later.weight_places(names) == first
    monkeypatch.undo()
    monkeypatch.setenv("LLMPROBE_CACHE", str(tmp_path / "cache"))
    [kept] = (tmp_path / "cache" / "weight-places").glob("*.json")
    kept.write_text("[1, 2")
    assert WeightSource.open(str(directory)).weight_places(names) == first
