"""The one device resolver and the one dtype table of the package.

Every ``--device`` (model loading, spectra, alpha-hill, ...) goes through :func:`resolve_device`,
so every command accepts and refuses the same values with the same one-line message. llmprobe
computes on CPU or CUDA only: ``meta`` tensors hold no values and ``mps`` lacks the float64
kernels the statistics rely on, so both are refused up front instead of failing mid-run.
"""

from __future__ import annotations

import torch

from .errors import LLMProbeError

# Load / compute dtypes by their command-line names.
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(spec: str | torch.device | None = "auto", *, flag: str = "--device") -> torch.device:
    """``auto`` (CUDA when torch sees one, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    Raises :class:`LLMProbeError` for anything else, for CUDA when torch sees none, and for a
    CUDA index past the last device.
    """
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
    if name in DTYPES:
        return DTYPES[name]
    choices = ", ".join((["auto"] if allow_auto else []) + list(DTYPES))
    raise LLMProbeError(f"unknown {flag} '{name}'; use {choices}")
