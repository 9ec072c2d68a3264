"""The CPU kernel for the statistics of an activation pass: one pass over an activation where
chains of torch ops made a dozen.

:func:`activation_stats` reads each fp32 value of a [T, F] activation once (the integer errors
read the row again while it is in L1) and returns, in fp64: the power sums Σd, Σd², Σd³, Σd⁴ of
d = x − shift for each window of rows (shifted by its mean), Σx²
and max|x| per row and per feature, and per row the squared error of symmetric per-token int RTN
for each requested width. The torch chains it replaced (the moments in fp64 temporaries, |x|
into a scratch matrix, two maxima, divide-round-multiply-subtract-square-sum for the errors)
each read the activation again, and their temporaries pushed the model's data out of cache.

Measured on the 2-core VM, one thread, 256 × 576 fp32 values out of cache: 0.34 ms for the
whole kernel with int4 errors, against 0.90 ms for the kernels and torch ops it replaces
(docs/benchmarks.md has the pass as a whole).

The kernel is compiled by numba on first use (cached on disk, so later processes only load it;
numba is imported only then), allowing reassociation: the compiler may split a sum into vector
lanes, which changes the last bits of an fp64 sum of at most a few thousand terms and nothing
else (no fused multiply-add, no assumption about NaN or inf). Where numba cannot be imported,
:data:`AVAILABLE` is False and callers use their torch path; both paths are tested against plain
references.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

import numpy as np

# numba is a dependency, imported only when a kernel first runs (~0.5 s, which commands that
# never collect activations should not pay). Where it is missing, callers use their torch path.
AVAILABLE = importlib.util.find_spec("numba") is not None
_FASTMATH = {"reassoc"}
_COMPILED: dict = {}


def _compiled(function):
    """``function`` compiled by numba (on first use; cached on disk for later processes)."""
    if function not in _COMPILED:
        try:
            from numba import njit
        except ImportError as exc:  # pragma: no cover - a broken numba install
            logging.getLogger(__name__).warning("numba cannot be imported (%s): statistics run in plain Python", exc)
            _COMPILED[function] = function
        else:
            try:
                _COMPILED[function] = njit(cache=True, nogil=True, fastmath=_FASTMATH)(function)
            except RuntimeError:  # no writable cache location (read-only install, no home): compile per process
                _COMPILED[function] = njit(nogil=True, fastmath=_FASTMATH)(function)
    return _COMPILED[function]


def _activation_stats(x, x_bits, window_starts, qmax, window_sums, rows, row_peak_bits, row_peak, column_squares,
                      column_peak_bits):
    features = x.shape[1]
    formats = qmax.shape[0]
    mask = np.int32(0x7FFFFFFF)
    for window in range(window_starts.shape[0] - 1):
        first = window_starts[window]
        end = window_starts[window + 1]
        total = 0.0
        for row in range(first, end):
            for feature in range(features):
                total += np.float64(x[row, feature])
        count = (end - first) * features
        shift = total / count if count > 0 else 0.0
        if not np.isfinite(shift):  # NaN or inf values: the sums say so, and callers take their torch path
            shift = 0.0
        s1 = 0.0
        s2 = 0.0
        s3 = 0.0
        s4 = 0.0
        for row in range(first, end):
            r1 = 0.0
            r2 = 0.0
            r3 = 0.0
            r4 = 0.0
            squares = 0.0
            peak = np.int32(0)
            for feature in range(features):
                value = np.float64(x[row, feature])
                square = value * value
                squares += square
                column_squares[feature] += square
                # |x| as its bit pattern: the sign bit cleared. Non-negative floats order like
                # their patterns, and every NaN lies above inf, so an integer maximum is max|x|
                # with NaN winning, as torch.amax; and it vectorizes, which a float max with a
                # NaN test does not. np.bitwise_and and np.maximum keep int32, where & and max
                # would widen to int64 and halve the vector width.
                magnitude = np.bitwise_and(x_bits[row, feature], mask)
                peak = np.maximum(peak, magnitude)
                column_peak_bits[feature] = np.maximum(column_peak_bits[feature], magnitude)
                d = value - shift
                d2 = d * d
                r1 += d
                r2 += d2
                r3 += d2 * d
                r4 += d2 * d2
            s1 += r1
            s2 += r2
            s3 += r3
            s4 += r4
            rows[row, 0] = squares
            row_peak_bits[row] = peak
            # Integer RTN errors: a second pass over the row, which is still in L1.
            for index in range(formats):
                scale = row_peak[row] / qmax[index]  # row_peak: row_peak_bits read as fp32
                if scale == 0:  # an all-zero row quantizes to itself
                    rows[row, 1 + index] = 0.0
                    continue
                error_sum = 0.0
                for feature in range(features):
                    value32 = x[row, feature]
                    error = np.float64(np.rint(value32 / scale) * scale - value32)
                    error_sum += error * error
                rows[row, 1 + index] = error_sum
        window_sums[window, 0] = shift
        window_sums[window, 1] = s1
        window_sums[window, 2] = s2
        window_sums[window, 3] = s3
        window_sums[window, 4] = s4


def _array(values) -> np.ndarray:
    """A CPU tensor's numpy view (no copy), or ``values`` as an array."""
    return values.detach().numpy() if hasattr(values, "detach") else np.asarray(values)


def _matrix(x) -> np.ndarray:
    array = _array(x)
    if array.ndim != 2 or array.dtype != np.float32:
        raise ValueError(f"expected a 2-D fp32 matrix, got {array.dtype} of shape {array.shape}")
    return np.ascontiguousarray(array)


@dataclass
class ActivationStats:
    """What :func:`activation_stats` returns for a [T, F] activation split into windows."""

    window_sums: np.ndarray     # [W, 5] fp64: shift (the window's mean, 0 where not finite), Σd, Σd², Σd³, Σd⁴
    row_sum_sq: np.ndarray      # [T] fp64 Σx² per row
    row_abs_max: np.ndarray     # [T] fp32 max|x| per row (NaN where the row has a NaN)
    row_int_sse: dict[int, np.ndarray]  # bits -> [T] fp64 Σ (Q(x) − x)², per-token symmetric int RTN
    column_sum_sq: np.ndarray   # [F] fp64 Σx² per feature
    column_abs_max: np.ndarray  # [F] fp32 max|x| per feature (NaN where the feature has a NaN)


def activation_stats(x, window_starts, int_bits=()) -> ActivationStats:
    """One pass over the [T, F] fp32 matrix ``x`` whose windows start at the rows
    ``window_starts`` (ascending, first 0; T may be appended), for every statistic an activation
    pass needs: per-window power sums about the window's mean, per-row Σx² and max|x|,
    per-feature Σx² and max|x|, and for each width in ``int_bits`` the per-row squared error of
    symmetric per-token int RTN (scale = max|x| / (2^(bits−1) − 1) in fp32, the same fp32
    operations as ``quant.fake_quant_int(x, bits, granularity="per-token")``, so each error is
    the same number; summed in fp64; NaN and inf propagate as there).

    Each value is read once for the sums (a first pass finds each window's mean, cheap next to
    the rest); the int errors read the row again while it is in L1. A window's d = x − shift is
    exact in fp64 (an fp32 value minus an fp64 number), and with the shift at the mean the power
    sums lose nothing to cancellation.

    One thread: the kernel runs between the forward's ops, while the forward's OpenMP threads
    spin-wait for their next region; rows split over a second Python thread measured slower
    inside real passes on the 2-core VM (1.34-1.59x a bare forward against 1.23-1.37x).
    """
    function = _compiled(_activation_stats) if AVAILABLE else _activation_stats
    matrix = _matrix(x)
    rows, features = matrix.shape
    starts = np.asarray(window_starts, dtype=np.int64)
    if starts.size == 0 or starts[-1] != rows:
        starts = np.append(starts, rows)
    bits = tuple(int(b) for b in int_bits)
    qmax = np.array([2 ** (b - 1) - 1 for b in bits], dtype=np.float32)
    window_sums = np.empty((starts.size - 1, 5), np.float64)
    per_row = np.empty((rows, 1 + len(bits)), np.float64)
    row_peak_bits = np.empty(rows, np.int32)
    column_squares = np.zeros(features, np.float64)
    column_peak_bits = np.zeros(features, np.int32)
    function(matrix, matrix.view(np.int32), starts, qmax, window_sums, per_row, row_peak_bits,
             row_peak_bits.view(np.float32), column_squares, column_peak_bits)
    return ActivationStats(
        window_sums=window_sums, row_sum_sq=per_row[:, 0], row_abs_max=row_peak_bits.view(np.float32),
        row_int_sse={b: per_row[:, 1 + i] for i, b in enumerate(bits)}, column_sum_sq=column_squares,
        column_abs_max=column_peak_bits.view(np.float32))
