"""The five robustness commands through the CLI and llmprobe.run on a tiny llama; bad input gives
one line and exit 2 before anything is written."""

import csv
import json

import pytest
import torch
from conftest import WIKITEXT, assert_one_line_error, run_cli
from tiny import save_tiny_model_dir

torch.set_num_threads(1)

DATA = ["--seqlen", "24", "--max-windows", "2"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """The first lines of WikiText-2 test: enough for 2 windows, quick to tokenize."""
    path = tmp_path_factory.mktemp("data") / "small.txt"
    with open(WIKITEXT, encoding="utf-8") as handle:
        path.write_text("".join(line for _, line in zip(range(40), handle)), encoding="utf-8")
    return path


def rows(folder, table):
    with open(folder / f"{table}.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize(("command", "args", "tables", "figures"), [
    ("ablation", ["--granularity", "block"], ["ablation", "block_similarity", "similarity_agreement", "reference"],
     ["ablation_ranking", "block_similarity"]),
    ("ablation", ["--roles", "mlp", "--layers", "1", "--mode", "mean"], ["ablation"],
     ["ablation_ranking", "ablation_heatmap_delta_ppl"]),
    ("noise", ["--sigmas", "0,0.2", "--repeats", "2", "--roles", "mlp.down"], ["noise_runs", "noise_summary"],
     ["noise_curves"]),
    ("bit-flip", ["--bits", "31,30,0", "--count", "2"], ["bit_flips", "bit_positions"], ["bit_positions"]),
    ("bit-flip", ["--target", "model.layers.0.mlp.down_proj", "--index", "3,5", "--bits", "31"], ["bit_flips"], []),
    ("super-weights", ["--threshold", "1"], ["super_weights", "super_weight_checks", "down_proj_spikes",
                                             "massive_activations"], ["super_weight_spikes"]),
    ("adversarial", ["--text", "The tower is 324 metres tall, the tallest in Paris.", "--attacks", "random,hotflip,pgd",
                     "--budgets", "1", "--eps", "0.1", "--pgd-steps", "2", "--repeats", "1"],
     ["adversarial_runs", "adversarial_summary"], ["adversarial"]),
])
def test_command_runs_and_writes(command, args, tables, figures, model_dir, text_file, tmp_path):
    out = tmp_path / "run"
    result = run_cli("robustness", command, "--model", model_dir, "--dataset", text_file, *DATA, *args, "--out", out,
                     "--quiet", "--plot")
    assert result.code == 0, result
    for table in tables:
        assert (out / f"{table}.csv").is_file(), table
    for stem in figures:
        assert (out / f"{stem}.png").is_file(), stem
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    if command == "noise":
        zero = [r for r in rows(out, "noise_runs") if float(r["sigma"]) == 0.0]
        assert zero and all(float(r["kl"]) == 0.0 for r in zero)
    if command == "bit-flip" and "--target" in args:
        (flip,) = rows(out, "bit_flips")
        assert (flip["weight_row"], flip["weight_col"], flip["bit_role"]) == ("3", "5", "sign")
        assert float(flip["value_after"]) == -float(flip["value_before"])


def test_python_run_matches_the_cli(model_dir, text_file, tmp_path):
    import llmprobe

    by_cli, by_python = tmp_path / "cli", tmp_path / "python"
    args = ["--sigmas", "0.1", "--repeats", "1", "--roles", "attn.v", "--dataset", text_file]
    assert run_cli("robustness", "noise", "--model", model_dir, *DATA, *args, "--out", by_cli, "--quiet").code == 0
    llmprobe.run("robustness.noise", model=str(model_dir), dataset=str(text_file), seqlen=24, max_windows=2,
                 sigmas=[0.1], repeats=1, roles=["attn.v"], out=by_python)
    for table in ("noise_runs", "noise_summary", "reference"):
        assert (by_cli / f"{table}.csv").read_bytes() == (by_python / f"{table}.csv").read_bytes()


@pytest.mark.parametrize(("command", "args", "needle"), [
    ("bit-flip", ["--target", "model.layers.0.mlp.nope", "--index", "0,0"], "no linear module"),
    ("bit-flip", ["--target", "model.layers.0.mlp.down_proj", "--index", "999,0"], "--index"),
    ("bit-flip", ["--target", "model.layers.0.mlp.down_proj", "--index", "1"], "--index"),
    ("bit-flip", ["--target", "model.layers.0.mlp.down_proj"], "--index"),
    ("bit-flip", ["--bits", "32"], "--bits"),
    ("noise", ["--sigmas", "-0.1"], "--sigmas"),
    ("noise", ["--roles", "attn.qkv"], "no linear matrix"),
    ("noise", ["--filter", "nothing-matches"], "no linear matrix"),
    ("ablation", ["--granularity", "block", "--mode", "mean"], "--mode"),
    ("ablation", ["--layers", "7"], "out of range"),
    ("ablation", ["--span", "5"], "--span"),
    ("super-weights", ["--relative", "0.5"], "--relative"),
    ("adversarial", ["--attacks", "gcg"], "--attacks"),
    ("adversarial", ["--rates", "2"], "--rates"),
    ("adversarial", ["--budgets", "0"], "--budgets"),
])
def test_bad_input_is_one_line_and_writes_nothing(command, args, needle, model_dir, text_file, tmp_path):
    out = tmp_path / "never"
    result = run_cli("robustness", command, "--model", model_dir, "--dataset", text_file, *DATA, *args, "--out", out)
    assert_one_line_error(result, needle)
    assert not out.exists()
