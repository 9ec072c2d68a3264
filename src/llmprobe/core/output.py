"""Run output: the one writer of tables, figures and the run manifest, and the one place that
decides what an ``--out`` folder may be and when it may be replaced.

Rules (docs/outputs.md explains them for users):

* ``--out`` is validated before any work (:func:`check_out_target`): not ``.``/empty, not the
  current or home folder (or one of their ancestors), not the model's folder, not under
  ``/proc``, ``/sys`` or ``/dev``, not below a regular file, not an existing file or device.
* An existing folder is only ever replaced when it holds an llmprobe run: a ``manifest.json``
  written by llmprobe and nothing but the files that manifest lists. A complete run needs
  ``--overwrite``; an incomplete (failed or interrupted) run is replaced without it, so a
  corrected rerun is never blocked. Anything else is refused, ``--overwrite`` or not.
* One run per folder at a time: a lock file beside the folder (``.NAME.llmprobe.lock``) is held
  with ``flock`` for the whole run and names its holder (pid, host, command). The kernel drops
  the lock when the process dies, so a stale lock file never blocks a later run.
* When an earlier run exists, the new one is written into a staging folder beside it
  (``.NAME.llmprobe-staging``) and swapped in by two renames only when it completes; a run that
  fails, is interrupted or killed leaves an earlier complete run byte for byte as it was. With
  nothing to protect (no folder, or an empty one) the run is written in place, so a crashed,
  interrupted or killed first run stays visible with ``"status": "incomplete"`` in its manifest.
* Bad input (an :class:`LLMProbeError` raised inside the run) changes nothing on disk: the
  staging folder, or the folder the run created, is removed again.
* Every file is written atomically (temporary file in the same folder, then rename) with the
  permissions the umask gives, and registered in the manifest before it is renamed into place,
  so the manifest of a killed run still lists every file of that run.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import math
import os
import platform
import re
import shutil
import socket
import stat
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from .errors import LLMProbeError, Terminated

# The atomic writers live in core/files.py (importable without pandas/pydantic: figure workers).
from .files import atomic_write_bytes, atomic_write_text, current_umask  # noqa: F401  (re-exported)
from .paths import describe_kind, expand_user
from .records import Record

_LIBRARIES = ("torch", "transformers", "accelerate", "safetensors", "gguf", "numpy", "scipy", "pandas",
              "pydantic", "typer", "rich", "matplotlib", "scikit-learn", "datasets")

MANIFEST = "manifest.json"
# Names beside the target folder (same parent, so every rename stays on one file system).
LOCK_SUFFIX = ".llmprobe.lock"
STAGING_SUFFIX = ".llmprobe-staging"
PREVIOUS_SUFFIX = ".llmprobe-previous"
# System trees that are never a place for results (writes there fail late or do odd things).
SYSTEM_TREES = ("/proc", "/sys", "/dev")
# Leftover of an atomic write cut short: ".rows.csv.k2j4h1x8.tmp".
_TEMP_LEFTOVER = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def slugify(text: str) -> str:
    """A file-system-safe name for a model id or path."""
    base = text.rstrip("/").split("/")[-2:] if "/" in text else [text]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "--".join(base)).strip("-") or "model"


def _json_safe(value: Any) -> Any:
    # JSON has no NaN/Infinity; write null so every consumer can parse the file.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def dumps_json(obj: Any) -> str:
    return json.dumps(_json_safe(obj), indent=2, allow_nan=False, default=str) + "\n"


def records_csv(records: Sequence[Record]) -> str:
    """The CSV text of ``records``: the union of their columns in first-seen order (declared
    fields come first), ``None`` and NaN as empty fields, every other value as ``str()`` gives
    it (optional int columns such as a layer index stay ints, not floats), quoted only where
    needed. It is byte for byte what ``pandas.DataFrame(rows, dtype=object).to_csv(index=False)``
    writes (tests/test_speed.py compares them), without importing pandas (~0.7 s of a command)."""
    import csv
    import io

    rows = [r.row() for r in records]
    columns: list[str] = []
    for row in rows:  # union of columns, first-seen order
        columns.extend(c for c in row if c not in columns)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")  # pandas' dialect: minimal quoting, '"' doubled
    if rows:
        writer.writerow(columns)
    else:
        buffer.write("\n")
    for row in rows:
        writer.writerow([_csv_field(row.get(column)) for column in columns])
    return buffer.getvalue()


def _csv_field(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in _LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    found["python"] = platform.python_version()
    return found


# --------------------------------------------------------------------------------------------
# what an --out folder holds, and whether it may be used


@dataclass(frozen=True)
class FolderState:
    """What an output folder holds: ``absent``, ``empty``, ``run`` (an llmprobe run and nothing
    else) or ``foreign`` (anything else: ``foreign_files`` names a few of the intruders)."""

    kind: str
    status: str | None = None
    command: str | None = None
    foreign_files: tuple[str, ...] = ()


def read_run_manifest(folder: str | Path) -> dict | None:
    """The manifest of the llmprobe run in ``folder``, or None when there is none (missing,
    unreadable, not JSON, or not written by llmprobe)."""
    path = Path(folder) / MANIFEST
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or not {"llmprobe_version", "command", "status", "files"} <= doc.keys():
        return None
    if not isinstance(doc["files"], list):
        return None
    return doc


def inspect_folder(folder: str | Path, *, max_foreign: int = 3) -> FolderState:
    """Classify ``folder`` (see :class:`FolderState`). Never modifies anything."""
    folder = Path(folder)
    if not os.path.lexists(folder):
        return FolderState("absent")
    try:
        entries = sorted(os.listdir(folder))
    except OSError as exc:
        raise LLMProbeError(f"cannot read folder {folder}: {exc.strerror or exc}") from None
    if not entries:
        return FolderState("empty")
    manifest = read_run_manifest(folder)
    if manifest is None:
        return FolderState("foreign", foreign_files=tuple(entries[:max_foreign]))
    listed = {MANIFEST, *(f for f in manifest["files"] if isinstance(f, str))}
    foreign: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = Path(os.path.relpath(full, folder)).as_posix()
            if os.path.islink(full):  # llmprobe never writes links
                foreign.append(rel)
            elif name in filenames and rel not in listed and not _TEMP_LEFTOVER.match(name):
                foreign.append(rel)
        if len(foreign) >= max_foreign:
            break
    if foreign:
        return FolderState("foreign", manifest.get("status"), manifest.get("command"), tuple(foreign[:max_foreign]))
    return FolderState("run", manifest.get("status"), manifest.get("command"))


def expand_out_path(path: str | os.PathLike | None, flag: str = "--out") -> Path:
    """``path`` with ``~`` expanded, refusing an empty value, ``.`` and unknown ``~user``."""
    raw = "" if path is None else os.fspath(path)
    if not raw.strip():
        raise LLMProbeError(f"{flag} is empty: name a folder for the results, e.g. {flag} results/run1")
    if raw.strip() in (".", "./"):
        raise LLMProbeError(f"{flag} {raw} is the current folder: results go into a folder of their own, "
                            f"e.g. {flag} results/run1")
    return expand_user(raw, flag)


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_out_target(path: str | os.PathLike | None, overwrite: bool = False,
                     model_path: str | os.PathLike | None = None, *, flag: str = "--out") -> Path:
    """Validate an output folder before any work starts; return it with ``~`` expanded.

    Raises :class:`LLMProbeError` (one line) when the folder may not be used: see the module
    docstring for the rules. Touches nothing on disk. ``model_path`` is the ``--model`` value
    when it names a local file or folder (hub ids are ignored), so its folder is never a target.
    """
    shown = os.fspath(path) if path is not None else ""
    target = expand_out_path(path, flag)
    absolute = Path(os.path.abspath(target))
    real = Path(os.path.realpath(absolute))
    for tree in SYSTEM_TREES:
        inside = [p for p in (real, absolute) if _is_within(p, Path(tree))]
        # /dev/shm is an ordinary (memory-backed) folder, a fair place for scratch results.
        if inside and not all(_is_within(p, Path("/dev/shm")) and p != Path("/dev/shm") for p in inside):
            raise LLMProbeError(f"{flag} {shown} is under {tree}, a system folder: choose a folder for results")
    if real == Path(real.anchor):
        raise LLMProbeError(f"{flag} {shown} is the root folder: choose a folder of its own for the results")
    places = []
    with contextlib.suppress(OSError):  # the working folder may have been deleted under us
        places.append(("the current folder", Path(os.path.realpath(os.getcwd()))))
    home = os.path.expanduser("~")
    if home != "~":
        places.append(("your home folder", Path(os.path.realpath(home))))
    for label, place in places:
        if real == place:
            raise LLMProbeError(f"{flag} {shown} is {label}: results go into a folder of their own, "
                                f"e.g. {flag} {os.path.join(shown, 'run1')}")
    for label, place in places:
        if real in place.parents:
            raise LLMProbeError(f"{flag} {shown} contains {label}: choose a folder of its own for the results")
    if model_path is not None and str(model_path).strip():
        model = Path(os.path.realpath(os.path.expanduser(os.fspath(model_path))))
        if model.exists():
            model_dir = model if model.is_dir() else model.parent
            if real in (model, model_dir):
                raise LLMProbeError(f"{flag} {shown} is the model's folder ({model_path}); "
                                    f"choose another folder for the results")
            if real in model_dir.parents:
                raise LLMProbeError(f"{flag} {shown} contains the model ({model_path}); "
                                    f"choose another folder for the results")
    if os.path.islink(absolute) and not absolute.exists():
        raise LLMProbeError(f"{flag} {shown} is a broken symbolic link")
    # The nearest existing ancestor decides whether the folder can be created at all.
    base = real
    while not os.path.lexists(base) and base != base.parent:
        base = base.parent
    if base != real:
        if not base.is_dir():
            raise LLMProbeError(f"{flag} {shown} is below {base}, which is {describe_kind(os.stat(base).st_mode)}, "
                                f"not a folder")
        if not os.access(base, os.W_OK | os.X_OK):
            raise LLMProbeError(f"cannot create {flag} {shown}: {base} is not writable")
        return target
    mode = os.stat(real).st_mode
    if not stat.S_ISDIR(mode):
        raise LLMProbeError(f"{flag} {shown} exists and is {describe_kind(mode)}, not a folder")
    if not os.access(real.parent, os.W_OK | os.X_OK):
        raise LLMProbeError(f"cannot use {flag} {shown}: its parent folder {real.parent} is not writable "
                            f"(the lock and the new run are written beside it)")
    state = inspect_folder(real)
    if state.kind == "foreign":
        names = ", ".join(state.foreign_files)
        if state.status is not None:
            what = f"holds an llmprobe run plus files llmprobe did not write ({names})"
        else:
            what = f"holds files llmprobe did not write ({names})"
        if overwrite:
            raise LLMProbeError(f"{flag} {shown} {what}; --overwrite only replaces an earlier llmprobe run, "
                                f"so nothing was touched: choose another {flag}")
        raise LLMProbeError(f"{flag} {shown} {what}: choose a new or empty folder")
    if state.kind == "run" and state.status == "complete" and not overwrite:
        raise LLMProbeError(f"{flag} {shown} already holds a complete run (llmprobe {state.command}); "
                            f"pass --overwrite to replace it, or choose another {flag}")
    return target


# --------------------------------------------------------------------------------------------
# one run per folder


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """An exclusive lock on one output folder: ``.NAME.llmprobe.lock`` beside it, held with
    ``flock`` (released by the kernel when the process ends, so a lock file left by a killed
    run never blocks) and holding a JSON line about its holder for the refusal message."""

    def __init__(self, folder: Path, command_line: str, *, flag: str = "--out", shown: str | None = None):
        self.folder = Path(folder)
        self.path = self.folder.parent / f".{self.folder.name}{LOCK_SUFFIX}"
        self.command_line = command_line
        self.flag = flag
        self.shown = shown or str(folder)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _holder_text(self, raw: bytes) -> str:
        try:
            info = json.loads(raw.decode("utf-8"))
            return (f"pid {info['pid']} on {info['host']}, `{info['command']}`, "
                    f"started {info['started_at']}")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return f"see {self.path}"

    def _refuse(self, holder: str) -> LLMProbeError:
        return LLMProbeError(f"{self.flag} {self.shown} is in use by another llmprobe run ({holder}); "
                             f"wait for it to finish or choose another {self.flag}")

    def acquire(self) -> RunLock:
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": self.command_line,
                           "started_at": _now()}).encode("utf-8")
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
            except OSError as exc:
                raise LLMProbeError(f"cannot create the lock file {self.path}: {exc.strerror or exc}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder_text(os.pread(fd, 4096, 0))
                os.close(fd)
                raise self._refuse(holder) from None
            except OSError as exc:
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    os.close(fd)
                    raise
                self._check_pid_holder(fd)  # file systems without flock: trust a live pid only
            # The last holder unlinks the file when it releases it; when that happened between
            # our open and our flock, we hold a lock nobody else can see: start again.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, info, 0)
            self._fd = fd
            return self
        raise LLMProbeError(f"cannot take the lock {self.path}: it keeps changing; is another run starting?")

    def _check_pid_holder(self, fd: int) -> None:
        try:
            info = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
            pid, host = int(info["pid"]), info["host"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return
        if host == socket.gethostname() and pid != os.getpid() and _pid_alive(pid):
            os.close(fd)
            raise self._refuse(self._holder_text(json.dumps(info).encode()))

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            # Unlink while still holding the lock, so nobody locks a file that is going away
            # without noticing (acquire() checks the inode after locking).
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        finally:
            os.close(self._fd)
            self._fd = None


# --------------------------------------------------------------------------------------------
# the run


def _rmtree_if_ours(path: Path) -> bool:
    """Remove ``path`` when it is an llmprobe run folder or empty (leftovers beside a target)."""
    if os.path.islink(path) or not path.is_dir():
        return False
    if read_run_manifest(path) is None and any(path.iterdir()):
        return False
    shutil.rmtree(path)
    return True


class RunOutput:
    """One run's output folder, used as a context manager.

    >>> with RunOutput(out_dir, command="weights stats") as run:   # doctest: +SKIP
    ...     run.manifest.update(model=...)
    ...     run.write_table("weight_stats", records)

    ``dir`` is where files are being written: the target itself when there was nothing to
    protect, else a staging folder beside it; after the ``with`` block it is the target.
    ``target`` is always the final folder. The constructor validates (see
    :func:`check_out_target`) and takes the folder's lock; ``__exit__`` swaps a staged run in
    (on success, or on failure when the earlier run was itself incomplete) and releases it.
    """

    def __init__(self, out_dir: str | Path, *, command: str, overwrite: bool = False,
                 argv: Sequence[str] | None = None, model_path: str | os.PathLike | None = None):
        self.command_line = " ".join(["llmprobe", *(argv if argv is not None else sys.argv[1:])])
        self.target = check_out_target(out_dir, overwrite, model_path)
        shown = os.fspath(out_dir)
        self._real = Path(os.path.realpath(os.path.abspath(self.target)))
        try:
            self._real.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LLMProbeError(f"cannot create --out {shown}: {exc.strerror or exc}") from None
        self._staging: Path | None = None
        self._previous_complete = False
        self._created = False
        self._finished = False
        self._lock = RunLock(self._real, self.command_line, shown=shown).acquire()
        try:
            self._recover_leftovers()
            # Again under the lock: another run may have changed the folder since the first check.
            check_out_target(out_dir, overwrite, model_path)
            state = inspect_folder(self._real)
            if state.kind in ("absent", "empty"):
                self._created = state.kind == "absent"
                self._real.mkdir(exist_ok=True)
                # Absolute while the run writes, so a change of working folder cannot scatter it.
                self.dir = Path(os.path.abspath(self.target))
            else:
                self._previous_complete = state.status == "complete"
                self._staging = self._beside(STAGING_SUFFIX)
                os.mkdir(self._staging)  # mode from the umask, unlike mkdtemp's 0700
                self.dir = self._staging
        except OSError as exc:
            self._lock.release()
            raise LLMProbeError(f"cannot prepare --out {shown}: {exc.strerror or exc}") from None
        except BaseException:
            self._lock.release()
            raise
        self.files: list[str] = []
        self.manifest: dict[str, Any] = {
            "llmprobe_version": __version__,
            "command": command,
            "command_line": self.command_line,
            "status": "incomplete",
            "started_at": _now(),
            "finished_at": None,
            "libraries": library_versions(),
            "files": self.files,
        }

    def _beside(self, suffix: str) -> Path:
        return self._real.parent / f".{self._real.name}{suffix}"

    def _recover_leftovers(self) -> None:
        """Clean up after a run that was killed (we hold the lock, so no one else is running)."""
        previous, staging = self._beside(PREVIOUS_SUFFIX), self._beside(STAGING_SUFFIX)
        if os.path.lexists(previous):
            if not os.path.lexists(self._real):
                # Killed between the two renames of a swap: put the earlier run back.
                os.rename(previous, self._real)
            else:
                _rmtree_if_ours(previous)
        if os.path.lexists(staging) and not _rmtree_if_ours(staging):
            raise LLMProbeError(f"cannot stage the run: {staging} exists and was not written by llmprobe; "
                                f"move it away")

    # -- context management -------------------------------------------------------------
    def __enter__(self) -> RunOutput:
        self._write_manifest()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.manifest["finished_at"] = _now()
        if exc_type is None:
            self.manifest["status"] = "complete"
        else:
            self.manifest["status"] = "incomplete"
            if issubclass(exc_type, Terminated):
                self.manifest["error"] = "terminated (SIGTERM)"
            elif issubclass(exc_type, KeyboardInterrupt):
                self.manifest["error"] = "interrupted (KeyboardInterrupt)"
            else:
                self.manifest["error"] = f"{exc_type.__name__}: {exc}" if exc is not None else exc_type.__name__
        try:
            if exc_type is not None and issubclass(exc_type, LLMProbeError):
                # Bad input changes nothing on disk: the message says what to fix, and a
                # half-written folder would only be in the way of the corrected rerun.
                self._discard()
                return
            self._write_manifest()
            if self._staging is not None:
                if exc_type is None or not self._previous_complete:
                    self._swap_in()
                else:  # a failed run never replaces a complete one
                    shutil.rmtree(self._staging, ignore_errors=True)
        finally:
            self._finished = True
            self.dir = self.target
            self._lock.release()

    def _swap_in(self) -> None:
        staging, previous = self._staging, self._beside(PREVIOUS_SUFFIX)
        try:
            if not os.path.lexists(self._real):
                os.rename(staging, self._real)
                return
            os.rename(self._real, previous)
            try:
                os.rename(staging, self._real)
            except BaseException:
                os.rename(previous, self._real)
                raise
        except OSError as exc:
            raise LLMProbeError(f"the run finished but could not replace {self.target}: {exc.strerror or exc}; "
                                f"its files are in {staging}") from None
        shutil.rmtree(previous, ignore_errors=True)

    def _discard(self) -> None:
        """Leave the disk as this run found it: drop the staging folder, or the folder this
        run created (an existing empty folder is emptied again)."""
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
        elif self._created:
            shutil.rmtree(self._real, ignore_errors=True)
        elif self._real.is_dir():
            for entry in list(self._real.iterdir()):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)

    def abandon(self) -> None:
        """Give the folder up without finishing (a run that never entered its ``with`` block):
        leave the disk as it was and release the lock."""
        if self._finished:
            return
        self._finished = True
        self._discard()
        self.dir = self.target
        self._lock.release()

    def __del__(self):
        with contextlib.suppress(Exception):
            if getattr(self, "_lock", None) is not None and self._lock.held and not self._finished:
                self.abandon()

    def _write_manifest(self) -> None:
        atomic_write_text(self.dir / MANIFEST, dumps_json(self.manifest))

    def update(self, **fields: Any) -> None:
        """Add facts to the manifest (model source, dtype, dataset hash, ...)."""
        self.manifest.update(fields)
        self._write_manifest()

    # -- writers ------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        if Path(name).is_absolute() or ".." in Path(name).parts or name in ("", MANIFEST):
            raise ValueError(f"output file name {name!r} must be a relative path inside the run folder")
        p = self.dir / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def _register(self, path: Path) -> None:
        # Listed in the manifest before the file is renamed into place: a killed run's manifest
        # then names every file it left, so the folder is still recognised as llmprobe's.
        rel = path.relative_to(self.dir).as_posix()
        if rel not in self.files:
            self.files.append(rel)
            self._write_manifest()

    def adopt(self, relative: str | Path) -> None:
        """List files written into this run's folder by someone else on the run's behalf (the
        result folders a report run nests, the pages a report build writes), so the folder is
        still recognised as wholly llmprobe's and ``--overwrite`` may replace it later."""
        root = self.dir / relative
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
        for path in paths:
            self._register(path)

    def write_table(self, name: str, records: Sequence[Record], *, json_too: bool = True) -> Path:
        """Write ``name.csv`` (and ``name.json``) from records, atomically."""
        csv_path = self.path(f"{name}.csv")
        self._register(csv_path)
        atomic_write_text(csv_path, records_csv(records))
        if json_too:
            json_path = self.path(f"{name}.json")
            self._register(json_path)
            atomic_write_text(json_path, dumps_json([r.row() for r in records]))
        return csv_path

    def write_json(self, name: str, obj: Any) -> Path:
        path = self.path(name if name.endswith(".json") else f"{name}.json")
        self._register(path)
        atomic_write_text(path, dumps_json(obj))
        return path

    def save_figure(self, fig, name: str, fmt: str = "png", dpi: int = 120, *, tight: bool | None = None,
                    close: bool = True) -> Path:
        """Save a matplotlib figure atomically as ``name.<fmt>``.

        ``tight=None`` crops to the tight bounding box only for figures without a layout engine
        (constrained layout already fits; the crop is a second full draw); ``close=False``
        keeps the figure open for reuse.
        """
        from .figures import render_figure

        path = self.path(f"{name}.{fmt}")
        data = render_figure(fig, fmt, dpi=dpi, tight=tight, close=close)
        self._register(path)
        atomic_write_bytes(path, data)
        return path

    def publish(self, relative: str, staged: str | Path) -> None:
        """Rename a file staged in the run folder (by a figure worker) into place as ``relative``,
        listed in the manifest first like every file of the run."""
        path = self.path(relative)
        self._register(path)
        os.replace(staged, path)


def default_out_dir(model_slug: str, group: str, command: str) -> Path:
    return Path("results") / model_slug / f"{group}-{command}"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def tables_from(records: Iterable[Record]) -> list[dict]:
    return [r.row() for r in records]
