"""Commands registered on `llmprobe weights` (see cli/weights.py)."""

from .weights import app  # noqa: F401
