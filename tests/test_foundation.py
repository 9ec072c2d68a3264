"""Foundation: CLI shell, model loading, output writing, records, `model` and `eval` commands."""

import json
import math
import os

import pytest
import torch
from conftest import assert_one_line_error
from tiny import save_tiny_model_dir, tiny_tokenizer

from llmprobe.core.errors import LLMProbeError
from llmprobe.core.loading import load_model, resolve_source
from llmprobe.core.output import RunOutput
from llmprobe.core.records import Record


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_model_dir("llama", tmp_path_factory.mktemp("llama"))


# -- the CLI shell -----------------------------------------------------------------------------

def test_version_and_groups(cli):
    from llmprobe import __version__

    result = cli("--version")
    assert result.code == 0 and __version__ in result.stdout
    help_text = cli("--help").stdout
    from llmprobe.registry import groups

    assert {"model", "eval", "weights", "activations"} <= set(groups())
    for group in groups():
        assert group in help_text


def test_unknown_option_is_one_line(cli):
    assert_one_line_error(cli("model", "info", "--bogus"), "--bogus")


def test_console_script_runs():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "llmprobe.cli.app", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "llmprobe" in out.stdout


# -- loading -----------------------------------------------------------------------------------

def test_resolve_sources(tmp_path, llama_dir):
    assert resolve_source(None).kind == "embedded"
    assert resolve_source(str(llama_dir)).kind == "local"
    assert resolve_source("meta-llama/Llama-2-7b-hf").kind == "hub"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_source(str(gguf)).kind == "gguf"
    with pytest.raises(LLMProbeError, match="does not exist"):
        resolve_source("./no/such/dir")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(LLMProbeError, match="not a .gguf"):
        resolve_source(str(tmp_path / "notes.txt"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LLMProbeError, match="no config.json"):
        resolve_source(str(empty))


def test_load_local_dir_matches_saved_model(llama_dir):
    from tiny import tiny_model

    lm = load_model(str(llama_dir), dtype="fp32", device="cpu")
    reference = tiny_model("llama")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(lm.model(ids).logits, reference(ids).logits, atol=1e-6)
    assert lm.dtype == torch.float32 and lm.device.type == "cpu"
    assert lm.source.trust_remote_code is False


def test_dtype_and_device_map(llama_dir):
    lm = load_model(str(llama_dir), dtype="bf16", device="cpu")
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    lm = load_model(str(llama_dir), dtype="fp32", device_map="auto")
    assert next(lm.model.parameters()).device.type == "cpu"
    with pytest.raises(LLMProbeError, match="--dtype"):
        load_model(str(llama_dir), dtype="fp8")
    with pytest.raises(LLMProbeError, match="CUDA") if not torch.cuda.is_available() else _nullcontext():
        load_model(str(llama_dir), device="cuda")


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


def test_pickle_checkpoint_loads_with_weights_only(tmp_path):
    from tiny import tiny_model

    model = tiny_model("llama")
    # transformers 5 writes only safetensors, so write the legacy pickle layout by hand
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    tiny_tokenizer().save_pretrained(tmp_path)
    assert (tmp_path / "pytorch_model.bin").is_file()
    lm = load_model(str(tmp_path), dtype="fp32", device="cpu")
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.allclose(lm.model(ids).logits, model(ids).logits, atol=1e-6)


def test_hub_id_offline_is_one_line(cli, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = cli("model", "info", "--model", "no-such-org/no-such-model-xyz")
    assert_one_line_error(result, "no-such-org/no-such-model-xyz")


def test_unknown_path_is_one_line(cli):
    assert_one_line_error(cli("model", "info", "--model", "./missing/model"), "does not exist")


def test_corrupt_safetensors_is_one_line(cli, tmp_path, llama_dir):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(llama_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    result = cli("eval", "perplexity", "--model", broken, "--dataset", _small_text(tmp_path), "--seqlen", "16",
                 "--out", tmp_path / "out")
    assert_one_line_error(result, "broken")
    assert not (tmp_path / "out" / "perplexity.csv").exists()


def test_truncated_gguf_is_one_line(cli, tmp_path):
    from llmprobe.core.loading import embedded_gguf_path

    data = embedded_gguf_path().read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[: len(data) // 50])
    result = cli("model", "info", "--model", bad)
    assert_one_line_error(result, "cut.gguf")


@pytest.mark.slow
def test_embedded_model_loads_from_cache_and_predicts(embedded):
    assert embedded.source.kind == "embedded"
    assert embedded.model.config.num_hidden_layers == 30
    ids = embedded.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        token = embedded.model(ids).logits[0, -1].argmax()
    assert embedded.tokenizer.decode(token).strip() == "Paris"
    from llmprobe.core.loading import converted_gguf_dir, embedded_gguf_path

    cached = converted_gguf_dir(embedded_gguf_path(), name="SmolLM2-135M-Instruct")
    assert (cached / "model.safetensors").is_file() and (cached / "config.json").is_file()


# -- output, manifest, records ---------------------------------------------------------------------

class _Row(Record):
    name: str
    value: float


def test_run_output_atomic_tables_and_manifest(tmp_path):
    out = tmp_path / "run"
    with RunOutput(out, command="test cmd", argv=["test", "cmd"]) as run:
        assert json.loads((out / "manifest.json").read_text())["status"] == "incomplete"
        run.write_table("rows", [_Row(name="a", value=1.5), _Row(name="b", value=float("nan"), extra=3)])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["finished_at"]
    assert manifest["files"] == ["rows.csv", "rows.json"]
    assert "torch" in manifest["libraries"]
    csv = (out / "rows.csv").read_text().splitlines()
    assert csv[0] == "name,value,extra"
    rows = json.loads((out / "rows.json").read_text())
    assert rows[1]["value"] is None and rows[1]["extra"] == 3
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_failed_run_is_marked_incomplete(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError):
        with RunOutput(out, command="x"):
            raise RuntimeError("boom")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "incomplete" and "boom" in manifest["error"]


def test_existing_out_needs_overwrite(cli, tmp_path, llama_dir):
    out = tmp_path / "layers"
    assert cli("model", "layers", "--model", llama_dir, "--out", out).code == 0
    assert_one_line_error(cli("model", "layers", "--model", llama_dir, "--out", out), "--overwrite")
    # A file llmprobe did not write makes the folder foreign: refused even with --overwrite.
    (out / "notes.txt").write_text("mine")
    assert_one_line_error(cli("model", "layers", "--model", llama_dir, "--out", out, "--overwrite"),
                          "did not write", "notes.txt")
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    # A table of the earlier run (listed in its manifest) does not survive the replacement.
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"].append("stale.csv")
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "stale.csv").write_text("old")
    assert cli("model", "layers", "--model", llama_dir, "--out", out, "--overwrite").code == 0
    assert not (out / "stale.csv").exists()


def test_schema_command(cli):
    listing = cli("schema")
    assert listing.code == 0 and "perplexity_result" in listing.stdout
    schema = json.loads(cli("schema", "perplexity_result").stdout)
    assert "ppl" in schema["properties"] and "nll_sum" in schema["properties"]
    assert_one_line_error(cli("schema", "no_such_record"), "unknown record")


# -- model info / layers -----------------------------------------------------------------------

def test_model_info_tiny(cli, llama_dir):
    from tiny import tiny_model

    result = cli("model", "info", "--model", llama_dir, "--json")
    assert result.code == 0, result
    info = json.loads(result.stdout)[0]
    model = tiny_model("llama")
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["layers"] == model.config.num_hidden_layers
    assert info["kv_heads"] == model.config.num_key_value_heads
    assert info["bytes_on_disk"] == (llama_dir / "model.safetensors").stat().st_size


def test_model_layers_census_and_filter(cli, tmp_path, llama_dir):
    out = tmp_path / "layers"
    result = cli("model", "layers", "--model", llama_dir, "--out", out, "--role", "mlp", "--json")
    assert result.code == 0, result
    rows = json.loads(result.stdout)
    assert {r["role"] for r in rows} == {"mlp.gate", "mlp.up", "mlp.down"}
    assert {r["layer"] for r in rows} == {0, 1}
    census = (out / "module_census.csv").read_text()
    assert "Linear" in census and "LlamaDecoderLayer" in census
    filtered = json.loads(cli("model", "layers", "--model", llama_dir, "--out", tmp_path / "f",
                              "--filter", r"layers\.1\..*q_proj", "--json").stdout)
    assert [r["name"] for r in filtered] == ["model.layers.1.self_attn.q_proj"]
    assert_one_line_error(cli("model", "layers", "--model", llama_dir, "--filter", "(", "--out", tmp_path / "g"),
                          "regex")


@pytest.mark.slow
def test_model_info_embedded(cli):
    info = json.loads(cli("model", "info", "--json").stdout)[0]
    assert info["architecture"] == "llama" and info["layers"] == 30 and info["hidden_size"] == 576
    assert info["heads"] == 9 and info["kv_heads"] == 3 and info["vocab_size"] == 49152
    assert 134_000_000 < info["parameters"] < 136_000_000


# -- perplexity ------------------------------------------------------------------------------------

def _small_text(tmp_path, wikitext=None):
    path = tmp_path / "small.txt"
    if wikitext is not None:
        path.write_text(wikitext.read_text(encoding="utf-8")[:20000], encoding="utf-8")
    else:
        path.write_text(" ".join(f"word{i % 37} token{i % 11}." for i in range(600)))
    return path


def _plain_hf_loop(model, ids, seqlen, windows):
    """The reference: a plain loop, HF computes the shifted loss itself."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(windows):
            x = ids[i * seqlen:(i + 1) * seqlen].unsqueeze(0)
            nll += model(x, labels=x).loss.double().item() * (seqlen - 1)
            count += seqlen - 1
    return math.exp(nll / count), nll, count


def _sliding_reference(model, ids, seqlen, stride):
    """The Hugging Face perplexity guide's loop, written independently."""
    nll, count, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, len(ids), stride):
            end = min(begin + seqlen, len(ids))
            trg = end - prev_end
            x = ids[begin:end].unsqueeze(0)
            labels = x.clone()
            labels[:, :-trg] = -100
            n_valid = int((labels[:, 1:] != -100).sum())
            nll += model(x, labels=labels).loss.double().item() * n_valid
            count += n_valid
            prev_end = end
            if end == len(ids):
                break
    return math.exp(nll / count), count


def test_perplexity_matches_plain_loop_tiny(cli, tmp_path, llama_dir, wikitext_path):
    from llmprobe.core.data import load_corpus, tokenize_corpus

    text = _small_text(tmp_path, wikitext_path)
    lm = load_model(str(llama_dir), dtype="fp32", device="cpu")
    ids = tokenize_corpus(load_corpus(str(text)), lm.tokenizer)
    ppl, nll, count = _plain_hf_loop(lm.model, ids, 32, 5)
    for batch in ("1", "2"):
        result = cli("eval", "perplexity", "--model", llama_dir, "--dataset", text, "--seqlen", "32",
                     "--max-windows", "5", "--batch-size", batch, "--json", "--out", tmp_path / f"p{batch}")
        assert result.code == 0, result
        row = json.loads(result.stdout)[0]
        assert row["tokens"] == count and row["windows"] == 5
        assert row["ppl"] == pytest.approx(ppl, rel=1e-5)
        assert row["nll_sum"] == pytest.approx(nll, rel=1e-5)
        assert row["bits_per_byte"] == pytest.approx(nll / math.log(2) / row["bytes"])


def test_sliding_window_matches_hf_guide(tmp_path, llama_dir, wikitext_path):
    from llmprobe.analyses.perplexity import perplexity
    from llmprobe.core.data import load_corpus, tokenize_corpus

    lm = load_model(str(llama_dir), dtype="fp32", device="cpu")
    ids = tokenize_corpus(load_corpus(str(_small_text(tmp_path, wikitext_path))), lm.tokenizer)[:700]
    ppl, count = _sliding_reference(lm.model, ids, 64, 24)
    result = perplexity(lm, ids, seqlen=64, stride=24)
    assert result.protocol == "sliding" and result.tokens == count == len(ids) - 1
    assert result.ppl == pytest.approx(ppl, rel=1e-5)


@pytest.mark.slow
def test_perplexity_embedded_matches_plain_hf_loop(cli, tmp_path, embedded, wikitext_path):
    from llmprobe.core.data import load_corpus, tokenize_corpus

    ids = tokenize_corpus(load_corpus(str(wikitext_path)), embedded.tokenizer)
    ppl, nll, count = _plain_hf_loop(embedded.model, ids, 256, 3)
    result = cli("eval", "perplexity", "--dataset", wikitext_path, "--seqlen", "256", "--max-windows", "3",
                 "--json", "--out", tmp_path / "ppl")
    assert result.code == 0, result
    row = json.loads(result.stdout)[0]
    assert abs(row["ppl"] - ppl) / ppl < 1e-4
    assert row["tokens"] == count
    manifest = json.loads((tmp_path / "ppl" / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["dataset"]["sha256"] and manifest["model"]["gguf_sha256"]
    assert manifest["seqlen"] == 256 and manifest["model"]["dtype"] == "float32"


@pytest.mark.parametrize("args, needle", [
    (["--seqlen", "0"], "--seqlen"),
    (["--seqlen", "100000"], "maximum"),
    (["--stride", "0"], "stride"),
    (["--max-windows", "0"], "max-windows"),
    (["--batch-size", "0"], "batch-size"),
])
def test_perplexity_bad_options(cli, tmp_path, llama_dir, args, needle):
    result = cli("eval", "perplexity", "--model", llama_dir, "--dataset", _small_text(tmp_path), *args,
                 "--out", tmp_path / "out")
    assert_one_line_error(result, needle)


def test_perplexity_bad_data(cli, tmp_path, llama_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    assert_one_line_error(cli("eval", "perplexity", "--model", llama_dir, "--dataset", empty), "no text")
    assert_one_line_error(cli("eval", "perplexity", "--model", llama_dir, "--dataset", "nosuchset"), "nosuchset")
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    assert_one_line_error(cli("eval", "perplexity", "--model", llama_dir, "--dataset", short, "--seqlen", "64",
                              "--out", tmp_path / "o"), "fewer than")


def test_hub_dataset_offline_is_one_line(cli, llama_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    result = cli("eval", "perplexity", "--model", llama_dir, "--dataset", "wikitext2", "--out", tmp_path / "o")
    assert_one_line_error(result, "local")
    assert not os.path.exists(tmp_path / "o" / "perplexity.csv")
