"""The helper process (core/helper.py): answers in order, raises the call's own exception in the
caller, reports a dead helper, stops on close; and alpha-hill's spectra shared with it give the
same rows as one process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tiny import save_tiny_model_dir

from llmprobe.core.errors import LLMProbeError
from llmprobe.core.helper import Helper

SRC = str(Path(__file__).resolve().parents[1] / "src")


def test_calls_are_answered_in_order_with_the_shared_arguments_first():
    with Helper("operator:add", 10) as helper:
        tickets = [helper.submit(value) for value in range(5)]
        assert [helper.result(t) for t in reversed(tickets)] == [14, 13, 12, 11, 10]
    with Helper("builtins:divmod") as helper:
        assert helper.result(helper.submit(17, 5)) == (3, 2)


def test_the_calls_exception_is_raised_in_the_caller():
    with Helper("llmprobe.core.quant:parse_format") as helper:
        good, bad = helper.submit("INT8"), helper.submit("fp12")
        assert helper.result(good) == "int8"
        with pytest.raises(LLMProbeError, match="unknown format 'fp12'"):
            helper.result(bad)


def test_a_helper_that_dies_is_an_error_not_a_hang():
    with Helper("os:_exit") as helper:
        ticket = helper.submit(3)
        with pytest.raises(RuntimeError, match="helper process exited"):
            helper.result(ticket)


def test_close_stops_a_helper_still_computing():
    helper = Helper("time:sleep")
    helper.submit(60)
    helper.close()
    assert helper._proc.poll() is not None


def test_a_script_without_a_main_guard_is_not_run_again(tmp_path):
    """multiprocessing's spawn would import the caller's __main__ in the child; the helper does not."""
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent("""
        from llmprobe.core.helper import Helper
        print("script body ran")
        with Helper("operator:mul", 6) as helper:
            print(helper.result(helper.submit(7)))
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["script", "body", "ran", "42"]


def test_alpha_hill_spectra_shared_with_the_helper_give_the_same_rows(tmp_path, monkeypatch):
    from llmprobe.analyses import alpha_hill
    from llmprobe.core.weightsource import WeightSource

    ws = WeightSource.open(str(save_tiny_model_dir("llama", tmp_path / "model", num_hidden_layers=3)))
    monkeypatch.setattr(alpha_hill, "CPU_CHUNK_MATRICES", 4)  # several chunks for two processes
    monkeypatch.setattr(alpha_hill, "HELPER_MIN_MATRICES", 1)
    started = []
    real = Helper.__init__
    monkeypatch.setattr(Helper, "__init__", lambda self, *a: (started.append(a[0]), real(self, *a))[1])
    shared, _ = alpha_hill.alpha_hill_analysis(ws, ["fp32", "fp16"], device="cpu", regex="weight")
    assert started == ["llmprobe.analyses.alpha_hill:_process_chunk"]
    monkeypatch.setenv("LLMPROBE_SPECTRA_HELPER", "0")
    alone, _ = alpha_hill.alpha_hill_analysis(ws, ["fp32", "fp16"], device="cpu", regex="weight")
    assert len(started) == 1 and len(shared) == 23
    assert [row.model_dump() for row in shared] == [row.model_dump() for row in alone]


def test_answers_can_be_polled_without_waiting():
    import time

    with Helper("time:sleep") as helper:
        slow, fast = helper.submit(0.5), helper.submit(0.0)
        assert helper.answered() == [] and helper.pending() == 2  # the first still sleeps
        time.sleep(1.0)
        assert helper.answered() == [slow, fast]
        assert helper.result(fast) is None and helper.pending() == 1


def test_shared_chunks_come_back_all_once_with_or_without_a_helper():
    from llmprobe.analyses.alpha_hill import _share_chunks

    chunks = [[n, n + 1] for n in range(0, 20, 2)]
    alone = list(_share_chunks(chunks, None, sum, lambda chunk: (chunk,)))
    assert alone == [sum(chunk) for chunk in chunks]
    with Helper("builtins:sum") as helper:
        shared = list(_share_chunks(chunks, helper, sum, lambda chunk: (chunk,)))
    assert sorted(shared) == sorted(alone)


def test_no_helper_where_blas_threads_already_share_the_cores(monkeypatch):
    import contextlib

    from llmprobe.analyses import alpha_hill

    def plans(side: int) -> list:
        return [alpha_hill.MatrixPlan(f"w{i}", (side, side), 0, "attn.q", "attn_q", side, side, -1) for i in range(50)]

    monkeypatch.setattr(alpha_hill, "usable_cores", lambda: 4)
    big = alpha_hill._spectra_helper(True, plans(2048), ws=None)  # above SINGLE_THREAD_MAX_SIDE
    assert isinstance(big, contextlib.nullcontext)
    assert isinstance(alpha_hill._spectra_helper(False, plans(64), ws=None), contextlib.nullcontext)
    assert isinstance(alpha_hill._spectra_helper(True, plans(64)[:5], ws=None), contextlib.nullcontext)
    monkeypatch.setattr(alpha_hill, "usable_cores", lambda: 1)
    assert isinstance(alpha_hill._spectra_helper(True, plans(64), ws=None), contextlib.nullcontext)


def test_chunks_of_a_helper_that_dies_are_computed_here(caplog):
    from llmprobe.analyses.alpha_hill import _share_chunks
    from llmprobe.core.helper import HelperGone

    chunks = [[n, n + 1] for n in range(0, 20, 2)]
    with Helper("builtins:exit") as helper:  # exits the helper at its first call
        with caplog.at_level("WARNING"):
            shared = list(_share_chunks(chunks, helper, sum, lambda chunk: (3,)))
    assert sorted(shared) == sorted(sum(chunk) for chunk in chunks)
    assert "computed in this process" in caplog.text
    with Helper("builtins:exit") as helper:
        ticket = helper.submit(3)
        with pytest.raises(HelperGone):
            helper.result(ticket)


def test_an_error_of_the_computation_in_the_helper_is_raised_not_recomputed():
    from llmprobe.analyses.alpha_hill import _share_chunks

    with Helper("llmprobe.core.quant:parse_format") as helper:
        with pytest.raises(LLMProbeError, match="unknown format"):
            list(_share_chunks([["fp12"], ["fp13"], ["fp14"]], helper, lambda chunk: "local",
                               lambda chunk: (chunk[0],)))
