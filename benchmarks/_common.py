"""Shared benchmark helpers: a wall-clock timer and a child process's peak RSS."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from contextlib import contextmanager


@contextmanager
def timer(results: dict, key: str):
    """Store the block's wall-clock seconds in ``results[key]``."""
    started = time.perf_counter()
    yield
    results[key] = time.perf_counter() - started


def best_of(fn, repeats: int = 3) -> float:
    """Fastest of ``repeats`` runs of ``fn()`` in seconds (the least disturbed by other load)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def child_peak_rss(code: str, env: dict | None = None) -> tuple[int, str]:
    """Run ``code`` in a fresh Python process; return (peak RSS bytes, stdout)."""
    # VmHWM, not ru_maxrss: on Linux a child's ru_maxrss starts from the parent's peak.
    wrapper = (code + "\nimport json, sys\n"
               "_hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
               "sys.stdout.write('\\n__PEAK__' + _hwm)\n")
    out = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    body, _, peak = out.stdout.rpartition("\n__PEAK__")
    return int(json.loads(peak)) * 1024, body  # VmHWM is in KiB


def self_peak_rss() -> int:
    """This process's peak RSS in bytes (VmHWM)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row[c]) for c in cols) + " |")
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)
