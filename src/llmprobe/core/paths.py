"""Paths typed by the user: ``~`` expansion that fails clearly, and plain-file checks."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import LLMProbeError


def expand_user(raw: str | os.PathLike, flag: str) -> Path:
    """``raw`` with ``~`` / ``~user`` expanded. ``pathlib.Path.expanduser`` raises a bare
    RuntimeError for an unknown user; this says which option and which user instead."""
    text = os.fspath(raw)
    expanded = os.path.expanduser(text)
    if expanded.startswith("~"):
        user = text[1:].split("/", 1)[0]
        if user:
            raise LLMProbeError(f"{flag} {text}: there is no user '{user}', so '~{user}' names no home folder")
        raise LLMProbeError(f"{flag} {text}: the home folder is unknown (HOME is not set)")
    return Path(expanded)


def describe_kind(mode: int) -> str:
    """What a file system entry is, in words ("a named pipe", "a character device", ...)."""
    for test, word in ((stat.S_ISDIR, "a folder"), (stat.S_ISREG, "a regular file"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return word
    return "not a regular file"
