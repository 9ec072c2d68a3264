"""`llmprobe activations` commands.

The group's commands live in two modules that register onto :data:`app`:
``activations_stats`` (magnitude, kurtosis, token statistics, norms, prompt) and
``activations_quant`` (quantization error and gradient-weighted sensitivities).
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..core.calibration import Calibration, prepare
from ..core.loading import load_model
from .common import check_range, source_from

app = typer.Typer(no_args_is_help=True)

# Options every activation command shares (LMAnalyser spellings accepted as aliases).
RolesOpt = Annotated[Optional[list[str]], typer.Option(
    "--roles", "--role", help="Only these roles (attn.q, mlp.down, or families attn/mlp); repeatable.")]
LayersOpt = Annotated[Optional[str], typer.Option("--layers", help="Layer indices, e.g. '0,5,10' or '0-3'.")]
FilterOpt = Annotated[Optional[str], typer.Option("--filter", help="Regex on module names.")]
SiteOpt = Annotated[str, typer.Option("--site", help="input|output of each linear module.")]
ExcludeBosOpt = Annotated[bool, typer.Option("--exclude-bos", help="Drop each window's first token (and BOS ids).")]
ExcludeTokensOpt = Annotated[Optional[list[str]], typer.Option(
    "--exclude-tokens", help="Drop these tokens (text as the tokenizer writes it, or ids); repeatable.")]
RotateOpt = Annotated[str, typer.Option("--rotate", help="none|hadamard: rotate the feature dimension first.")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", help="Windows per forward pass.")]


def parse_layers(spec: str | None) -> list[int] | None:
    """'0,5,10' / '0-3' / '0-3,8' -> list of ints."""
    from ..core.errors import LLMProbeError

    if spec is None or spec.strip() == "":
        return None
    out: list[int] = []
    try:
        for part in spec.split(","):
            part = part.strip()
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                out.extend(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise LLMProbeError(f"--layers '{spec}' is not a list of layer indices like '0,5,10' or '0-3'") from None
    return out


def setup_calibration(*, model, revision, trust_remote_code, dtype, device, dataset, nsamples, seqlen, seed,
                      roles, layers, regex, exclude_bos, exclude_tokens, rotate, include_lm_head=False,
                      windows=None) -> Calibration:
    """Load the model and prepare windows + module selection for an activation command."""
    check_range("--nsamples", nsamples, low=1)
    check_range("--seqlen", seqlen, low=2)
    source = source_from(model, revision, trust_remote_code)
    lm = load_model(source, dtype=dtype, device=device)
    return prepare(lm, dataset=dataset, nsamples=nsamples, seqlen=seqlen, seed=seed, windows=windows,
                   roles=roles, layers=parse_layers(layers), regex=regex, include_lm_head=include_lm_head,
                   exclude_bos=exclude_bos, exclude_tokens=exclude_tokens or (), rotate=rotate)


# Register the commands (imported for their side effect on `app`).
from . import activations_quant, activations_stats  # noqa: E402,F401
