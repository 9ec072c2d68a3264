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
        helper.answered()                         # tickets whose answers are in (no waiting)
        value = helper.result(ticket)             # its return value, or its exception raised here
"""

from __future__ import annotations

import os
import pickle
import queue
import subprocess
import sys
import threading
from typing import Any

# The helper: read the parent's import path, the function and its shared arguments, then
# answer each call until stdin closes.
_BOOT = "from llmprobe.core.helper import _serve; _serve()"


class HelperGone(RuntimeError):
    """The helper process exited (killed, out of memory, a crash in a library) before answering."""


class Helper:
    """One helper process running ``function`` ("module:name") with ``shared`` first arguments."""

    def __init__(self, function: str, *shared: Any):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._proc = subprocess.Popen([sys.executable, "-c", _BOOT], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, env=env)
        self._submitted = self._taken = self._received = 0
        self._answered: dict[int, tuple] = {}
        self._arrived: queue.Queue = queue.Queue()  # answers read by the listener thread, in order
        self._listener = threading.Thread(target=self._listen, name="llmprobe-helper-listener", daemon=True)
        self._listener.start()
        self._send((function, shared))

    def _listen(self) -> None:
        # Reads every answer as it comes (so the helper never blocks on a full pipe, and
        # answered() needs no reading); None marks the end of the stream.
        try:
            while True:
                self._arrived.put(pickle.load(self._proc.stdout))
        except (EOFError, OSError, ValueError, pickle.UnpicklingError):
            self._arrived.put(None)

    def __enter__(self) -> Helper:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _send(self, message) -> None:
        try:
            pickle.dump(message, self._proc.stdin)
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise HelperGone(f"the helper process exited (code {self._proc.poll()})") from None

    def submit(self, *args: Any) -> int:
        """Queue one call; returns its ticket for :meth:`result`."""
        self._send(args)
        self._submitted += 1
        return self._submitted - 1

    def _take(self, block: bool) -> bool:
        """Move one arrived answer into place; False when none is there (``block``: wait)."""
        try:
            answer = self._arrived.get(block=block)
        except queue.Empty:
            return False
        if answer is None:
            self._arrived.put(None)  # keep the end marker for later calls
            raise HelperGone(f"the helper process exited (code {self._proc.wait()}) before answering")
        self._answered[self._received] = answer
        self._received += 1
        return True

    def answered(self) -> list[int]:
        """Tickets whose answers have arrived and not been taken by :meth:`result` (no waiting)."""
        while self._take(block=False):
            pass
        return sorted(self._answered)

    def pending(self) -> int:
        """Calls submitted and not yet taken by :meth:`result`."""
        return self._submitted - self._taken

    def result(self, ticket: int) -> Any:
        """The return value of call ``ticket`` (waiting for it), or its exception raised here."""
        while ticket not in self._answered:
            self._take(block=True)
        status, value = self._answered.pop(ticket)
        self._taken += 1
        if status == "error":
            raise value
        return value

    def close(self) -> None:
        """Stop the helper: at once if calls are still running (a failed or interrupted run),
        else by closing its input. Its output is closed only after it exited: the listener
        thread may be reading it, and closing a file another thread reads would wait on it."""
        if self._proc.poll() is None and self.pending():
            self._proc.kill()
        try:
            self._proc.stdin.close()
        except OSError:  # a helper already gone
            pass
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - a helper stuck in a library
            self._proc.kill()
            self._proc.wait()
        self._listener.join(timeout=5)
        self._proc.stdout.close()


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
