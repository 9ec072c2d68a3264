"""Streaming statistics that :func:`llmprobe.core.collect.collect` feeds with hooked activations.

Each collector folds every ``[T, F]`` batch into running state and drops the batch, so memory
depends on the number of hooked keys and features, never on the number of windows — except for
:class:`TokenCollector`, whose whole point is one small scalar per token (a few bytes per token
and key, kept as compact CPU tensors).

* :class:`MomentCollector` — per key: count, mean and central moment sums M2..M4 in fp64, abs-max;
  plus the per-window statistics LMAnalyser reports (excess kurtosis of all tokens×features of
  one window, averaged over windows; per-window max|x| averaged over windows).
* :class:`ChannelCollector` — per key and feature: Σx² (fp64) and max|x|: Wanda's input norms and
  SmoothQuant's activation scales.
* :class:`TokenCollector` — per key and token: max|x| over features (optionally its channel and
  the excess kurtosis of the token's feature vector), with the token's id, window and position.

Numerics. Raw power sums Σx⁴ − 4μΣx³ + ... cancel catastrophically when |mean| ≫ std (a model
with a large constant channel offset does exactly that). So every window of a batch is first
reduced to exact central moments — from power sums about a shift within fp32 rounding of its
mean (the compiled CPU pass, :meth:`Batch.stats`), or around each piece's own fp64 mean
(torch ops, on other devices) — and these are combined with the pairwise update of Chan et al.
/ Pébay (2008), which never subtracts large raw sums.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from .collect import Batch, Workspace

__all__ = [
    "ChannelCollector",
    "ChannelSummary",
    "MomentCollector",
    "MomentSummary",
    "Moments",
    "TokenCollector",
    "TokenTable",
    "excess_kurtosis",
    "tensor_nbytes",
]

# fp64 temporaries per chunk when centring a batch: bounds the extra memory of the exact
# moment pass to ~128 MB whatever the batch size or width.
_CHUNK_ELEMENTS = 1 << 24


def _row_chunks(rows: int, features: int) -> Iterable[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(1, features))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


# -- exact central moments -----------------------------------------------------------------


@dataclass(frozen=True)
class Moments:
    """Count, mean and central moment sums M_k = Σ(x − mean)^k of a set of numbers (fp64)."""

    n: float = 0.0
    mean: float = 0.0
    m2: float = 0.0
    m3: float = 0.0
    m4: float = 0.0

    def merge(self, other: Moments) -> Moments:
        """Moments of the union (Pébay 2008, eq. 3.1 and following; Chan et al. for M2)."""
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        na, nb = self.n, other.n
        n = na + nb
        delta = other.mean - self.mean
        delta_n = delta / n
        mean = self.mean + delta_n * nb
        m2 = self.m2 + other.m2 + delta * delta_n * na * nb
        m3 = (self.m3 + other.m3 + delta * delta_n * delta_n * na * nb * (na - nb)
              + 3.0 * delta_n * (na * other.m2 - nb * self.m2))
        m4 = (self.m4 + other.m4
              + delta * delta_n ** 3 * na * nb * (na * na - na * nb + nb * nb)
              + 6.0 * delta_n * delta_n * (na * na * other.m2 + nb * nb * self.m2)
              + 4.0 * delta_n * (na * other.m3 - nb * self.m3))
        return Moments(n, mean, m2, m3, m4)

    @property
    def variance(self) -> float:
        """Population variance (divide by n)."""
        return self.m2 / self.n if self.n else math.nan

    @property
    def excess_kurtosis(self) -> float:
        """Fisher excess kurtosis with scipy's ``bias=True`` estimator: n·M4/M2² − 3."""
        return excess_kurtosis(self.n, self.mean, self.m2, self.m4)

    @property
    def skewness(self) -> float:
        if not self.n or self.m2 <= 0:
            return math.nan
        return math.sqrt(self.n) * self.m3 / self.m2 ** 1.5


def excess_kurtosis(n: float, mean: float, m2: float, m4: float) -> float:
    """n·M4/M2² − 3, NaN where the data has no spread. Like scipy, "no spread" means the
    variance is below fp64 resolution relative to the mean (so rounding noise in a constant
    signal does not produce a huge kurtosis)."""
    if not n:
        return math.nan
    variance = m2 / n
    if variance <= (np.finfo(np.float64).resolution * mean) ** 2 or variance <= 0.0:
        return math.nan
    return n * m4 / (m2 * m2) - 3.0


# Values per piece of the exact moment pass: two fp64 temporaries of 512 KiB each stay in a
# core's L2 cache while five passes run over them. Measured on the 2-core VM (256×1536 fp32
# input, 1 thread): 0.74 ms in pieces of 2^16 values, 1.6 ms in one piece.
_MOMENT_PIECE = 1 << 16


def _exact_moments(x: torch.Tensor, workspace: Workspace) -> Moments:
    """Exact central moments of all values of ``x`` with torch ops (any device): each piece of
    ``_MOMENT_PIECE`` values is copied to fp64 and centred on its own fp64 mean, and the pieces
    are merged pairwise."""
    values = x.reshape(-1)
    piece = min(_MOMENT_PIECE, values.numel())
    # Row 0: the centred values c, row 1: c². One product of this [2, n] matrix with its own
    # transpose gives Σc², Σc³ and Σc⁴ in a single fp64 pass (BLAS), where three reductions
    # would read the rows three times.
    powers = workspace.matrix("moments c, c²", 2, _MOMENT_PIECE, torch.float64, x.device)
    total = Moments()
    for start in range(0, values.numel(), piece):
        part = values[start:start + piece]
        size = part.numel()
        centred, squared = powers[0, :size].copy_(part), powers[1, :size]
        mean = float(centred.sum()) / size
        centred.sub_(mean)
        torch.mul(centred, centred, out=squared)
        pair = powers[:, :size]
        (m2, m3), (_, m4) = (pair @ pair.T).tolist()
        total = total.merge(Moments(float(size), mean, m2, m3, m4))
    return total


def moments_from_power_sums(n: float, shift: float, s1: float, s2: float, s3: float, s4: float) -> Moments:
    """Central moments from the power sums S_k = Σ dᵏ of d = x − shift, by the binomial shift to
    the exact mean shift + δ, δ = S₁/n: M₂ = S₂ − nδ², M₃ = S₃ − 3δS₂ + 2nδ³,
    M₄ = S₄ − 4δS₃ + 6δ²S₂ − 3nδ⁴. Exact to fp64 rounding when the shift is near the mean (δ
    tiny next to the spread, so nothing cancels), as :meth:`Batch.stats` makes it."""
    delta = s1 / n
    m2 = s2 - n * delta * delta
    m3 = s3 - 3.0 * delta * s2 + 2.0 * n * delta ** 3
    m4 = s4 - 4.0 * delta * s3 + 6.0 * delta * delta * s2 - 3.0 * n * delta ** 4
    return Moments(float(n), shift + delta, m2, m3, m4)


def window_moments(batch: Batch) -> list[tuple[int, Moments, float]]:
    """(window, exact central moments of its values, its max|x|) for each window of the batch.
    Rows of a window are contiguous (the Batch contract); were a window split, its pieces would
    still merge exactly in the collector. Computed once per batch (``batch.derived``): on a
    compiled batch from the one-pass power sums, else with torch ops."""
    windows = batch.window_rows()
    if not batch.compiled:
        row_abs_max = batch.row_abs_max()
        return [(window, _exact_moments(batch.x[rows], batch.workspace), float(row_abs_max[rows].max()))
                for window, rows in windows]
    stats = batch.stats()
    features = batch.x.shape[1]
    pieces = []
    for (window, rows), sums in zip(windows, stats.window_sums.tolist()):
        if all(map(math.isfinite, sums)):
            moments = moments_from_power_sums(float((rows.stop - rows.start) * features), *sums)
        else:  # NaN or inf values: the torch path keeps their mean
            moments = _exact_moments(batch.x[rows], batch.workspace)
        pieces.append((window, moments, float(stats.row_abs_max[rows].max())))
    return pieces


# -- moments per key -------------------------------------------------------------------------


@dataclass
class MomentSummary:
    """What :class:`MomentCollector` knows about one key at the end of a run."""

    tokens: int                      # rows (tokens) seen
    values: int                      # tokens × features
    windows: int                     # windows that had at least one token
    mean: float
    std: float                       # population standard deviation of all values
    skewness: float
    kurtosis_pooled: float           # excess kurtosis of all values of all windows together
    kurtosis_window_mean: float      # per-window excess kurtosis, averaged over windows (LMAnalyser)
    windows_without_spread: int      # windows whose kurtosis is undefined (left out of the mean)
    abs_max: float                   # max|x| over everything
    window_abs_max_mean: float       # per-window max|x|, averaged over windows (LMAnalyser)


@dataclass
class _KeyMoments:
    pooled: Moments = field(default_factory=Moments)
    tokens: int = 0
    abs_max: float = 0.0
    windows: int = 0
    kurtosis_sum: float = 0.0
    kurtosis_windows: int = 0
    window_abs_max_sum: float = 0.0
    # Windows whose tokens may still arrive (at most one batch of windows): id -> (moments, max).
    pending: dict[int, tuple[Moments, float]] = field(default_factory=dict)


class MomentCollector:
    """Pooled and per-window moments per key. State per key is a handful of floats plus the
    windows of the current batch, so it does not grow with the number of windows."""

    def __init__(self) -> None:
        self._state: dict[str, _KeyMoments] = {}

    def update(self, key: str, batch: Batch) -> None:
        state = self._state.setdefault(key, _KeyMoments())
        x = batch.x
        if x.numel() == 0:
            return
        state.tokens += x.shape[0]
        present = set()
        for window, piece, peak in batch.derived("window moments", window_moments):
            state.pooled = state.pooled.merge(piece)
            state.abs_max = max(state.abs_max, peak)
            old, old_peak = state.pending.get(window, (Moments(), 0.0))
            state.pending[window] = (old.merge(piece), max(old_peak, peak))
            present.add(window)
        # collect() hands over each window whole in one pass, so a window absent from this
        # batch is complete: fold it into the running per-window averages and forget it.
        for window in [w for w in state.pending if w not in present]:
            self._close_window(state, window)

    @staticmethod
    def _close_window(state: _KeyMoments, window: int) -> None:
        moments, peak = state.pending.pop(window)
        state.windows += 1
        state.window_abs_max_sum += peak
        kurt = moments.excess_kurtosis
        if not math.isnan(kurt):
            state.kurtosis_sum += kurt
            state.kurtosis_windows += 1

    def keys(self) -> list[str]:
        return list(self._state)

    def result(self, key: str) -> MomentSummary:
        state = self._state[key]
        for window in list(state.pending):
            self._close_window(state, window)
        pooled = state.pooled
        return MomentSummary(
            tokens=state.tokens,
            values=int(pooled.n),
            windows=state.windows,
            mean=pooled.mean if pooled.n else math.nan,
            std=math.sqrt(pooled.variance) if pooled.n else math.nan,
            skewness=pooled.skewness,
            kurtosis_pooled=pooled.excess_kurtosis,
            kurtosis_window_mean=(state.kurtosis_sum / state.kurtosis_windows
                                  if state.kurtosis_windows else math.nan),
            windows_without_spread=state.windows - state.kurtosis_windows,
            abs_max=state.abs_max if state.tokens else math.nan,
            window_abs_max_mean=state.window_abs_max_sum / state.windows if state.windows else math.nan,
        )

    def state_nbytes(self) -> int:
        """Approximate bytes of state (for the memory test): 8 per float."""
        per_key = 12 * 8
        return sum(per_key + 6 * 8 * len(s.pending) for s in self._state.values())

    # -- merging across ranks (core/distributed.merge_collectors) ------------------------------
    def shard_state(self) -> dict[str, _KeyMoments]:
        for state in self._state.values():  # collection is over: every pending window is whole
            for window in list(state.pending):
                self._close_window(state, window)
        return {key: _KeyMoments(**{**vars(state), "pending": {}}) for key, state in self._state.items()}

    def load_shard_state(self, state: dict[str, _KeyMoments]) -> None:
        self._state = {key: _KeyMoments(**{**vars(value), "pending": {}}) for key, value in state.items()}

    def merge_shard_state(self, state: dict[str, _KeyMoments]) -> None:
        """Pooled moments merge exactly (Pébay); counts and per-window sums add; maxima max."""
        for key, other in state.items():
            mine = self._state.setdefault(key, _KeyMoments())
            mine.pooled = mine.pooled.merge(other.pooled)
            mine.tokens += other.tokens
            mine.abs_max = max(mine.abs_max, other.abs_max)
            mine.windows += other.windows
            mine.kurtosis_sum += other.kurtosis_sum
            mine.kurtosis_windows += other.kurtosis_windows
            mine.window_abs_max_sum += other.window_abs_max_sum


# -- per-channel statistics ------------------------------------------------------------------


@dataclass
class ChannelSummary:
    tokens: int
    sum_sq: torch.Tensor      # [F] fp64 Σ x²
    mean_sq: torch.Tensor     # [F] fp64 E[x²] over tokens (Wanda's scaler_row up to a constant)
    abs_max: torch.Tensor     # [F] fp32 max|x| (SmoothQuant's activation scales)


class ChannelCollector:
    """Per feature: Σx² in fp64 and max|x|. State is O(features) per key."""

    def __init__(self) -> None:
        self._count: dict[str, int] = {}
        self._sum_sq: dict[str, torch.Tensor] = {}
        self._abs_max: dict[str, torch.Tensor] = {}

    def update(self, key: str, batch: Batch) -> None:
        x = batch.x
        features = x.shape[1]
        if key not in self._count:
            self._count[key] = 0
            self._sum_sq[key] = torch.zeros(features, dtype=torch.float64, device=x.device)
            self._abs_max[key] = torch.zeros(features, dtype=torch.float32, device=x.device)
        if x.shape[0] == 0:
            return
        self._count[key] += x.shape[0]
        self._sum_sq[key] += batch.channel_sum_sq()
        torch.maximum(self._abs_max[key], batch.channel_abs_max(),
                      out=self._abs_max[key])

    def keys(self) -> list[str]:
        return list(self._count)

    def result(self, key: str) -> ChannelSummary:
        count = self._count[key]
        sum_sq = self._sum_sq[key].cpu()
        mean_sq = sum_sq / count if count else torch.full_like(sum_sq, math.nan)
        abs_max = self._abs_max[key].cpu() if count else torch.full_like(self._abs_max[key].cpu(), math.nan)
        return ChannelSummary(tokens=count, sum_sq=sum_sq, mean_sq=mean_sq, abs_max=abs_max)

    def state_nbytes(self) -> int:
        return sum(tensor_nbytes(t) for t in (*self._sum_sq.values(), *self._abs_max.values()))

    # -- merging across ranks (core/distributed.merge_collectors) ------------------------------
    def shard_state(self) -> dict:
        return {key: (self._count[key], self._sum_sq[key].cpu(), self._abs_max[key].cpu()) for key in self._count}

    def load_shard_state(self, state: dict) -> None:
        self._count = {key: count for key, (count, _, _) in state.items()}
        self._sum_sq = {key: sum_sq.clone() for key, (_, sum_sq, _) in state.items()}
        self._abs_max = {key: abs_max.clone() for key, (_, _, abs_max) in state.items()}

    def merge_shard_state(self, state: dict) -> None:
        for key, (count, sum_sq, abs_max) in state.items():
            if key not in self._count:
                self._count[key], self._sum_sq[key], self._abs_max[key] = count, sum_sq.clone(), abs_max.clone()
                continue
            self._count[key] += count
            self._sum_sq[key] += sum_sq.to(self._sum_sq[key].device)
            self._abs_max[key] = torch.maximum(self._abs_max[key], abs_max.to(self._abs_max[key].device))


# -- per-token scalars -----------------------------------------------------------------------


@dataclass
class TokenTable:
    """Per-token scalars of one key, row-aligned with the token metadata."""

    max_abs: torch.Tensor            # [N] fp32 max|x| over features
    token_ids: torch.Tensor          # [N] int64
    window: torch.Tensor             # [N] int64
    position: torch.Tensor           # [N] int64
    kurtosis: torch.Tensor | None    # [N] fp32 excess kurtosis of the token's feature vector
    argmax_channel: torch.Tensor | None  # [N] int64 feature index where |x| peaks


def _row_excess_kurtosis(x: torch.Tensor) -> torch.Tensor:
    """Excess kurtosis (Fisher, biased) of each row's features, computed in fp64; NaN for rows
    with no spread."""
    out = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    for rows in _row_chunks(x.shape[0], x.shape[1]):
        part = x[rows].to(torch.float64)
        mean = part.mean(dim=1, keepdim=True)
        centred = part - mean
        squared = centred * centred
        m2 = squared.mean(dim=1)
        m4 = (squared * squared).mean(dim=1)
        flat = m2 <= (np.finfo(np.float64).resolution * mean.squeeze(1)) ** 2
        value = m4 / (m2 * m2) - 3.0
        out[rows] = torch.where(flat | (m2 <= 0), torch.full_like(value, math.nan), value)
    return out


class TokenCollector:
    """One scalar per token and key: max|x| over features, and on request the token's feature
    kurtosis and the channel of its peak. Token ids/windows/positions are stored once for all
    keys, since every hooked key sees the same tokens in the same order.

    ``keep_ids`` restricts rows to tokens with those ids (token-occurrence only needs them).
    """

    def __init__(self, *, kurtosis: bool = False, argmax_channel: bool = False,
                 keep_ids: Iterable[int] | None = None) -> None:
        self.with_kurtosis = kurtosis
        self.with_argmax = argmax_channel
        self.keep_ids = None if keep_ids is None else torch.tensor(sorted(set(keep_ids)), dtype=torch.int64)
        self._meta: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._updates: dict[str, int] = {}
        self._max_abs: dict[str, list[torch.Tensor]] = {}
        self._kurtosis: dict[str, list[torch.Tensor]] = {}
        self._argmax: dict[str, list[torch.Tensor]] = {}
        self._tables: dict[str, TokenTable] = {}

    def update(self, key: str, batch: Batch) -> None:
        x, ids, window, position = batch.x, batch.token_ids, batch.window, batch.position
        # max|x| per token (and its channel) come from the whole batch, shared with the other
        # collectors, then follow the rows that keep_ids keeps.
        if not x.shape[0]:
            peak, channel = x.new_zeros(0), torch.zeros(0, dtype=torch.int64, device=x.device)
        elif self.with_argmax:
            peak, channel = batch.abs().max(dim=1)
        else:  # amax: max() would also search the indices, several times slower
            peak, channel = batch.row_abs_max(), None
        if self.keep_ids is not None:
            keep = torch.isin(ids, self.keep_ids)
            rows = keep.to(x.device)
            x, peak = x[rows], peak[rows]
            channel = None if channel is None else channel[rows]
            ids, window, position = ids[keep], window[keep], position[keep]
        # Pass p of this key pairs with metadata chunk p: the first key to reach a pass records
        # its tokens (int32: ids, windows and positions all fit), later keys must match.
        index = self._updates.get(key, 0)
        if index == len(self._meta):
            self._meta.append((ids.to(torch.int32), window.to(torch.int32), position.to(torch.int32)))
        elif self._meta[index][0].shape[0] != x.shape[0]:
            raise RuntimeError(f"token rows of {key} differ from the other hooked modules in pass {index}; "
                               "a module called more than once per forward pass cannot be tracked per token")
        self._updates[key] = index + 1
        self._tables.pop(key, None)
        # A copy, not the batch's own [T] vector: on compiled batches that is a view of the
        # kernel's output buffer, and keeping one such small buffer per hook call made later
        # forward passes up to half again slower (measured per window, 16 windows, 2-core VM:
        # 0.64 s per window growing to 0.95 s; with the copy a flat 0.5 s).
        self._max_abs.setdefault(key, []).append(peak.float().cpu().clone())
        if self.with_kurtosis:
            self._kurtosis.setdefault(key, []).append(_row_excess_kurtosis(x).float().cpu())
        if self.with_argmax:
            self._argmax.setdefault(key, []).append(channel.to(torch.int32).cpu())

    def keys(self) -> list[str]:
        return list(self._updates)

    def result(self, key: str) -> TokenTable:
        if key not in self._tables:
            passes = self._updates[key]
            meta = self._meta[:passes]

            def cat(chunks, dtype=torch.int64):
                return torch.cat(chunks).to(dtype) if chunks else torch.zeros(0, dtype=dtype)

            self._tables[key] = TokenTable(
                max_abs=cat(self._max_abs[key], torch.float32),
                token_ids=cat([m[0] for m in meta]),
                window=cat([m[1] for m in meta]),
                position=cat([m[2] for m in meta]),
                kurtosis=cat(self._kurtosis[key], torch.float32) if self.with_kurtosis else None,
                argmax_channel=cat(self._argmax[key]) if self.with_argmax else None,
            )
        return self._tables[key]

    def top_tokens(self, key: str, k: int) -> torch.Tensor:
        """Row indices of the ``k`` tokens with the largest max|x| for ``key``, largest first."""
        values = self.result(key).max_abs
        return torch.topk(values, min(k, values.numel())).indices

    # -- merging across ranks (core/distributed.merge_collectors) ------------------------------
    # Ranks hold contiguous blocks of windows, so rank-order concatenation is window order:
    # the merged rows are those of a single-process run, in the same order.
    def shard_state(self) -> dict:
        return {"meta": list(self._meta), "updates": dict(self._updates), "max_abs": self._max_abs,
                "kurtosis": self._kurtosis, "argmax": self._argmax}

    def load_shard_state(self, state: dict) -> None:
        self._meta, self._updates, self._tables = [], {}, {}
        self._max_abs, self._kurtosis, self._argmax = {}, {}, {}
        self.merge_shard_state(state)

    def merge_shard_state(self, state: dict) -> None:
        passes = len(self._meta)
        for key, count in state["updates"].items():
            if self._updates.get(key, 0) != passes or count != len(state["meta"]):
                raise RuntimeError(f"token rows of {key} do not line up across ranks")
            self._updates[key] = passes + count
        if state["meta"] and any(key not in state["updates"] for key in self._updates):
            raise RuntimeError("a hooked module saw no tokens on one rank; cannot merge per-token rows")
        self._meta.extend(state["meta"])
        for mine, other in ((self._max_abs, state["max_abs"]), (self._kurtosis, state["kurtosis"]),
                            (self._argmax, state["argmax"])):
            for key, chunks in other.items():
                mine.setdefault(key, []).extend(chunks)
        self._tables.clear()

    def state_nbytes(self) -> int:
        chunks = [t for m in self._meta for t in m]
        for store in (self._max_abs, self._kurtosis, self._argmax):
            chunks.extend(t for parts in store.values() for t in parts)
        return sum(tensor_nbytes(t) for t in chunks)


def tensor_nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
