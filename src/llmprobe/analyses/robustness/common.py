"""Pieces the robustness analyses share: choosing target matrices and the unmodified reference."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...core.errors import LLMProbeError
from ...core.loading import LoadedModel
from ...core.modulemap import LinearSite, ModuleMap
from ...core.records import Record
from ...core.reference import Reference

Tables = dict[str, list[Record]]


def select_sites(mmap: ModuleMap, roles: Sequence[str] | None, layers: Sequence[int] | None,
                 regex: str | None, *, default_roles: Sequence[str] | None = None) -> list[LinearSite]:
    """Linear matrices chosen by --roles/--layers/--filter (inside the decoder blocks unless the
    roles name lm_head); an empty choice is an error here, since there is nothing to measure."""
    sites = mmap.select(roles=list(roles) if roles else (list(default_roles) if default_roles else None),
                        layers=list(layers) if layers else None, regex=regex)
    sites = [s for s in sites if s.layer is not None or s.role == "lm_head"]
    if not sites:
        raise LLMProbeError("no linear matrix matches the given --roles/--layers/--filter")
    return sites


def make_reference(lm: LoadedModel | torch.nn.Module, windows: Sequence[torch.Tensor], *, prefix_cache: bool = True,
                   cache_budget_mb: float = 4096.0) -> Reference:
    model = lm.model if isinstance(lm, LoadedModel) else lm
    if not windows:
        raise LLMProbeError("no evaluation windows: the text is shorter than --seqlen")
    return Reference(model, windows, prefix_cache=prefix_cache, cache_budget_mb=cache_budget_mb)


def model_name(lm) -> str:
    source = getattr(lm, "source", None)
    return getattr(source, "display", None) or type(getattr(lm, "model", lm)).__name__


def check_positive(value: int, flag: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise LLMProbeError(f"{flag} must be an integer >= {minimum}; got {value!r}")
    return value
