"""The one device resolver and the one dtype table of the package.

Every ``--device`` (model loading, spectra, alpha-hill, ...) goes through :func:`resolve_device`,
so every command accepts and refuses the same values with the same one-line message. llmprobe
computes on CPU or CUDA only: ``meta`` tensors hold no values and ``mps`` lacks the float64
kernels the statistics rely on, so both are refused up front instead of failing mid-run.

torch is imported only where a torch object is asked for: checking ``--device cpu``, or ``auto``
on a machine without a GPU driver, needs none (:func:`check_device`, :func:`on_cpu_without_torch`),
so weight commands that read plain arrays on the CPU never pay its ~2-3 s import.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from .errors import LLMProbeError

if TYPE_CHECKING:
    import torch

# Load / compute dtypes by their command-line names (torch dtypes: torch_dtype / DTYPES).
DTYPE_NAMES = ("fp32", "fp16", "bf16")
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
# What a GPU that torch could use leaves on a machine: the NVIDIA driver's files, ROCm's kernel
# driver, WSL's GPU bridge. Without any of them torch.cuda.is_available() is False.
_GPU_DRIVER_FILES = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")


def __getattr__(name: str):
    if name == "DTYPES":  # the name -> torch dtype table, built (and torch imported) on first use
        return {dtype: torch_dtype(dtype) for dtype in DTYPE_NAMES}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def gpu_driver_present() -> bool:
    """False only where no GPU can be used (Linux without a GPU driver, macOS); True elsewhere,
    where torch has to answer."""
    if sys.platform == "darwin":
        return False  # no CUDA on macOS; MPS is refused anyway
    if not sys.platform.startswith("linux"):
        return True
    return any(os.path.exists(path) for path in _GPU_DRIVER_FILES)


def on_cpu_without_torch(spec: object = "auto") -> bool:
    """True when ``spec`` certainly resolves to the CPU, decided without importing torch:
    ``cpu``, or ``auto`` where :func:`gpu_driver_present` is False."""
    text = "auto" if spec is None else str(spec).strip().lower()
    return text == "cpu" or (text == "auto" and not gpu_driver_present())


def check_device(spec: object, *, flag: str = "--device") -> None:
    """Refuse a bad ``--device`` as :func:`resolve_device` does; torch is imported only when the
    value is not certainly the CPU."""
    if not on_cpu_without_torch(spec):
        resolve_device(spec, flag=flag)


def resolve_device(spec: str | torch.device | None = "auto", *, flag: str = "--device") -> torch.device:
    """``auto`` (CUDA when torch sees one, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    Raises :class:`LLMProbeError` for anything else, for CUDA when torch sees none, and for a
    CUDA index past the last device.
    """
    import torch

    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = str(spec).strip()
    try:
        device = spec if isinstance(spec, torch.device) else torch.device(text.lower())
    except (RuntimeError, TypeError, ValueError):
        raise LLMProbeError(f"unknown {flag} '{text}'; use {DEVICE_CHOICES}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise LLMProbeError(f"{flag} {text} asked for CUDA, but torch sees no CUDA device; use {flag} cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise LLMProbeError(f"{flag} {text}: torch sees {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        return device
    raise LLMProbeError(f"{flag} {text} is not supported: llmprobe computes on cpu or cuda "
                        f"(use {DEVICE_CHOICES})")


def resolve_dtype_name(name: str, *, flag: str = "--dtype", allow_auto: bool = False) -> torch.dtype | None:
    """The torch dtype of a command-line dtype name (None for ``auto`` when allowed)."""
    if allow_auto and name == "auto":
        return None
    if name in DTYPE_NAMES:
        return torch_dtype(name)
    choices = ", ".join((["auto"] if allow_auto else []) + list(DTYPE_NAMES))
    raise LLMProbeError(f"unknown {flag} '{name}'; use {choices}")
