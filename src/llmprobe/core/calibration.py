"""What every activation analysis starts from: a loaded model, its module map, the selected
modules, seeded calibration windows and the token filter / rotation to apply."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .collect import TokenFilter, resolve_exclude_tokens
from .data import (
    Corpus,
    calibration_offsets,
    calibration_windows,
    corpus_manifest,
    ids_sha256,
    load_corpus,
    tokenize_corpus,
    windows_manifest,
)
from .errors import LLMProbeError
from .loading import LoadedModel
from .modulemap import LinearSite, ModuleMap
from .specs import check_range

ROTATIONS = ("none", "hadamard")


@dataclass
class Calibration:
    lm: LoadedModel
    mmap: ModuleMap
    sites: list[LinearSite]
    windows: torch.Tensor                 # [nsamples, seqlen] token ids
    corpus: Corpus | None
    token_filter: TokenFilter
    rotate: Callable[[torch.Tensor], torch.Tensor] | None
    rotation: str = "none"
    # Offsets / hashes of the windows (data.windows_manifest), so a run can be reproduced.
    window_info: dict | None = None

    def manifest(self) -> dict:
        info = {"nsamples": int(self.windows.shape[0]), "seqlen": int(self.windows.shape[1]),
                "rotation": self.rotation, "exclude_bos": self.token_filter.exclude_bos,
                "exclude_token_ids": sorted(self.token_filter.exclude_ids), "modules": len(self.sites)}
        if self.corpus is not None:
            info["dataset"] = corpus_manifest(self.corpus)
        if self.window_info is not None:
            info["windows"] = self.window_info
        return info

    def decode(self, token_id: int) -> str:
        return self.lm.tokenizer.decode([int(token_id)])


def rotation_fn(rotate: str | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    if rotate in (None, "none"):
        return None
    if rotate == "hadamard":
        from .hadamard import hadamard_transform

        return hadamard_transform
    raise LLMProbeError(f"unknown --rotate '{rotate}'; use one of {', '.join(ROTATIONS)}")


def prepare(lm: LoadedModel, *, dataset: str | None = "wikitext2", nsamples: int = 128, seqlen: int = 512,
            seed: int = 0, windows: torch.Tensor | None = None, roles: Sequence[str] | None = None,
            layers: Sequence[int] | None = None, regex: str | None = None, include_lm_head: bool = False,
            exclude_bos: bool = False, exclude_tokens: Sequence[str] = (), rotate: str | None = None
            ) -> Calibration:
    """Select modules and draw calibration windows (or take ``windows`` as given: [N, L] ids)."""
    if windows is not None:  # explicit windows define their own count and length
        nsamples, seqlen = int(windows.shape[0]), int(windows.shape[1])
    check_range("--nsamples", nsamples, low=1)
    check_range("--seqlen", seqlen, low=2)
    if lm.max_length is not None and seqlen > lm.max_length:
        raise LLMProbeError(f"--seqlen {seqlen} is above this model's maximum of {lm.max_length} tokens")
    mmap = ModuleMap(lm.model)
    sites = mmap.select(roles=roles or None, layers=layers or None, regex=regex, include_lm_head=include_lm_head)
    if not sites:
        raise LLMProbeError("no linear module matches the given --roles/--layers/--filter")
    # Cheap checks first: a typo in --exclude-tokens must not wait for the data to load.
    token_filter = TokenFilter(exclude_bos=exclude_bos,
                               exclude_ids=resolve_exclude_tokens(lm.tokenizer, exclude_tokens,
                                                                  getattr(lm.model.config, "vocab_size", None)),
                               bos_id=getattr(lm.tokenizer, "bos_token_id", None))
    corpus = None
    if windows is not None:
        window_info = {"window_length": seqlen, "window_count": nsamples, "window_ids_sha256": ids_sha256(windows)}
    else:
        if dataset is None:
            raise LLMProbeError("give a --dataset or explicit windows")
        corpus = load_corpus(dataset, purpose="calibration")
        ids = tokenize_corpus(corpus, lm.tokenizer)
        # Random windows may overlap, but asking for more windows than the data holds side by
        # side would mostly re-measure the same tokens: refuse it.
        available = len(ids) // seqlen
        if nsamples > available:
            raise LLMProbeError(f"--nsamples {nsamples} x --seqlen {seqlen} needs more text than {corpus.name} "
                                f"holds ({len(ids)} tokens: at most {available} windows of {seqlen})")
        windows = calibration_windows(ids, nsamples, seqlen, seed)
        window_info = {"seed": seed, **windows_manifest(ids, calibration_offsets(len(ids), nsamples, seqlen, seed),
                                                        seqlen, windows)}
    return Calibration(lm, mmap, sites, windows, corpus, token_filter, rotation_fn(rotate), rotate or "none",
                       window_info)
