"""Runs on several processes (core/distributed.py): sharding, merging, failing together, and whole
analyses under ``torchrun --nproc-per-node 2`` / ``accelerate launch`` on CPU (gloo) compared row
by row with one process.

References are independent of the code under test: a brute-force optimum for the cost balance,
one collector fed every window for the merged collectors (itself tested against scipy in
test_activation_stats.py, and here once more against scipy), and a plain one-process run for the
launched analyses.
"""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing
import os
import pickle
import random
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import scipy.stats
import torch

from llmprobe.core import distributed
from llmprobe.core.collect import Batch
from llmprobe.core.collectors import ChannelCollector, MomentCollector, TokenCollector

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
DRIVER = ROOT / "tests" / "distributed_driver.py"


# -- sharding ---------------------------------------------------------------------------------


def test_split_bounds_cover_everything_contiguously():
    for count in range(0, 12):
        for parts in range(1, 5):
            bounds = distributed.split_bounds(count, parts)
            assert len(bounds) == parts
            assert bounds[0][0] == 0 and bounds[-1][1] == count
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            sizes = [stop - start for start, stop in bounds]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_one_process_is_the_identity():
    assert not distributed.is_distributed() and distributed.is_main() and distributed.world_size() == 1
    assert distributed.share(range(5)) == [0, 1, 2, 3, 4]
    assert distributed.map_shards([3, 1, 2], lambda part: [x * 10 for x in part], costs=[1, 2, 3]) == [30, 10, 20]
    assert distributed.exchange("x") == ["x"]
    assert distributed.broadcast(7) == 7
    assert distributed.settle(lambda a, b=0: a + b, 1, b=2) == 3
    with pytest.raises(ValueError):
        distributed.settle(lambda: (_ for _ in ()).throw(ValueError("boom")))
    assert distributed.facts() == {}
    assert distributed.device_map_limits() == {}


def _makespan(costs, parts, assignment):
    return max(sum(costs[i] for i in part) for part in assignment) if parts else 0


def test_shard_by_cost_balances_cost_not_count():
    # One big matrix and four small ones: a count split would put 3 items (incl. the big one)
    # on one rank; by cost the big one is alone.
    assert distributed.shard_by_cost([100, 1, 1, 1, 1], 2) == [[0], [1, 2, 3, 4]]
    rng = random.Random(0)
    for _ in range(40):
        n, parts = rng.randint(1, 8), rng.randint(1, 3)
        costs = [rng.choice([1, 2, 3, 7, 50]) * rng.randint(1, 9) for _ in range(n)]
        assignment = distributed.shard_by_cost(costs, parts)
        assert sorted(i for part in assignment for i in part) == list(range(n))
        assert all(part == sorted(part) for part in assignment)
        assert assignment == distributed.shard_by_cost(costs, parts)  # deterministic
        best = min(max(sum(c for c, p in zip(costs, choice) if p == q) for q in range(parts))
                   for choice in itertools.product(range(parts), repeat=n))
        # Graham's bound for longest-processing-time first: at most (4/3 - 1/(3p)) of optimal
        assert _makespan(costs, parts, assignment) <= (4 / 3 - 1 / (3 * parts)) * best + 1e-9


def test_matrix_cost_is_mn_min():
    assert distributed.matrix_cost((64, 32)) == 64 * 32 * 32
    assert distributed.matrix_cost((3, 10)) == 3 * 10 * 3
    assert distributed.matrix_cost((7,)) == 7


# -- merging collectors (in one process: two shards folded vs one collector over everything) -----


def _batches(seed=0, windows=6, length=5, features=8):
    """Batches of one window each, with a large channel offset (the hard case for moments)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for w in range(windows):
        x = torch.randn(length, features, generator=g) * (1 + w) + 40.0
        x[:, 3] *= 20
        ids = torch.randint(0, 30, (length,), generator=g)
        out.append(Batch(x=x, token_ids=ids, window=torch.full((length,), w), position=torch.arange(length)))
    return out


def _fold(make, batches, keys=("a", "b")):
    collector = make()
    for batch in batches:
        for key in keys:
            collector.update(key, Batch(x=batch.x * (2 if key == "b" else 1), token_ids=batch.token_ids,
                                        window=batch.window, position=batch.position))
    return collector


@pytest.mark.parametrize("split", [1, 2, 4])
def test_merged_collectors_equal_one_collector(split):
    batches = _batches()
    for make in (MomentCollector, ChannelCollector, lambda: TokenCollector(kurtosis=True, argmax_channel=True)):
        whole = _fold(make, batches)
        left, right = _fold(make, batches[:split]), _fold(make, batches[split:])
        merged = make()
        merged.load_shard_state(left.shard_state())
        merged.merge_shard_state(right.shard_state())
        for key in ("a", "b"):
            expected, got = whole.result(key), merged.result(key)
            for name, value in vars(expected).items():
                other = getattr(got, name)
                if isinstance(value, torch.Tensor):
                    assert torch.allclose(other.double(), value.double(), rtol=1e-13, atol=0, equal_nan=True), name
                    if isinstance(merged, TokenCollector):  # concatenation: exact
                        assert torch.allclose(other, value, rtol=0, atol=0, equal_nan=True), name
                elif isinstance(value, float):
                    assert other == pytest.approx(value, rel=1e-12, nan_ok=True), name
                else:
                    assert other == value, name
    # and against scipy directly: pooled kurtosis of every value of key "a"
    everything = torch.cat([b.x for b in batches]).double().numpy().ravel()
    merged = MomentCollector()
    merged.load_shard_state(_fold(MomentCollector, batches[:split]).shard_state())
    merged.merge_shard_state(_fold(MomentCollector, batches[split:]).shard_state())
    assert merged.result("a").kurtosis_pooled == pytest.approx(
        scipy.stats.kurtosis(everything, fisher=True, bias=True), rel=1e-10)


def test_quant_error_collector_merges():
    from types import SimpleNamespace

    from llmprobe.analyses.activation_quant import _QuantErrorCollector, _TokenErrorStats, quant_spec

    batches = _batches(seed=1)
    windows = torch.stack([b.token_ids for b in batches])
    spec = quant_spec(4, "int", "per-token", None, True)
    members = {"a": [SimpleNamespace(layer=0, role="attn.q")], "b": [SimpleNamespace(layer=1, role="mlp.down")]}

    def make():
        return _QuantErrorCollector(spec, members, _TokenErrorStats(windows))

    whole = _fold(make, batches)
    merged = make()
    merged.load_shard_state(_fold(make, batches[:2]).shard_state())
    merged.merge_shard_state(_fold(make, batches[2:]).shard_state())
    for key in members:
        assert merged.sse[key] == pytest.approx(whole.sse[key], rel=1e-13)
        assert merged.signal[key] == pytest.approx(whole.signal[key], rel=1e-13)
        assert merged.tokens[key] == whole.tokens[key]
    assert set(merged.token_stats.scopes) == set(whole.token_stats.scopes)
    for scope, state in whole.token_stats.scopes.items():
        for name, values in state.items():
            assert torch.allclose(merged.token_stats.scopes[scope][name], values, rtol=1e-13, atol=0), (scope, name)


# -- two processes forked here (fast: torch is already imported) ---------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _world_child(rank, port, scenario, out):
    code = 0
    try:
        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                          WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", LLMPROBE_DIST_BACKEND="gloo")
        assert distributed.init_from_env()
        result = scenario(rank)
    except Exception as exc:  # reported to the parent
        result = {"error": type(exc).__name__, "message": str(exc), "exit_code": getattr(exc, "exit_code", None)}
    try:
        with open(out / f"rank{rank}.pkl", "wb") as fh:
            pickle.dump(result, fh)
        distributed.shutdown()
    finally:
        os._exit(code)


def _run_world(scenario, tmp_path, timeout=60):
    ctx = multiprocessing.get_context("fork")
    port = _free_port()
    procs = [ctx.Process(target=_world_child, args=(r, port, scenario, tmp_path)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()
            pytest.fail("a rank hung")
    return [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(2)]


def _scenario_shards(rank):
    seen = []

    def work(part):
        seen.extend(part)
        return [f"<{x}>" for x in part]

    items = ["big", "s1", "s2", "s3"]
    mapped = distributed.map_shards(items, work, costs=[100, 1, 1, 1])
    collector = MomentCollector()
    for batch in distributed.share(_batches()):
        collector.update("a", batch)
    distributed.merge_collectors([collector])
    return {"mapped": mapped, "seen": seen, "rank": distributed.rank(), "world": distributed.world_size(),
            "moments": vars(collector.result("a")), "started": distributed.broadcast(f"from {rank}"),
            "facts": distributed.facts()}


def test_two_ranks_shard_and_merge(tmp_path):
    results = _run_world(_scenario_shards, tmp_path)
    assert all("error" not in r for r in results), results
    assert [r["seen"] for r in results] == [["big"], ["s1", "s2", "s3"]]
    whole = _fold(MomentCollector, _batches(), keys=("a",)).result("a")
    for r in results:
        assert r["mapped"] == ["<big>", "<s1>", "<s2>", "<s3>"]
        assert r["started"] == "from 0"
        assert r["facts"]["world_size"] == 2 and r["facts"]["backend"] == "gloo"
        for name, value in vars(whole).items():
            assert r["moments"][name] == pytest.approx(value, rel=1e-12, nan_ok=True), name


def _scenario_failure(rank):
    def compute():
        if rank == 1:
            raise ValueError("boom on one rank")
        return distributed.map_shards([1, 2, 3], lambda part: part)  # rank 0 waits here for rank 1

    try:
        distributed.settle(compute)
    except distributed.RankFailed as exc:
        try:  # the world has failed: no further collective may wait for anyone
            distributed.exchange("again")
        except distributed.RankFailed:
            return {"error": "RankFailed", "message": str(exc), "exit_code": exc.exit_code}
    return {"error": None}


def test_a_failing_rank_fails_every_rank(tmp_path):
    results = _run_world(_scenario_failure, tmp_path)
    for r in results:
        assert r["error"] == "RankFailed"
        assert r["message"] == "rank 1 of 2 failed: ValueError: boom on one rank"
        assert r["exit_code"] == 1


def _scenario_refusal(rank):
    from llmprobe.core.errors import LLMProbeError

    def check():
        if rank == 0:
            raise LLMProbeError("--out runs/x already holds results")

    try:
        distributed.settle(check)
    except distributed.RankRefused as exc:  # bad input: exit 2, and the disk is left as it was
        return {"error": "RankRefused", "message": str(exc), "exit_code": exc.exit_code}
    return {"error": None}


def test_bad_input_on_one_rank_is_refused_everywhere(tmp_path):
    for r in _run_world(_scenario_refusal, tmp_path):
        assert r == {"error": "RankRefused", "message": "rank 0 of 2 failed: --out runs/x already holds results",
                     "exit_code": 2}


# -- whole analyses under torchrun / accelerate launch (slow: each launch imports torch twice) ----


@pytest.fixture(scope="module")
def world_inputs(tmp_path_factory):
    from tiny import save_tiny_model_dir

    root = tmp_path_factory.mktemp("distributed")
    model = save_tiny_model_dir("llama", root / "tiny")
    data = root / "data.txt"
    wiki = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
    data.write_text("".join(wiki.read_text(encoding="utf-8").splitlines(keepends=True)[:300]), encoding="utf-8")
    return root, model, data


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]),
            "OMP_NUM_THREADS": "1", "LLMPROBE_PROGRESS": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _torchrun(*args, timeout=400):
    command = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *map(str, args)]
    return subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _same_table(one: Path, two: Path) -> None:
    a, b = pd.read_csv(one), pd.read_csv(two)
    assert list(a.columns) == list(b.columns), one.name
    assert len(a) == len(b), one.name
    if "created_at" in b:  # a time stamp: differs between runs, one value (rank 0's) within a run
        assert b["created_at"].nunique() == 1
    for (_, x), (_, y) in zip(a.iterrows(), b.iterrows()):  # row by row
        for column in (c for c in a.columns if c != "created_at"):
            u, v = x[column], y[column]
            if isinstance(u, float) and isinstance(v, float):
                if math.isnan(u) or math.isnan(v):
                    assert math.isnan(u) and math.isnan(v), (one.name, column)
                else:  # fp64 round-off of a different summation order
                    assert v == pytest.approx(u, rel=1e-12, abs=1e-300), (one.name, column, u, v)
            else:
                assert u == v, (one.name, column, u, v)


# Tables whose rows are concatenations or per-item results: equal bit for bit. (quant_error
# tables hold sums of per-token fp64 errors over windows: rank order changes their last bits,
# checked to 1e-12 above.)
EXACT = ("magnitude_", "perplexity", "precision_", "weight_", "transformer_matrix")


@pytest.mark.slow
def test_two_processes_equal_one_process(world_inputs):
    from distributed_driver import run_all

    root, model, data = world_inputs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the launched ranks run one thread each: same kernels, same sums
    try:
        run_all(str(model), str(data), str(root / "one"))
    finally:
        torch.set_num_threads(threads)
    done = _torchrun(DRIVER, model, data, root / "two")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0 of 2 done" in done.stderr and "rank 1 of 2 done" in done.stderr
    names = sorted(p.name for p in (root / "one").iterdir())
    assert names == sorted(p.name for p in (root / "two").iterdir())
    for name in ("activations.kurtosis", "activations.magnitude", "activations.quant-error", "activations.norms",
                 "weights.alpha-hill", "eval.perplexity", "weights.stats", "weights.spectrum"):
        assert name in names
    for folder in names:
        one, two = root / "one" / folder, root / "two" / folder
        manifest = json.loads((two / "manifest.json").read_text())
        assert manifest["status"] == "complete"
        assert manifest["distributed"]["world_size"] == 2 and manifest["distributed"]["backend"] == "gloo"
        assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
        for table in sorted(one.glob("*.csv")):
            _same_table(table, two / table.name)
            if table.name.startswith(EXACT):
                a, b = pd.read_csv(table), pd.read_csv(two / table.name)
                if "created_at" in a:
                    a, b = a.drop(columns="created_at"), b.drop(columns="created_at")
                pd.testing.assert_frame_equal(a, b, check_exact=True)


@pytest.mark.slow
def test_a_failing_rank_leaves_an_incomplete_manifest(world_inputs):
    root, model, data = world_inputs
    done = _torchrun(DRIVER, model, data, root / "failed", "--fail-rank", "1", "--only", "activations.kurtosis")
    assert done.returncode != 0
    assert "rank 1 of 2 failed: RuntimeError: injected failure on rank 1" in done.stderr
    folder = root / "failed" / "activations.kurtosis"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "incomplete"
    assert "rank 1 of 2 failed" in manifest["error"]
    assert not list(folder.glob("*.csv"))


@pytest.mark.slow
def test_cli_under_accelerate_launch(world_inputs):
    """`accelerate launch --multi_gpu` starts torchrun's launcher (gloo on CPU); the CLI prints
    its summary once (rank 0) and writes one folder."""
    pytest.importorskip("accelerate")
    root, model, data = world_inputs
    out = root / "accelerate-kurtosis"
    accelerate = Path(PYTHON).with_name("accelerate")
    if not accelerate.exists():
        pytest.skip("no accelerate launcher beside this Python")
    command = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
               "-m", "llmprobe.cli.app", "activations", "kurtosis", "--model", str(model), "--dataset", str(data),
               "--nsamples", "5", "--seqlen", "24", "--seed", "3", "--device", "cpu", "--out", str(out)]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("excess kurtosis per layer") == 1, done.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["distributed"]["world_size"] == 2 and manifest["distributed"]["launcher"] == "accelerate"
    reference = root / "one" / "activations.kurtosis"
    if reference.is_dir():  # written by test_two_processes_equal_one_process (same options)
        for table in sorted(reference.glob("*.csv")):
            _same_table(table, out / table.name)
