"""`llmprobe weights` commands (no forward pass; tensors are streamed one at a time).

Commands live in modules that register onto :data:`app`: ``weights_tables`` (stats, spectrum,
bops), ``weights_alpha`` (alpha-hill) and ``weights_embeddings`` (embeddings).
"""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True)

from . import weights_alpha, weights_embeddings, weights_tables  # noqa: E402,F401
