"""A second interpreter for CPU work one process cannot spread over cores.

scipy's LAPACK calls hold the GIL and small eigenvalue problems run best on one BLAS thread
(see :mod:`llmprobe.core.spectral`), so threads of one process do not use a second core for
them; a second process does. The helper is a fresh ``python -c`` (like the figure workers): not
``multiprocessing``, whose spawn re-imports the caller's ``__main__`` (a user's unguarded script
would run again) and whose fork copies a process that may run threads. It imports only what the
function it runs imports (no torch for the spectra), runs one call at a time on one thread, and
answers in the order asked.

    with Helper("package.module:function", shared_argument) as helper:
        ticket = helper.submit(more, arguments)   # function(shared_argument, more, arguments)
        ...
        value = helper.result(ticket)             # its return value, or its exception raised here
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from typing import Any

# The helper: read the parent's import path, the function and its shared arguments, then
# answer each call until stdin closes.
_BOOT = "from llmprobe.core.helper import _serve; _serve()"


class Helper:
    """One helper process running ``function`` ("module:name") with ``shared`` first arguments."""

    def __init__(self, function: str, *shared: Any):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._proc = subprocess.Popen([sys.executable, "-c", _BOOT], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, env=env)
        self._submitted = 0
        self._answered: dict[int, tuple] = {}
        self._send((function, shared))

    def __enter__(self) -> Helper:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _send(self, message) -> None:
        try:
            pickle.dump(message, self._proc.stdin)
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise RuntimeError(f"the helper process exited (code {self._proc.poll()})") from None

    def submit(self, *args: Any) -> int:
        """Queue one call; returns its ticket for :meth:`result`."""
        self._send(args)
        self._submitted += 1
        return self._submitted - 1

    def result(self, ticket: int) -> Any:
        """The return value of call ``ticket`` (answers are read in order), or its exception."""
        while ticket not in self._answered:
            try:
                answer = pickle.load(self._proc.stdout)
            except (EOFError, OSError):
                raise RuntimeError(f"the helper process exited (code {self._proc.wait()}) before answering") from None
            self._answered[len(self._answered)] = answer
        status, value = self._answered[ticket]
        if status == "error":
            raise value
        return value

    def close(self) -> None:
        """Stop the helper: at once if calls are still running (a failed or interrupted run)."""
        if self._proc.poll() is None:
            for pipe in (self._proc.stdin, self._proc.stdout):
                try:
                    pipe.close()
                except OSError:
                    pass
            if len(self._answered) < self._submitted:
                self._proc.kill()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - a helper stuck in a library
                self._proc.kill()
                self._proc.wait()


def _serve() -> None:
    import importlib
    import traceback

    calls, answers = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # anything a library prints must not corrupt the answers
    try:
        target, shared = pickle.load(calls)
    except EOFError:
        return
    module, _, name = target.partition(":")
    function = getattr(importlib.import_module(module), name)
    while True:
        try:
            args = pickle.load(calls)
        except EOFError:
            return
        try:
            answer = ("ok", function(*shared, *args))
        except Exception as exc:  # the caller raises it (or, if it cannot be pickled, its text)
            try:
                pickle.dumps(exc)
                answer = ("error", exc)
            except Exception:
                answer = ("error", RuntimeError(f"in the helper process:\n{traceback.format_exc()}"))
        try:
            pickle.dump(answer, answers)
            answers.flush()
        except BrokenPipeError:  # the caller stopped listening
            return
