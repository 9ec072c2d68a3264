"""Shared fixtures: the CLI run in-process, the shared WikiText file, the embedded model."""

import contextlib
import io
import os
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))

ROOT = pathlib.Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"

# Tests never reach the hub; a test that tries gets the offline error at once, not a timeout.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("LLMPROBE_PROGRESS", "0")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per core: more than one intra-op thread per worker only
    # oversubscribes the cores (tiny models run many times slower that way).
    import torch

    torch.set_num_threads(1)


class CliResult:
    def __init__(self, code: int, stdout: str, stderr: str):
        self.code, self.stdout, self.stderr = code, stdout, stderr

    def __repr__(self) -> str:
        return f"CliResult(code={self.code}, stderr={self.stderr[-2000:]!r}, stdout={self.stdout[-2000:]!r})"


def run_cli(*args: str) -> CliResult:
    """Run ``llmprobe ARGS`` in-process (same entry point as the console script)."""
    from llmprobe.cli.app import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return CliResult(code, out.getvalue(), err.getvalue())


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session")
def wikitext_path() -> pathlib.Path:
    if not WIKITEXT.is_file():
        pytest.fail(f"shared WikiText file missing at {WIKITEXT} (../shared must sit beside the checkout)")
    return WIKITEXT


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M loaded once per test session (fp32, CPU)."""
    from llmprobe.core.loading import load_model

    return load_model(None, dtype="fp32", device="cpu")


def assert_one_line_error(result: CliResult, *needles: str) -> None:
    """Bad input: exit 2, exactly one line on stderr, no traceback."""
    assert result.code == 2, result
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle.lower() in lines[0].lower(), lines[0]
