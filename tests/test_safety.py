"""Never lose a user's files, and one clean line for every failure (issue 8).

Output folders (core/output.py): what --out may be, what --overwrite replaces, staging and
swap, one lock per folder, umask. Failure classes decided in core (devices, loading, data,
weight source, collect) each end in one LLMProbeError line. Then the same through the CLI
commands that exist today.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import ROOT, assert_one_line_error
from tiny import save_tiny_model_dir

from llmprobe.core import data as data_mod
from llmprobe.core.devices import DTYPES, resolve_device
from llmprobe.core.errors import LLMProbeError
from llmprobe.core.output import (
    LOCK_SUFFIX,
    PREVIOUS_SUFFIX,
    STAGING_SUFFIX,
    RunOutput,
    check_out_target,
    inspect_folder,
)
from llmprobe.core.records import Record


class _Row(Record):
    name: str
    value: float


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (and the folder's own entries)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def complete_run(folder: Path, value: float = 1.0) -> dict[str, bytes]:
    with RunOutput(folder, command="test run", argv=["test", "run"]) as run:
        run.write_table("rows", [_Row(name="a", value=value)])
        run.write_json("extra", {"v": value})
    return snapshot(folder)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


# ============================================================================ check_out_target


@pytest.mark.parametrize("value, needle", [("", "empty"), (".", "current folder"), ("./", "current folder")])
def test_empty_and_dot_are_refused(value, needle):
    with pytest.raises(LLMProbeError, match=needle):
        check_out_target(value, overwrite=True)


def test_current_folder_home_and_their_ancestors_are_refused(tmp_path, monkeypatch):
    home, work = tmp_path / "home", tmp_path / "home" / "proj"
    work.mkdir(parents=True)
    (work / "thesis.tex").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    for target, needle in [(work, "current folder"), (home, "home folder"), ("~", "home folder"),
                           (tmp_path, "contains"), ("..", "home folder"), ("/", "root")]:
        with pytest.raises(LLMProbeError, match=needle):
            check_out_target(target, overwrite=True)
    assert (work / "thesis.tex").read_text() == "mine"


def test_tilde_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert check_out_target("~/results/x") == tmp_path / "results" / "x"
    with pytest.raises(LLMProbeError, match="no user 'nosuchuser'"):
        check_out_target("~nosuchuser/x")


def test_model_folder_is_refused(tmp_path):
    model = tmp_path / "models" / "m"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    with pytest.raises(LLMProbeError, match="model's folder"):
        check_out_target(model, overwrite=True, model_path=model)
    with pytest.raises(LLMProbeError, match="contains the model"):
        check_out_target(tmp_path / "models", overwrite=True, model_path=model)
    gguf = tmp_path / "g" / "x.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    with pytest.raises(LLMProbeError, match="model's folder"):
        check_out_target(gguf.parent, overwrite=True, model_path=gguf)
    # A folder inside the model's folder holds no risk to it, and a hub id is not a path.
    assert check_out_target(model / "results", model_path=model) == model / "results"
    assert check_out_target(tmp_path / "o", model_path="org/name") == tmp_path / "o"


@pytest.mark.parametrize("target, needle", [
    ("/proc/llmprobe-x", "/proc"), ("/sys/llmprobe-x", "/sys"), ("/dev/null", "/dev"), ("/dev/shm", "/dev"),
    ("/dev/llmprobe-x", "/dev"),
])
def test_system_trees_are_refused(target, needle):
    with pytest.raises(LLMProbeError, match=needle):
        check_out_target(target, overwrite=True)


def test_files_devices_and_paths_below_a_file_are_refused(tmp_path):
    afile = tmp_path / "a.txt"
    afile.write_text("x")
    with pytest.raises(LLMProbeError, match="is a regular file, not a folder"):
        check_out_target(afile, overwrite=True)
    with pytest.raises(LLMProbeError, match="below .*a regular file"):
        check_out_target(afile / "sub" / "x")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(LLMProbeError, match="named pipe"):
        check_out_target(fifo, overwrite=True)
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(LLMProbeError, match="broken symbolic link"):
        check_out_target(link)
    assert afile.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_parent_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(LLMProbeError, match="not writable"):
            check_out_target(locked / "x")
    finally:
        locked.chmod(0o700)


def test_foreign_folder_is_refused_with_or_without_overwrite(tmp_path):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    before = snapshot(out)
    for overwrite, needle in [(False, "did not write"), (True, "only replaces an earlier llmprobe run")]:
        with pytest.raises(LLMProbeError, match=needle) as info:
            RunOutput(out, command="x", overwrite=overwrite)
        assert "thesis.tex" in str(info.value) and "\n" not in str(info.value)
    assert snapshot(out) == before and leftovers(out) == []


def test_run_with_a_foreign_file_is_refused(tmp_path):
    out = tmp_path / "run"
    complete_run(out)
    (out / "notes.txt").write_text("mine")
    (out / "figures").mkdir()
    (out / "figures" / "mine.png").write_bytes(b"png")
    before = snapshot(out)
    with pytest.raises(LLMProbeError, match="plus files llmprobe did not write"):
        RunOutput(out, command="x", overwrite=True)
    assert snapshot(out) == before
    state = inspect_folder(out)
    assert state.kind == "foreign" and set(state.foreign_files) == {"notes.txt", "figures/mine.png"}


def test_a_manifest_that_llmprobe_did_not_write_makes_the_folder_foreign(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "manifest.json").write_text('{"name": "my package"}')
    with pytest.raises(LLMProbeError, match="did not write"):
        RunOutput(out, command="x", overwrite=True)
    assert (out / "manifest.json").read_text() == '{"name": "my package"}'


# ============================================================================ staging and swap


def test_complete_run_needs_overwrite_and_is_replaced_whole(tmp_path):
    out = tmp_path / "run"
    complete_run(out, 1.0)
    with pytest.raises(LLMProbeError, match="--overwrite"):
        RunOutput(out, command="x")
    with RunOutput(out, command="y", overwrite=True) as run:
        assert run.dir != out and run.dir.parent == out.parent  # staged beside the target
        assert (out / "rows.csv").is_file()                     # the earlier run is untouched meanwhile
        run.write_table("other", [_Row(name="b", value=2.0)])
    assert run.dir == out
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "other.csv", "other.json"]
    assert manifest_of(out)["status"] == "complete" and leftovers(out) == []


@pytest.mark.parametrize("failure", [RuntimeError("boom"), KeyboardInterrupt(), LLMProbeError("--x bad")])
def test_failing_overwrite_leaves_the_earlier_run_byte_for_byte(tmp_path, failure):
    out = tmp_path / "run"
    before = complete_run(out)
    with pytest.raises(type(failure)):
        with RunOutput(out, command="x", overwrite=True) as run:
            run.write_table("rows", [_Row(name="new", value=9.0)])
            raise failure
    assert snapshot(out) == before
    assert leftovers(out) == []  # staging removed, lock released


def test_killed_overwrite_run_leaves_the_earlier_run_and_is_cleaned_up(tmp_path):
    out = tmp_path / "run"
    before = complete_run(out)
    script = (f"import sys, time; sys.path.insert(0, {str(ROOT / 'src')!r})\n"
              "from llmprobe.core.output import RunOutput\n"
              f"run = RunOutput({str(out)!r}, command='slow', overwrite=True, argv=['slow']).__enter__()\n"
              "run.write_json('partial', {'x': 1})\n"
              "print('ready', flush=True)\n"
              "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        # While it runs: a second run is refused and told who holds the folder.
        with pytest.raises(LLMProbeError, match=f"in use by another llmprobe run \\(pid {proc.pid} ") as info:
            RunOutput(out, command="x", overwrite=True)
        assert "llmprobe slow" in str(info.value)
        assert (out.parent / f".{out.name}{STAGING_SUFFIX}" / "partial.json").is_file()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert snapshot(out) == before
    # The lock died with the process; the next run recovers and cleans the staging folder.
    with RunOutput(out, command="after", overwrite=True) as run:
        run.write_json("after", {})
    assert manifest_of(out)["command"] == "after" and leftovers(out) == []


def test_first_run_that_fails_is_visible_as_incomplete_and_does_not_block(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        with RunOutput(out, command="x") as run:
            run.write_table("rows", [_Row(name="a", value=1.0)])
            raise KeyboardInterrupt
    manifest = manifest_of(out)
    assert manifest["status"] == "incomplete" and "interrupted" in manifest["error"]
    assert manifest["files"] == ["rows.csv", "rows.json"]
    assert inspect_folder(out).kind == "run"
    # The corrected rerun needs no --overwrite: an incomplete run protects nothing.
    complete_run(out)
    assert manifest_of(out)["status"] == "complete"


def test_bad_input_inside_a_run_changes_nothing_on_disk(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(LLMProbeError):
        with RunOutput(out, command="x") as run:
            run.write_table("rows", [_Row(name="a", value=1.0)])
            raise LLMProbeError("--batch-size must be at least 1")
    assert not out.exists() and leftovers(out) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LLMProbeError):
        with RunOutput(empty, command="x") as run:
            run.write_json("x", {})
            raise LLMProbeError("bad")
    assert list(empty.iterdir()) == [] and leftovers(empty) == []
    # Over an earlier incomplete run: that run stays as it was, too.
    with pytest.raises(RuntimeError):
        with RunOutput(out, command="crashed"):
            raise RuntimeError("crash")
    before = snapshot(out)
    with pytest.raises(LLMProbeError):
        with RunOutput(out, command="x"):
            raise LLMProbeError("bad")
    assert snapshot(out) == before


def test_failure_over_an_incomplete_run_replaces_it(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError):
        with RunOutput(out, command="first"):
            raise RuntimeError("first failure")
    with pytest.raises(RuntimeError):
        with RunOutput(out, command="second"):
            raise RuntimeError("second failure")
    assert "second failure" in manifest_of(out)["error"] and leftovers(out) == []


def test_killed_in_place_run_lists_its_files(tmp_path):
    # Files are registered before they are renamed into place: a run killed at any point
    # leaves a manifest naming every file, so its folder is still recognised as a run.
    out = tmp_path / "run"
    run = RunOutput(out, command="x").__enter__()
    run.write_table("rows", [_Row(name="a", value=1.0)])
    assert manifest_of(out)["files"] == ["rows.csv", "rows.json"] and manifest_of(out)["status"] == "incomplete"
    (out / ".rows.csv.abcd1234.tmp").write_text("half")  # an atomic write cut short
    run._lock.release()                                   # what the kernel does when the process dies
    run._finished = True
    assert inspect_folder(out).kind == "run"
    complete_run(out)


def test_swap_cut_between_its_renames_is_undone(tmp_path):
    out = tmp_path / "run"
    before = complete_run(out)
    os.rename(out, out.parent / f".{out.name}{PREVIOUS_SUFFIX}")  # killed after the first rename
    with pytest.raises(LLMProbeError, match="--overwrite"):
        RunOutput(out, command="x")  # recovery puts the earlier run back, which is complete
    assert snapshot(out) == before and leftovers(out) == []


def test_stale_lock_file_is_recovered(tmp_path):
    out = tmp_path / "run"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".run{LOCK_SUFFIX}").write_text(json.dumps(
        {"pid": dead.pid, "host": "here", "command": "llmprobe old", "started_at": "yesterday"}))
    complete_run(out)
    assert not (tmp_path / f".run{LOCK_SUFFIX}").exists()


def test_second_run_in_the_same_process_is_refused(tmp_path):
    out = tmp_path / "run"
    with RunOutput(out, command="first", argv=["first"]):
        with pytest.raises(LLMProbeError, match=f"pid {os.getpid()} .*llmprobe first"):
            RunOutput(out, command="second")
    assert manifest_of(out)["status"] == "complete"


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        complete_run(tmp_path / "a")
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "a").iterdir()}
        assert set(modes.values()) == {0o644}, modes
        assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o755
        os.umask(0o077)
        complete_run(tmp_path / "b")
        assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "b").iterdir()} == {0o600}
        # Staged runs too: the staging folder is created with the umask, not mkdtemp's 0700.
        os.umask(0o022)
        with RunOutput(tmp_path / "a", command="x", overwrite=True) as run:
            run.write_json("x", {})
        assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o755
    finally:
        os.umask(old)


def test_file_names_stay_inside_the_run(tmp_path):
    with RunOutput(tmp_path / "run", command="x") as run:
        for bad in ("../escape", "/abs", "manifest.json"):
            with pytest.raises(ValueError):
                run.path(bad)
    assert not (tmp_path / "escape.json").exists()


def test_constructed_but_never_entered_run_gives_the_folder_back(tmp_path):
    out = tmp_path / "run"
    run = RunOutput(out, command="x")
    run.abandon()
    assert not out.exists() and leftovers(out) == []
    RunOutput(out, command="y").abandon()  # the lock was released


# ============================================================================ devices


@pytest.mark.parametrize("spec, needle", [
    ("meta", "not supported"), ("mps", "not supported"), ("tpu", "unknown --device"), ("cuda:x", "unknown"),
    ("garbage!!", "unknown --device"), ("", "unknown --device"),
])
def test_bad_devices_are_one_line(spec, needle):
    with pytest.raises(LLMProbeError, match=needle) as info:
        resolve_device(spec)
    assert "\n" not in str(info.value)


def test_device_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert DTYPES["bf16"] is torch.bfloat16
    if not torch.cuda.is_available():
        for spec in ("cuda", "cuda:0"):
            with pytest.raises(LLMProbeError, match="no CUDA device"):
                resolve_device(spec)
    else:
        with pytest.raises(LLMProbeError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_every_device_option_uses_the_one_resolver():
    from llmprobe.analyses import alpha_hill
    from llmprobe.core import loading, spectral

    assert loading.resolve_device is resolve_device
    for module in (alpha_hill.resolve_device, spectral._resolve_device):
        with pytest.raises(LLMProbeError, match="not supported"):
            module("meta")


# ============================================================================ loading failures


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model_dir("llama", tmp_path_factory.mktemp("safety") / "llama")


def _variant(model_dir: Path, tmp_path: Path, **config_changes) -> Path:
    copy = tmp_path / "variant"
    shutil.copytree(model_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config.update(config_changes)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize("change", [{"hidden_size": -8}, {"num_hidden_layers": -2}, {"vocab_size": 0},
                                    {"num_attention_heads": "4"}])
def test_impossible_config_sizes_are_one_line(model_dir, tmp_path, change):
    from llmprobe.core.loading import load_config, load_model
    from llmprobe.core.weightsource import WeightSource

    bad = _variant(model_dir, tmp_path, **change)
    name = next(iter(change))
    for attempt in (lambda: load_config(str(bad)), lambda: load_model(str(bad), device="cpu"),
                    lambda: WeightSource.open(str(bad)).config()):
        with pytest.raises(LLMProbeError, match=f"{name} = .*sizes must be positive"):
            attempt()


def test_unknown_model_type_is_one_line_of_ours(model_dir, tmp_path):
    from llmprobe.core.loading import load_model

    bad = _variant(model_dir, tmp_path, model_type="nosucharch")
    with pytest.raises(LLMProbeError) as info:
        load_model(str(bad), device="cpu")
    message = str(info.value)
    assert "model type 'nosucharch'" in message and "--trust-remote-code" in message
    assert "corrupt" not in message and "\n" not in message


def test_remote_code_config_keeps_the_hint_and_blames_nothing(model_dir, tmp_path):
    from llmprobe.core.loading import load_config

    bad = _variant(model_dir, tmp_path, model_type="custom_thing",
                   auto_map={"AutoConfig": "cfg.MyConfig", "AutoModelForCausalLM": "m.MyModel"})
    with pytest.raises(LLMProbeError) as info:
        load_config(str(bad))
    message = str(info.value)
    assert "--trust-remote-code" in message and "ships its own Python code" in message
    assert "corrupt" not in message and "\n" not in message


def test_remote_code_message_from_the_hub_path_is_translated():
    from llmprobe.core.loading import ModelSource, _translate_errors

    source = ModelSource("hub", "org/custom", "org/custom")
    with pytest.raises(LLMProbeError, match="--trust-remote-code"):
        with _translate_errors(source, "config"):
            raise ValueError("The repository org/custom contains custom code which must be executed ...")


def test_unknown_user_paths_are_one_line(tmp_path):
    from llmprobe.core.loading import resolve_source

    with pytest.raises(LLMProbeError, match="no user 'nosuchuser'"):
        resolve_source("~nosuchuser/model")
    with pytest.raises(LLMProbeError, match="--dataset .*no user 'nosuchuser'"):
        data_mod.load_corpus("~nosuchuser/data.txt")


class _Hostile:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickle_refusals_never_suggest_weights_only_false(model_dir, tmp_path, zip_format):
    from llmprobe.core.loading import load_model
    from llmprobe.core.weightsource import WeightSource

    bad = tmp_path / "hostile"
    shutil.copytree(model_dir, bad)
    (bad / "model.safetensors").unlink()
    torch.save({"x": _Hostile()}, bad / "pytorch_model.bin", _use_new_zipfile_serialization=zip_format)
    for attempt in (lambda: load_model(str(bad), device="cpu"), lambda: WeightSource.open(str(bad))):
        with pytest.raises(LLMProbeError) as info:
            attempt()
        message = str(info.value)
        assert "refusing to load" in message and "arbitrary code" in message
        assert "weights_only" not in message and "\n" not in message


def test_legacy_pytorch_bin_works_in_the_weight_source(model_dir, tmp_path):
    from safetensors.torch import load_file

    from llmprobe.core.weightsource import WeightSource

    legacy = tmp_path / "legacy"
    shutil.copytree(model_dir, legacy)
    state = load_file(str(legacy / "model.safetensors"))
    (legacy / "model.safetensors").unlink()
    torch.save(state, legacy / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    with open(legacy / "pytorch_model.bin", "rb") as fh:
        assert fh.read(2) != b"PK"  # really the legacy (non-zip) format
    ws = WeightSource.open(str(legacy))
    assert ws.kind == "bin" and sorted(ws.names()) == sorted(state)
    for name, tensor in state.items():
        assert torch.equal(ws.get(name), tensor)


def test_warnings_from_a_failed_load_are_not_shown(model_dir, monkeypatch):
    import transformers

    from llmprobe.core.loading import load_model

    def warn_then_fail(*args, **kwargs):
        warnings.warn("library chatter that would print before the error", UserWarning, stacklevel=1)
        raise RuntimeError("the real failure")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", warn_then_fail)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with pytest.raises(LLMProbeError, match="the real failure"):
            load_model(str(model_dir), device="cpu")
    assert not [w for w in shown if "chatter" in str(w.message)]


def test_warnings_from_a_successful_load_are_kept(model_dir, monkeypatch):
    from llmprobe.core import loading

    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with loading._translate_errors(loading.resolve_source(str(model_dir)), "config"):
            warnings.warn("worth seeing", UserWarning, stacklevel=1)
    assert [w for w in shown if "worth seeing" in str(w.message)]


# ============================================================================ data


def test_fifo_dataset_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "data.txt"
    os.mkfifo(fifo)
    started = time.perf_counter()
    with pytest.raises(LLMProbeError, match="named pipe"):
        data_mod.load_corpus(str(fifo))
    assert time.perf_counter() - started < 5


def test_character_device_dataset_is_refused():
    with pytest.raises(LLMProbeError, match="character device"):
        data_mod.load_corpus("/dev/zero")


def test_corpus_manifest_hashes_file_and_text(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "first"}\r\n{"text": "second"}\r\n')
    corpus = data_mod.load_corpus(str(path))
    info = data_mod.corpus_manifest(corpus)
    assert info["file_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info["text_sha256"] == hashlib.sha256(b"first\n\nsecond").hexdigest()
    assert info["file_sha256"] != info["text_sha256"]
    assert (info["rows"], info["split"], info["source"]) == (2, "file", None)


def test_windows_manifest_rebuilds_the_windows():
    ids = torch.arange(100, 160, dtype=torch.long)
    windows = data_mod.calibration_windows(ids, nsamples=4, seqlen=8, seed=3)
    offsets = data_mod.calibration_offsets(len(ids), 4, 8, 3)
    info = data_mod.windows_manifest(ids, offsets, 8, windows)
    rebuilt = torch.stack([ids[s:s + info["window_length"]] for s in info["window_starts"]])
    assert torch.equal(rebuilt, windows)
    # Independent reference for the id hash: struct-packed little-endian int64.
    packed = struct.pack(f"<{len(ids)}q", *ids.tolist())
    assert info["token_ids_sha256"] == hashlib.sha256(packed).hexdigest()
    flat = windows.reshape(-1).tolist()
    assert info["window_ids_sha256"] == hashlib.sha256(struct.pack(f"<{len(flat)}q", *flat)).hexdigest()
    evals = data_mod.eval_windows(ids, seqlen=16, stride=8)
    einfo = data_mod.eval_windows_manifest(ids, evals, 16)
    assert einfo["window_starts"] == [w.start for w in evals] and einfo["window_scored"] == [w.n_scored for w in evals]


def test_calibration_manifest_records_dataset_and_windows(model_dir, tmp_path, wikitext_path):
    from llmprobe.core.calibration import prepare
    from llmprobe.core.loading import load_model

    small = tmp_path / "small.txt"
    small.write_text("".join(wikitext_path.read_text(encoding="utf-8").splitlines(keepends=True)[:40]))
    lm = load_model(str(model_dir), dtype="fp32", device="cpu")
    calib = prepare(lm, dataset=str(small), nsamples=3, seqlen=16, seed=1)
    manifest = calib.manifest()
    assert manifest["dataset"]["file_sha256"] == hashlib.sha256(small.read_bytes()).hexdigest()
    windows = manifest["windows"]
    ids = data_mod.tokenize_corpus(data_mod.load_corpus(str(small), "calibration"), lm.tokenizer)
    rebuilt = torch.stack([ids[s:s + 16] for s in windows["window_starts"]])
    assert torch.equal(rebuilt, calib.windows) and windows["seed"] == 1


def test_out_of_vocabulary_exclude_token_ids_are_refused(model_dir):
    from llmprobe.core.collect import resolve_exclude_tokens
    from llmprobe.core.loading import load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))
    size = len(tokenizer)
    assert resolve_exclude_tokens(tokenizer, [str(size - 1)]) == frozenset({size - 1})
    for bad in (str(size), "999999", "-1"):
        with pytest.raises(LLMProbeError, match="not in the vocabulary"):
            resolve_exclude_tokens(tokenizer, [bad])
    # The model's embedding may be padded past the tokenizer: those ids exist.
    assert resolve_exclude_tokens(tokenizer, [str(size + 3)], vocab_size=size + 8) == frozenset({size + 3})


# ============================================================================ through the CLI


def _small_text(tmp_path: Path, wikitext_path: Path) -> Path:
    small = tmp_path / "small.txt"
    small.write_text("".join(wikitext_path.read_text(encoding="utf-8").splitlines(keepends=True)[:60]))
    return small


def _commands(model: Path, text: Path) -> dict[str, list[str]]:
    """Every command that writes a run today, with small options."""
    calib = ["--model", str(model), "--dataset", str(text), "--nsamples", "2", "--seqlen", "16", "--quiet"]
    return {
        "model info": ["model", "info", "--model", str(model)],
        "model layers": ["model", "layers", "--model", str(model)],
        "weights stats": ["weights", "stats", "--model", str(model), "--quiet"],
        "weights spectrum": ["weights", "spectrum", "--model", str(model), "--quiet"],
        "weights bops": ["weights", "bops", "--model", str(model)],
        "weights alpha-hill": ["weights", "alpha-hill", "--model", str(model), "--quiet"],
        "weights embeddings": ["weights", "embeddings", "--model", str(model), "--quiet"],
        "eval perplexity": ["eval", "perplexity", "--model", str(model), "--dataset", str(text), "--seqlen", "16",
                            "--max-windows", "2", "--quiet"],
        **{f"activations {c}": ["activations", c, *calib]
           for c in ("magnitude", "kurtosis", "token-kurtosis", "max-median", "norms", "quant-error",
                     "top-token-error", "fisher", "fgmp")},
        "activations prompt": ["activations", "prompt", "--model", str(model), "--text", "the cat sat", "--quiet"],
    }


COMMANDS = list(_commands(Path("m"), Path("t")))


@pytest.mark.parametrize("command", COMMANDS)
def test_cli_overwrite_refuses_a_folder_with_a_foreign_file(cli, model_dir, tmp_path, wikitext_path, command):
    args = _commands(model_dir, _small_text(tmp_path, wikitext_path))[command]
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    result = cli(*args, "--out", out, "--overwrite")
    assert_one_line_error(result, "thesis.tex", "did not write")
    assert snapshot(out) == {"thesis.tex": b"years of work"} and leftovers(out) == []


def test_cli_dot_and_model_folder_are_refused(cli, model_dir, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("keep")
    monkeypatch.chdir(work)
    assert_one_line_error(cli("weights", "bops", "--model", model_dir, "--out", ".", "--overwrite"), "current folder")
    assert_one_line_error(cli("weights", "bops", "--model", model_dir, "--out", "", "--overwrite"))
    before = snapshot(model_dir)
    assert_one_line_error(cli("weights", "stats", "--model", model_dir, "--out", model_dir, "--overwrite", "--quiet"),
                          "model's folder")
    assert snapshot(model_dir) == before and (work / "keep.txt").read_text() == "keep"


def test_cli_earlier_run_survives_a_failing_overwrite(cli, model_dir, tmp_path, wikitext_path):
    text = _small_text(tmp_path, wikitext_path)
    out = tmp_path / "ppl"
    args = ["eval", "perplexity", "--model", model_dir, "--dataset", text, "--seqlen", "16", "--quiet"]
    assert cli(*args, "--max-windows", "2", "--out", out).code == 0
    before = snapshot(out)
    assert_one_line_error(cli(*args, "--max-windows", "0", "--out", out, "--overwrite"), "--max-windows")
    assert snapshot(out) == before and leftovers(out) == []


def test_cli_bops_overwrite_replaces_a_complete_run(cli, model_dir, tmp_path):
    out = tmp_path / "bops"
    assert cli("weights", "bops", "--model", model_dir, "--out", out).code == 0
    assert_one_line_error(cli("weights", "bops", "--model", model_dir, "--out", out), "--overwrite")
    assert cli("weights", "bops", "--model", model_dir, "--out", out, "--overwrite").code == 0
    assert manifest_of(out)["status"] == "complete" and leftovers(out) == []


def test_cli_second_run_into_a_locked_folder_is_refused(cli, model_dir, tmp_path):
    out = tmp_path / "bops"
    with RunOutput(out, command="weights alpha-hill", argv=["weights", "alpha-hill"]):
        result = cli("weights", "bops", "--model", model_dir, "--out", out, "--overwrite")
        assert_one_line_error(result, "in use by another llmprobe run", f"pid {os.getpid()}", "alpha-hill")
    assert manifest_of(out)["command"] == "weights alpha-hill"


def test_cli_out_tilde_and_system_paths(cli, model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert cli("weights", "bops", "--model", model_dir, "--out", "~/x").code == 0
    assert (tmp_path / "x" / "manifest.json").is_file() and not (tmp_path / "~").exists()
    afile = tmp_path / "f.txt"
    afile.write_text("x")
    for target, needle in [("/proc/x", "/proc"), ("/sys/x", "/sys"), ("/dev/null", "/dev"),
                           (str(afile / "sub"), "regular file")]:
        assert_one_line_error(cli("weights", "bops", "--model", model_dir, "--out", target), needle)


def test_cli_model_failures_are_one_line(cli, model_dir, tmp_path):
    unknown = _variant(model_dir, tmp_path, model_type="nosucharch")
    assert_one_line_error(cli("weights", "bops", "--model", unknown, "--out", tmp_path / "o"), "nosucharch")
    assert_one_line_error(cli("weights", "bops", "--model", "~nosuchuser/m", "--out", tmp_path / "o"),
                          "nosuchuser")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("device", ["meta", "mps", "garbage"])
def test_cli_bad_device_is_one_line(cli, model_dir, tmp_path, device):
    result = cli("weights", "spectrum", "--model", model_dir, "--device", device, "--out", tmp_path / "o", "--quiet")
    assert_one_line_error(result, device)
    assert not (tmp_path / "o").exists()


def test_cli_fifo_dataset_is_one_line(cli, model_dir, tmp_path):
    fifo = tmp_path / "data.txt"
    os.mkfifo(fifo)
    result = cli("eval", "perplexity", "--model", model_dir, "--dataset", fifo, "--seqlen", "16",
                 "--out", tmp_path / "o", "--quiet")
    assert_one_line_error(result, "named pipe")


def test_cli_out_of_vocabulary_exclude_token(cli, model_dir, tmp_path, wikitext_path):
    text = _small_text(tmp_path, wikitext_path)
    result = cli("activations", "magnitude", "--model", model_dir, "--dataset", text, "--nsamples", "2",
                 "--seqlen", "16", "--exclude-tokens", "999999", "--out", tmp_path / "o", "--quiet")
    assert_one_line_error(result, "999999", "not in the vocabulary")


def test_cli_layers_filter_matching_nothing_is_exit_2(cli, model_dir, tmp_path):
    result = cli("model", "layers", "--model", model_dir, "--filter", "no_such_module", "--out", tmp_path / "o")
    assert_one_line_error(result, "no linear module matches")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("signum", "code", "line", "error"), [
    (signal.SIGTERM, 143, "llmprobe: terminated", "terminated (SIGTERM)"),
    (signal.SIGINT, 130, "llmprobe: interrupted", "interrupted (KeyboardInterrupt)"),
])
@pytest.mark.parametrize("earlier_run", [False, True])
def test_sigterm_cleans_up_like_an_interrupt(tmp_path, earlier_run, signum, code, line, error):
    """SIGTERM (kill, a scheduler's limit) unwinds like Ctrl-C: exit 143 (130 for Ctrl-C) with one
    line, the run marked incomplete, no staging folder or lock left, an earlier complete run kept
    as it was."""
    model = save_tiny_model_dir("llama", tmp_path / "model")
    out = tmp_path / "run"
    before = complete_run(out) if earlier_run else None
    script = (f"import sys, time; sys.path.insert(0, {str(ROOT / 'src')!r})\n"
              "from llmprobe.core import output\n"
              "write = output.RunOutput.write_table\n"
              "def slow(self, *args, **kwargs):\n"
              "    write(self, *args, **kwargs)\n"
              "    print('ready', flush=True)\n"
              "    time.sleep(60)\n"
              "output.RunOutput.write_table = slow\n"
              "from llmprobe.cli.app import main\n"
              f"main(['weights', 'stats', '--model', {str(model)!r}, '--out', {str(out)!r}, '--quiet'"
              f"{', ' + repr('--overwrite') if earlier_run else ''}])\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code
    assert stderr.strip().splitlines()[-1] == line
    assert leftovers(out) == []
    if earlier_run:
        assert snapshot(out) == before  # a failed run never replaces a complete one
    else:
        manifest = manifest_of(out)
        assert manifest["status"] == "incomplete" and manifest["error"] == error


def test_the_cpu_is_known_without_torch_only_where_no_gpu_can_be(monkeypatch):
    from llmprobe.core import devices

    monkeypatch.setattr(devices, "gpu_driver_present", lambda: False)
    assert devices.on_cpu_without_torch("cpu") and devices.on_cpu_without_torch(" Auto ")
    assert devices.on_cpu_without_torch(None)
    assert not devices.on_cpu_without_torch("cuda") and not devices.on_cpu_without_torch("tpu")
    devices.check_device("auto")  # nothing to refuse
    with pytest.raises(LLMProbeError, match="tpu"):
        devices.check_device("tpu")  # anything else goes through resolve_device's checks
    monkeypatch.setattr(devices, "gpu_driver_present", lambda: True)
    assert devices.on_cpu_without_torch("cpu") and not devices.on_cpu_without_torch("auto")
    assert devices.gpu_driver_present()
    monkeypatch.undo()
    # no GPU driver here means torch sees no CUDA device (the converse need not hold)
    if not devices.gpu_driver_present():
        assert not torch.cuda.is_available()
