"""CPU kernels for the activation statistics that torch computes slowly: one pass over an
activation where a chain of torch ops makes five or six.

* :func:`activation_sums` — per token row, Σd, Σd², Σd³, Σd⁴ of d = x − its window's mean and
  Σx², and per feature Σx², all in fp64.
  The exact fp64 moments behind kurtosis were the costliest statistic of an activation pass:
  with torch ops each piece of values is copied to fp64, summed, centred, squared and multiplied
  (five passes, and fp64 temporaries that push the activation out of cache). Here each fp32
  value is read once and widened in a register.
* :func:`int_error_row_sse` — per token row, Σ (Q(x) − x)² of symmetric per-token int RTN,
  with the same fp32 operations as :func:`llmprobe.core.quant.fake_quant_int` (so each error is
  the same number) and an fp64 sum; torch needs six passes (divide, round, multiply, subtract,
  square, sum).

Measured on the 2-core VM, one thread, a 256×576 fp32 activation: 0.07 ms and 0.08 ms, against
about 0.5 ms and 0.2 ms for the torch chains; inside a real forward pass, where the chains'
temporaries also evict the model's data, the gap is larger (docs/benchmarks.md).

The sums are compiled by numba on first use (cached on disk, so later processes only load
them; numba is imported only then), allowing reassociation: the compiler may split a sum into
vector lanes, which changes the last bits of an fp64 sum of at most a few thousand terms and
nothing else (no fused multiply-add, no assumption about NaN or inf). Where numba cannot be imported, :data:`AVAILABLE`
is False and callers use their torch path; both paths are tested against plain references.
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


def _activation_sums(x: np.ndarray, window_starts: np.ndarray) -> tuple:
    rows, features = x.shape
    windows = window_starts.shape[0] - 1
    per_row = np.empty((rows, 5), np.float64)
    column_squares = np.zeros(features, np.float64)
    window_shift = np.empty(windows, np.float64)
    for window in range(windows):
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
        window_shift[window] = shift
        for row in range(first, end):
            s1 = 0.0
            s2 = 0.0
            s3 = 0.0
            s4 = 0.0
            squares = 0.0
            for feature in range(features):
                value = np.float64(x[row, feature])
                square = value * value
                squares += square
                column_squares[feature] += square
                d = value - shift
                d2 = d * d
                s1 += d
                s2 += d2
                s3 += d2 * d
                s4 += d2 * d2
            per_row[row, 0] = s1
            per_row[row, 1] = s2
            per_row[row, 2] = s3
            per_row[row, 3] = s4
            per_row[row, 4] = squares
    return per_row, column_squares, window_shift


def _int_error_row_sse(x: np.ndarray, row_abs_max: np.ndarray, qmax: np.float32) -> np.ndarray:
    rows, features = x.shape
    out = np.empty(rows, np.float64)
    for row in range(rows):
        scale = row_abs_max[row] / qmax
        if scale == 0:  # an all-zero row quantizes to itself
            out[row] = 0.0
            continue
        total = 0.0
        for feature in range(features):
            value = x[row, feature]
            error = np.float64(np.rint(value / scale) * scale - value)
            total += error * error
        out[row] = total
    return out


def _array(values) -> np.ndarray:
    """A CPU tensor's numpy view (no copy), or ``values`` as an array."""
    return values.detach().numpy() if hasattr(values, "detach") else np.asarray(values)


def _matrix(x) -> np.ndarray:
    array = _array(x)
    if array.ndim != 2 or array.dtype != np.float32:
        raise ValueError(f"expected a 2-D fp32 matrix, got {array.dtype} of shape {array.shape}")
    return np.ascontiguousarray(array)


@dataclass
class ActivationSums:
    """What :func:`activation_sums` returns for a [T, F] activation split into windows."""

    rows: np.ndarray            # [T, 5] fp64: Σd, Σd², Σd³, Σd⁴ (d = x − its window's shift), Σx²
    window_shift: np.ndarray    # [W] fp64: each window's mean (0 where it is not finite)
    column_sum_sq: np.ndarray   # [F] fp64: Σx² per feature


def activation_sums(x, window_starts) -> ActivationSums:
    """One pass over the [T, F] fp32 matrix ``x`` whose windows start at the rows
    ``window_starts`` (ascending, first 0; T is appended when missing).

    Each window is shifted by its own fp64 mean (a first pass over its rows, cheap next to the
    power sums) so that the sums of d = x − shift lose nothing to cancellation; each d is exact
    in fp64 (an fp32 value minus an fp64 number).

    max|x| is not taken here: a maximum over the bit patterns (which vectorizes) measured as fast
    as torch's ``amax`` in isolation, but inside real passes it gave no gain that stood out of the
    machine's noise, and twice a loss (docs/benchmarks.md).
    """
    function = _compiled(_activation_sums) if AVAILABLE else _activation_sums
    matrix = _matrix(x)
    starts = np.asarray(window_starts, dtype=np.int64)
    if starts.size == 0 or starts[-1] != matrix.shape[0]:
        starts = np.append(starts, matrix.shape[0])
    rows, columns, shifts = function(matrix, starts)
    return ActivationSums(rows=rows, window_shift=shifts, column_sum_sq=columns)


def int_error_row_sse(x, bits: int, row_abs_max) -> np.ndarray:
    """[T] fp64 Σ over each row of (Q(x) − x)² for symmetric ``bits``-bit RTN with one scale per
    row (scale = max|x| / (2^(bits−1) − 1) in fp32, as ``fake_quant_int(x, bits,
    granularity="per-token")``); NaN and inf propagate as there."""
    function = _compiled(_int_error_row_sse) if AVAILABLE else _int_error_row_sse
    qmax = np.float32(2 ** (bits - 1) - 1)
    return function(_matrix(x), np.ascontiguousarray(_array(row_abs_max), dtype=np.float32), qmax)
