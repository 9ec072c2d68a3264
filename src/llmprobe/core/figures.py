"""Figures written fast: drawn from a description, in worker processes when there are many.

A figure set (``plots/<...>_figures``) yields ``(stem, figure[, save options])``. ``figure`` is a
matplotlib Figure (drawn and saved here, in this process, as before) or a :class:`Deferred`: the
name of a figure function and its arguments (plain data: rows as dicts, labels). Deferred figures
are drawn by a small pool of worker processes, so the main process pays neither for drawing them
nor, when a set yields only deferred figures, for importing matplotlib; each worker draws and
saves whole figures, so nothing but file names travels back. A :class:`DeferredSet` is one call
that yields several ``(stem, figure[, save options])`` pairs — for sets that reuse one Figure and
update its artists (hundreds of per-matrix bar charts): each worker reuses its own.

The same description drawn serially (one worker or ``LLMPROBE_FIGURE_WORKERS=0``) writes the same
files with the same bytes; ``tests/test_speed.py`` checks it. Workers write each figure to a
temporary file in the run folder; the run lists it in its manifest and then renames it into
place, like every file it writes (core/output.py).

Why processes: a figure costs tens to hundreds of milliseconds of pure-Python text layout and
Agg rendering under the GIL, so threads do not help; figures are independent, so processes do.
Workers are fresh interpreters (``python -c``) fed pickled tasks on stdin, not
``multiprocessing`` children: forking a parent that holds torch's thread pools can deadlock, and
``spawn``/``forkserver`` re-import the caller's ``__main__`` (a user script without a
``if __name__ == "__main__"`` guard would run again in every worker).
"""

from __future__ import annotations

import importlib
import io
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .devices import usable_cores

# Fewer deferred figures than this are drawn in-process: starting workers costs ~1 s of imports.
MIN_PARALLEL = 6
MAX_WORKERS = 4


@dataclass(frozen=True)
class Deferred:
    """One figure described as data: ``target`` ('module:function') called with ``args`` and
    ``kwargs`` in whichever process draws it; it returns a Figure or a list of Figures (saved as
    ``stem_1``, ``stem_2``, ... like a list yielded directly)."""

    target: str
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self):
        return _resolve(self.target)(*self.args, **self.kwargs)


@dataclass(frozen=True)
class DeferredSet:
    """Several figures from one call: ``target(*args, **kwargs)`` yields ``(stem, Figure[, save
    options])``; each figure is saved before the iterator advances (it may reuse one Figure)."""

    target: str
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self) -> Iterator[tuple]:
        return _resolve(self.target)(*self.args, **self.kwargs)


def _resolve(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def render_figure(fig, fmt: str = "png", dpi: int = 120, *, tight: bool | None = None, close: bool = True) -> bytes:
    """The bytes of a saved figure.

    ``tight=None`` (the default) crops to the tight bounding box only when the figure has no
    layout engine: a constrained-layout figure already fits its labels and outside legends, and
    the tight box would cost a second full draw. ``close=False`` keeps a reused figure open.
    """
    if tight is None:
        tight = fig.get_layout_engine() is None
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format=fmt, dpi=dpi, bbox_inches="tight" if tight else None)
    finally:
        if close:
            _close(fig)
    return buffer.getvalue()


def _close(fig) -> None:
    # Figures made with matplotlib.figure.Figure are not registered with pyplot; only close
    # pyplot's own (importing pyplot just to close would cost its import).
    import sys

    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close(fig)


def stage_figure_file(fig, directory: Path, stem: str, fmt: str, **options: Any) -> tuple[str, str]:
    """Render ``fig`` into a temporary file in ``directory`` beside ``stem.fmt``; returns
    (``stem.fmt``, the temporary file). The run lists the file in its manifest and then renames
    it into place (:meth:`RunOutput.publish`), as it does for every file it writes."""
    from .files import stage_bytes

    relative = f"{stem}.{fmt}"
    return relative, str(stage_bytes(Path(directory) / relative, render_figure(fig, fmt, **options)))


def draw_task(task: tuple, directory: str, fmt: str) -> list[tuple[str, str]]:
    """Draw one task (in a worker, or in-process) into staged files; returns (file, staged temp
    file) pairs in order."""
    stem, described, options = task
    os.environ.setdefault("MPLBACKEND", "Agg")
    staged = []
    if isinstance(described, DeferredSet):
        for item in described.build():
            sub_stem, figure, *extra = item
            staged.extend(_stage(figure, Path(directory), sub_stem, fmt, {**options, **(extra[0] if extra else {})}))
        return staged
    return _stage(described.build(), Path(directory), stem, fmt, options)


def _stage(figure, directory: Path, stem: str, fmt: str, options: dict) -> list[tuple[str, str]]:
    if isinstance(figure, list):
        return [stage_figure_file(fig, directory, stem if len(figure) == 1 else f"{stem}_{i}", fmt, **options)
                for i, fig in enumerate(figure, start=1)]
    return [stage_figure_file(figure, directory, stem, fmt, **options)]


def figure_workers(tasks: int) -> int:
    """Worker processes for ``tasks`` deferred figures: ``LLMPROBE_FIGURE_WORKERS`` if set (0 or 1:
    in-process), else up to 4, one per core, none for a handful of figures."""
    forced = os.environ.get("LLMPROBE_FIGURE_WORKERS")
    if forced is not None:
        try:
            return max(0, int(forced))
        except ValueError:
            return 0
    if tasks < MIN_PARALLEL:
        return 0
    cores = usable_cores()
    return min(MAX_WORKERS, cores, tasks) if cores > 1 else 0


def write_figures(run, figures: Iterable[tuple], fmt: str) -> list[str]:
    """Save every ``(stem, figure[, options])`` of a figure set into ``run`` (a RunOutput).

    Figures already drawn are saved at once, in order; deferred ones afterwards, in parallel when
    there are enough of them, each registered in the order the set yielded it. Returns the files.
    """
    from . import progress

    written: list[str] = []
    tasks: list[tuple] = []
    for item in progress.track(figures, "figures"):
        stem, figure, *extra = item
        options = dict(extra[0]) if extra else {}
        if isinstance(figure, (Deferred, DeferredSet)):
            tasks.append((stem, figure, options))
            continue
        for relative, staged in _stage(figure, run.dir, stem, fmt, options):
            run.publish(relative, staged)
            written.append(relative)
    if tasks:
        drawn: dict[int, list[tuple[str, str]]] = {}
        try:
            for index, files in progress.track(_draw_all(tasks, run.dir, fmt), "figures", total=len(tasks)):
                drawn[index] = files
            for index in range(len(tasks)):  # listed and published in the order the set yielded them
                for relative, staged in drawn.pop(index):
                    run.publish(relative, staged)
                    written.append(relative)
        finally:  # a failed run leaves no staged figures behind
            for files in drawn.values():
                for _, staged in files:
                    Path(staged).unlink(missing_ok=True)
            discard_early()
    return written


def _draw_all(tasks: list[tuple], directory: Path, fmt: str) -> Iterator[tuple[int, list[tuple[str, str]]]]:
    """(task index, files) for every task, in completion order; drawn by the workers started
    with the command (:func:`start_workers`), else by new ones when that pays, else here."""
    stream = _STARTED.pop("stream", None)
    if stream is not None and (stream.directory != str(directory) or stream.fmt != fmt):
        stream.close()  # drawn early for another run: of no use here
        stream = None
    pool = None if stream is not None else _STARTED.pop("pool", None)
    if stream is None and pool is None:
        workers = figure_workers(len(tasks))
        if workers > 1:
            pool = _WorkerPool(workers)
    if stream is None and pool is None:
        for index, task in enumerate(tasks):
            yield index, draw_task(task, str(directory), fmt)
        return
    if stream is None:
        stream = _Stream(pool, str(directory), fmt)
    try:
        # A task already handed over while the analysis ran (draw_early) is not drawn again.
        tickets = [stream.ticket_of(task) for task in tasks]
        position = {ticket: index for index, ticket in enumerate(tickets)}
        for ticket, files in stream.results(tickets):
            yield position[ticket], files
    finally:
        stream.close()


def draw_early(directory: Path, fmt: str, figures: Iterable[tuple]) -> None:
    """Hand deferred figures whose data is final to the started workers now, while the analysis
    computes the rest (the workers would idle until its end otherwise). The figure set yields
    the same descriptions again at the end; :func:`write_figures` then takes these drawings
    instead of drawing them twice. A no-op without started workers (one core, or
    ``LLMPROBE_FIGURE_WORKERS`` 0/1): everything is drawn at the end as before."""
    stream = _STARTED.get("stream")
    if stream is None:
        pool = _STARTED.pop("pool", None)
        if pool is None:
            return
        stream = _STARTED["stream"] = _Stream(pool, str(directory), fmt)
    for item in figures:
        stem, figure, *extra = item
        if isinstance(figure, (Deferred, DeferredSet)):
            stream.submit((stem, figure, dict(extra[0]) if extra else {}))


def discard_early() -> None:
    """Drop figures drawn early that no :func:`write_figures` took (a run that failed, or a set
    that changed its mind): their staged files are removed and the workers stopped."""
    stream = _STARTED.pop("stream", None)
    if stream is not None:
        stream.close()


_STARTED: dict[str, object] = {}


def start_workers(warm: Iterable[str] = ()) -> None:
    """Start the figure workers now, for a command that will draw many deferred figures: they
    import matplotlib and the modules ``warm`` and draw one throw-away figure (fonts, caches)
    while this process imports torch and computes, mostly on a core it leaves idle. The next
    :func:`write_figures` uses them; unused ones exit with this process. No-op when workers are
    already started or would not be used (one core, ``LLMPROBE_FIGURE_WORKERS`` 0 or 1)."""
    if "pool" in _STARTED:
        return
    count = figure_workers(MIN_PARALLEL + MAX_WORKERS)  # as for a set of many figures
    if count > 1:
        _STARTED["pool"] = _WorkerPool(count, warm=tuple(warm))


# The first worker: put the parent's import path first, then warm up, fork the others and serve
# tasks (see _serve).
_BOOT = ("import pickle, sys; path, warm, channels = pickle.load(sys.stdin.buffer); sys.path[:0] = path; "
         "from llmprobe.core.figures import _serve; _serve(warm, channels)")


class _WorkerPool:
    """``count`` workers, started at once: one interpreter imports matplotlib and the modules
    ``warm`` and draws one throw-away figure, then forks the others (matplotlib is imported
    once, not once per worker; forking is safe there: the interpreter runs no threads, unlike
    this process with torch's). Each worker has its own pair of pipes (tasks in, results out),
    fed one task at a time by a :class:`_Stream`."""

    def __init__(self, count: int, warm: tuple[str, ...] = ()):
        import atexit
        import pickle
        import subprocess
        import sys

        worker_ends, self.channels = [], []
        for _ in range(count):
            task_read, task_write = os.pipe()
            result_read, result_write = os.pipe()
            worker_ends.append((task_read, result_write))
            self.channels.append((os.fdopen(task_write, "wb"), os.fdopen(result_read, "rb")))
        env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1"}
        passed = [fd for ends in worker_ends for fd in ends]
        self.proc = subprocess.Popen([sys.executable, "-c", _BOOT], stdin=subprocess.PIPE, env=env,
                                     pass_fds=passed)
        for fd in passed:  # the workers hold them now; a worker that dies closes its result pipe
            os.close(fd)
        try:  # a small write: the pipe buffer takes it while the interpreter starts
            pickle.dump(([p for p in sys.path if p], list(warm), worker_ends), self.proc.stdin)
            self.proc.stdin.close()
        except OSError:  # an interpreter that died at once is reported when it is fed
            pass
        self.used = False
        atexit.register(self.discard)

    def discard(self) -> None:
        """Workers never used (a run that failed or drew nothing) are stopped with this process;
        they hold no output. Forked workers exit when their task pipe closes."""
        if not self.used:
            self.proc.kill()
            self.close()

    def close(self) -> None:
        for tasks, results in self.channels:
            for pipe in (tasks, results):
                try:
                    pipe.close()
                except OSError:
                    pass
        try:  # the first worker waits for the ones it forked
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()


class _Stream:
    """Figures handed to a :class:`_WorkerPool` one by one, as they become known; one feeder
    thread per worker sends it the next task when it finishes one (dynamic balancing), and
    :meth:`results` hands back each drawing as it completes."""

    def __init__(self, pool: _WorkerPool, directory: str, fmt: str):
        import queue
        import threading

        self.pool, self.directory, self.fmt = pool, directory, fmt
        self.tasks: list[tuple] = []
        self._keys: list[bytes] = []  # pickled tasks: equal descriptions, NaN values included
        self._todo: queue.Queue = queue.Queue()
        self._done: queue.Queue = queue.Queue()
        self._drawn: dict[int, list[tuple[str, str]]] = {}
        self._taken: set[int] = set()
        self._finished = 0
        self._error: str | None = None
        self._closed = False
        pool.used = True
        self._threads = [threading.Thread(target=self._feed, args=(channel,), daemon=True)
                         for channel in pool.channels]
        for thread in self._threads:
            thread.start()

    def submit(self, task: tuple, key: bytes | None = None) -> int:
        import pickle

        self.tasks.append(task)
        self._keys.append(pickle.dumps(task) if key is None else key)
        self._todo.put(len(self.tasks) - 1)
        return len(self.tasks) - 1

    def ticket_of(self, task: tuple) -> int:
        """The ticket of an equal task handed over earlier and not yet taken, else a new one."""
        import pickle

        key = pickle.dumps(task)
        ticket = next((ticket for ticket, known in enumerate(self._keys)
                       if ticket not in self._taken and known == key), None)
        if ticket is None:
            ticket = self.submit(task, key)
        self._taken.add(ticket)
        return ticket

    def _feed(self, channel) -> None:
        import pickle

        to_worker, from_worker = channel
        try:
            while True:
                ticket = self._todo.get()
                if ticket is None:
                    self._todo.put(None)  # for the other feeders
                    break
                pickle.dump((self.tasks[ticket], self.directory, self.fmt), to_worker)
                to_worker.flush()
                status, payload = pickle.load(from_worker)
                self._done.put((ticket, status, payload))
                if status != "ok":
                    break
        except (EOFError, OSError, pickle.UnpicklingError) as exc:
            self._done.put((None, "error", f"figure worker exited unexpectedly ({type(exc).__name__})"))
        finally:
            self._done.put((None, "finished", None))

    def _receive(self) -> None:
        ticket, status, payload = self._done.get()
        if status == "finished":
            self._finished += 1
        elif status == "ok":
            self._drawn[ticket] = payload
        elif self._error is None:
            self._error = payload

    def results(self, tickets: list[int]) -> Iterator[tuple[int, list[tuple[str, str]]]]:
        """(ticket, files) for each of ``tickets``, as the drawings complete."""
        waiting = set(tickets)
        while waiting:
            ready = [ticket for ticket in waiting if ticket in self._drawn]
            for ticket in ready:
                waiting.discard(ticket)
                yield ticket, self._drawn.pop(ticket)
            if not waiting:
                break
            if self._error is not None:
                self._stop_feeding()
                raise RuntimeError(f"drawing a figure failed in a worker process:\n{self._error}")
            if self._finished == len(self._threads):
                raise RuntimeError("figure workers stopped before drawing every figure")
            self._receive()

    def _stop_feeding(self) -> None:
        import queue

        while True:  # drop what was not sent yet
            try:
                self._todo.get_nowait()
            except queue.Empty:
                break
        self._todo.put(None)

    def close(self) -> None:
        """Let the workers finish and exit; drawings nobody took are removed."""
        if self._closed:
            return
        self._closed = True
        self._stop_feeding()
        while self._finished < len(self._threads):
            self._receive()
        self.pool.close()
        for files in self._drawn.values():
            for _, staged in files:
                Path(staged).unlink(missing_ok=True)
        self._drawn.clear()


def _warm_up(modules: list[str]) -> None:
    """Imports and one small figure drawn to nothing: the first figure of a process pays for
    loading fonts and filling text caches, which changes no pixel of later ones."""
    from matplotlib.figure import Figure

    for module in modules:
        importlib.import_module(module)
    figure = Figure(figsize=(2.0, 1.5), layout="constrained")
    axes = figure.subplots()
    axes.bar([0, 1], [1.0, 2.0])
    axes.set_xticks([0, 1], ["warm", "up"], rotation=70, ha="right", fontsize=7)
    axes.set_title("warm-up", fontsize=10)
    figure.savefig(io.BytesIO(), format="png", dpi=40)


def _serve(warm: list[str], channels: list[tuple[int, int]]) -> None:
    """The workers: warm up once, fork one process per further channel, then each reads
    (task, directory, fmt) from its task pipe, draws it and answers ("ok", files) or ("error",
    traceback) on its result pipe, until the task pipe closes. Anything a library prints goes
    to stderr."""
    import pickle
    import traceback

    os.dup2(2, 1)
    try:
        _warm_up(warm)
    except Exception:  # a failed warm-up costs time, not figures: the tasks report real errors
        pass
    mine, forked = channels[0], []
    for channel in channels[1:]:
        pid = os.fork()
        if pid == 0:
            mine, forked = channel, []
            break
        forked.append(pid)
    for channel in channels:  # only its own pipes: a dead worker's result pipe must reach EOF
        if channel != mine:
            for fd in channel:
                os.close(fd)
    tasks, results = os.fdopen(mine[0], "rb"), os.fdopen(mine[1], "wb")
    while True:
        try:
            task, directory, fmt = pickle.load(tasks)
        except EOFError:
            break
        try:
            answer = ("ok", draw_task(task, directory, fmt))
        except BaseException:  # report any failure to the parent, which raises it
            answer = ("error", traceback.format_exc())
        pickle.dump(answer, results)
        results.flush()
    if mine != channels[0]:
        results.close()
        os._exit(0)  # a forked worker: none of the first one's exit handlers
    for pid in forked:
        os.waitpid(pid, 0)
