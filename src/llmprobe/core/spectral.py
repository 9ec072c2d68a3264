"""Spectral core: singular values on CPU or GPU (batched), and the estimators built on them.

Every weights command goes through this module, so a matrix is decomposed once and every number
(alpha, norms, ranks) is derived from the same spectrum.

Singular values (:func:`singular_values`, :func:`singular_values_batched`)
    The whole matrix is always decomposed (never cropped). ``dtype`` is the arithmetic precision of
    the decomposition: ``torch.float64`` means the matrix is converted to fp64 *before* any
    arithmetic (a bf16/fp32 weight converts exactly), not an fp32 result cast afterwards.

    ``method="gram"``: eigenvalues of the smaller Gram matrix (``W Wᵀ`` if rows <= cols, else
    ``Wᵀ W``) via ``torch.linalg.eigvalsh``, ``σ = sqrt(max(eig, 0))``. Much faster than an SVD,
    and the large singular values come out to full relative accuracy, but squaring loses the small
    ones: an eigenvalue carries an absolute error of order ``eps·σ_max²``, so a σ below roughly
    ``sqrt(eps)·σ_max`` (1.5e-8 in fp64, 3.5e-4 in fp32) is noise.

    On the CPU the Gram matrix comes from BLAS ``syrk`` (one triangle, half the flops of a
    matmul) and its eigenvalues from LAPACK ``syev`` (scipy), one matrix at a time with no
    stacking copy; on CUDA same-shape matrices are stacked and go through batched torch calls.

    ``method="svd"``: ``torch.linalg.svdvals`` — accurate for the small values too, slower.

    ``method="auto"`` (the guard rule): with ``need_small=False`` (callers that read only the top
    of the spectrum: alpha, norms, stable rank) use gram. With ``need_small=True`` (ranks) compute
    gram first and keep it only if its smallest σ is at least
    ``GRAM_GUARD_FACTOR · sqrt(eps) · σ_max`` (``GRAM_GUARD_FACTOR = 1e3``: 1.5e-5·σ_max in fp64,
    0.35·σ_max in fp32 — so fp32 rank work nearly always goes to svd); otherwise recompute that
    matrix with svdvals. Above the threshold every σ is resolved to ~1e-6 relative or better
    (error ≈ eps·σ_max²/σ² with room for growth), and a genuinely tiny σ cannot slip under the
    check because the gram noise itself (~sqrt(eps)·σ_max) is far below the threshold.

    On a CUDA device a ``torch.cuda.OutOfMemoryError`` moves that matrix (or batch, one matrix
    at a time) to the CPU; the method string then ends in ``"+cpu"``. fp32 matmuls are run with
    TF32 disabled so that fp32 means IEEE fp32.

Eigenvalues: ``λ = σ(W)²`` with *no* normalization (no division by N or by the matrix size),
the empirical spectral density used by WeightWatcher and Alpha-Hill.

Estimators take a 1-D numpy array or torch tensor (any float dtype); they work in fp64 numpy,
sort descending themselves, and use no Python loops over eigenvalues.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .errors import LLMProbeError

if TYPE_CHECKING:  # torch is imported where a function needs it
    import torch

GRAM_GUARD_FACTOR = 1e3
DEFAULT_MAX_BATCH_BYTES = 1 << 30
HILL_MIN_K = 10
POWERLAW_MIN_TAIL = 10
_KS_CANDIDATE_BLOCK_ELEMENTS = 1 << 20  # 8 MB of fp64 per temporary in the KS scan
_KS_PROBES = 256
_KS_EXACT_CHUNK = 128
_KS_PRUNE_MARGIN = 1e-12
METHODS = ("auto", "gram", "svd")
NON_FINITE_METHOD = "non-finite"


# --------------------------------------------------------------------------- decomposition


def _dtype_name(dtype) -> str:
    """"fp64" or "fp32" for any spelling :func:`_resolve_dtype` accepts, without torch for names."""
    names = {"fp64": "fp64", "float64": "fp64", "fp32": "fp32", "float32": "fp32"}
    if isinstance(dtype, str) and dtype.lower() in names:
        return names[dtype.lower()]
    return names[str(_resolve_dtype(dtype)).replace("torch.", "")]


def _resolve_dtype(dtype) -> torch.dtype:
    import torch

    aliases = {
        "fp64": torch.float64,
        "float64": torch.float64,
        "fp32": torch.float32,
        "float32": torch.float32,
    }
    if isinstance(dtype, str) and dtype.lower() in aliases:
        return aliases[dtype.lower()]
    if dtype in (torch.float64, torch.float32):
        return dtype
    raise LLMProbeError(f"spectral dtype must be fp64 or fp32, got {dtype!r}")


def _resolve_device(device) -> torch.device:
    from .devices import resolve_device

    return resolve_device(device)


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise LLMProbeError(f"unknown spectral method {method!r}; accepted: {', '.join(METHODS)}")
    return method


def _check_matrix(W) -> torch.Tensor:
    import torch
    if isinstance(W, np.ndarray):
        W = torch.from_numpy(W)
    if not isinstance(W, torch.Tensor):
        raise LLMProbeError(f"expected a 2-D tensor, got {type(W).__name__}")
    if W.ndim != 2:
        raise LLMProbeError(f"singular values need a 2-D matrix, got shape {tuple(W.shape)}")
    return W


@contextlib.contextmanager
def _ieee_fp32_matmul(device: torch.device):
    """Keep fp32 matmuls IEEE on CUDA even if the user enabled TF32 globally (restored on exit)."""
    import torch
    if device.type != "cuda":
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def gram_singular_values_array(array: np.ndarray) -> np.ndarray:
    """σ (descending, in the array's dtype) of one C-ordered fp32 or fp64 numpy matrix, from its
    smaller Gram matrix, through BLAS/LAPACK directly.

    ``syrk`` forms only one triangle of the Gram matrix (half the flops of a matmul) and ``syev``
    reads only that triangle; together ~1.5x faster than ``torch.linalg.eigvalsh(W @ W.T)`` on
    the CPU, with the same accuracy. The matrix is passed as the Fortran-ordered view of its
    transpose, so nothing is copied.
    """
    from scipy.linalg import blas

    rows, cols = array.shape
    syrk = blas.dsyrk if array.dtype == np.float64 else blas.ssyrk
    # array.T is (cols, rows) and Fortran-ordered: trans=1 gives W Wᵀ, trans=0 gives Wᵀ W.
    gram = syrk(1.0, array.T, trans=1 if rows <= cols else 0, lower=1)
    eig = _symmetric_eigenvalues(gram)
    return np.sqrt(np.clip(eig, 0.0, None))[::-1].copy()


def _cpu_gram_singular_values(matrix: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.from_numpy(gram_singular_values_array(matrix.detach().contiguous().numpy()))


def array_singular_values(matrices: Sequence[np.ndarray], dtype: str = "fp64") -> list[tuple[np.ndarray, str]]:
    """:func:`singular_values_batched` on the CPU with ``method="gram"`` for numpy matrices,
    without torch: ``(σ descending as fp64, method_used)`` per matrix, ``"non-finite"`` with NaNs
    for a matrix holding NaN/inf. Each matrix is converted to ``dtype`` ("fp32"/"fp64") and goes
    through the same BLAS/LAPACK calls as there, so the numbers are the same bits (tested)."""
    arithmetic = {"fp64": np.float64, "fp32": np.float32}[_dtype_name(dtype)]
    results: list[tuple[np.ndarray, str]] = []
    start = 0
    while start < len(matrices):  # runs of matrices with the same BLAS thread rule, one limit each
        small = min(matrices[start].shape) <= SINGLE_THREAD_MAX_SIDE
        end = start + 1
        while end < len(matrices) and (min(matrices[end].shape) <= SINGLE_THREAD_MAX_SIDE) == small:
            end += 1
        with _blas_threads_for(matrices[start].shape):
            for W in matrices[start:end]:
                if min(W.shape) == 0:
                    results.append((np.zeros(0), "gram"))
                elif not all_finite(W):
                    results.append((np.full(min(W.shape), math.nan), NON_FINITE_METHOD))
                else:
                    sigma = gram_singular_values_array(np.ascontiguousarray(W, dtype=arithmetic))
                    results.append((sigma.astype(np.float64), "gram"))
        start = end
    return results


def _symmetric_eigenvalues(gram: np.ndarray) -> np.ndarray:
    """Eigenvalues (ascending) of the symmetric matrix whose lower triangle ``gram`` holds.

    What LAPACK ``syev`` does for eigenvalues only — ``sytrd`` to tridiagonal form, then
    ``sterf`` — called directly so that ``sytrd`` gets its optimal workspace and runs blocked
    (scipy's ``eigh`` passes the minimum): the same numbers bit for bit, ~8% faster (576×576:
    17.6 against 19.2 ms in fp32). ``syev`` first rescales a matrix whose largest entry is
    outside [√(tiny/eps), 1/√(tiny/eps)] (about 4e-16…2e15 in fp32); such a matrix, or a failed
    call, goes to ``eigh``, which does the same.
    """
    from scipy.linalg import eigh, lapack

    single = gram.dtype == np.float32
    limits = np.finfo(gram.dtype)
    low = math.sqrt(float(limits.tiny) / float(limits.eps))
    peak = float(np.abs(gram).max()) if gram.size else 0.0
    if gram.shape[0] > 1 and (peak == 0.0 or low <= peak <= 1.0 / low):
        tridiagonal = lapack.ssytrd if single else lapack.dsytrd
        workspace = lapack.ssytrd_lwork if single else lapack.dsytrd_lwork
        sterf = lapack.ssterf if single else lapack.dsterf
        lwork = int(workspace(gram.shape[0], lower=1)[0])
        # gram is kept (sytrd works on a copy): a failed call falls back to eigh on it, which
        # then reports LAPACK's error in its own words.
        _, diagonal, off_diagonal, _, info = tridiagonal(gram, lower=1, lwork=lwork)
        if info == 0:
            eig, info = sterf(diagonal, off_diagonal, overwrite_d=1, overwrite_e=1)
            if info == 0:
                return eig
    return eigh(gram, lower=True, eigvals_only=True, overwrite_a=True, check_finite=False, driver="ev")


def _gram_singular_values(stack: torch.Tensor) -> torch.Tensor:
    """σ (descending) of each matrix in ``stack`` [..., m, n] from the smaller Gram matrix."""
    import torch
    if stack.device.type == "cpu" and stack.ndim == 3:
        return torch.stack([_cpu_gram_singular_values(matrix) for matrix in stack])
    rows, cols = stack.shape[-2], stack.shape[-1]
    transposed = stack.transpose(-2, -1)
    gram = stack @ transposed if rows <= cols else transposed @ stack
    eig = torch.linalg.eigvalsh(gram)  # ascending
    return torch.sqrt(torch.clamp(eig, min=0)).flip(-1)


def _svd_singular_values(stack: torch.Tensor) -> torch.Tensor:
    import torch
    return torch.linalg.svdvals(stack)  # already descending


def _needs_svd(sigma: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per matrix: True where the gram result cannot be trusted for the small singular values."""
    import torch
    threshold = GRAM_GUARD_FACTOR * math.sqrt(torch.finfo(dtype).eps)
    return sigma[..., -1] < threshold * sigma[..., 0]


def _spectrum(
    stack: torch.Tensor, method: str, need_small: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, list[str]]:
    """Singular values of a [b, m, n] stack already on its device in ``dtype``; one method name per matrix."""
    count = stack.shape[0]
    with _ieee_fp32_matmul(stack.device):
        if method == "svd":
            return _svd_singular_values(stack), ["svd"] * count
        sigma = _gram_singular_values(stack)
        if method == "gram" or not need_small:
            return sigma, ["gram"] * count
        redo = _needs_svd(sigma, dtype)
        if bool(redo.any()):
            sigma = sigma.clone()
            sigma[redo] = _svd_singular_values(stack[redo])
        return sigma, ["svd" if flag else "gram" for flag in redo.tolist()]


def _to_result(sigma: torch.Tensor) -> torch.Tensor:
    import torch
    return sigma.detach().to(device="cpu", dtype=torch.float64)


def _non_finite_result(W: torch.Tensor) -> tuple[torch.Tensor, str]:
    # LAPACK/cuSOLVER refuse NaN/inf input; a NaN spectrum lets every estimator report NaN with a
    # reason instead of the whole run failing on one broken tensor.
    import torch
    return torch.full((min(W.shape),), math.nan, dtype=torch.float64), NON_FINITE_METHOD


def all_finite(W) -> bool:
    """True when ``W`` (a tensor or a numpy array) holds no NaN/inf. A NaN or inf anywhere makes
    the sum non-finite, so a finite sum proves the matrix finite (one vectorized reduction, ~30x
    cheaper than ``isfinite(W).all()``); only a non-finite sum, which may be mere overflow of the
    sum, needs the element-wise check."""
    if isinstance(W, np.ndarray):
        if W.dtype.kind != "f" or W.size == 0:
            return True
        with np.errstate(over="ignore", invalid="ignore"):
            return bool(np.isfinite(W.sum())) or bool(np.isfinite(W).all())
    import torch

    if not W.is_floating_point() or W.numel() == 0:
        return True
    return bool(torch.isfinite(W.sum())) or bool(torch.isfinite(W).all())


def _single(W: torch.Tensor, dtype: torch.dtype, device: torch.device, method: str, need_small: bool):
    import torch
    if min(W.shape) == 0:
        return torch.zeros(0, dtype=torch.float64), method if method != "auto" else "gram"
    if not all_finite(W):
        return _non_finite_result(W)
    try:
        # Move in the stored dtype (smaller), convert on the target device.
        moved = _cpu_cast(W, dtype) if device.type == "cpu" else W.detach().to(device).to(dtype)
        sigma, names = _spectrum(moved.unsqueeze(0), method, need_small, dtype)
        return _to_result(sigma[0]), names[0]
    except torch.cuda.OutOfMemoryError:
        if device.type != "cuda":
            raise
    # Retry outside the except block so the failed attempt's GPU tensors (held by the traceback)
    # are released before empty_cache().
    torch.cuda.empty_cache()
    sigma, names = _spectrum(W.detach().to("cpu").to(dtype).unsqueeze(0), method, need_small, dtype)
    return _to_result(sigma[0]), names[0] + "+cpu"


def _cpu_cast(W: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``W`` on the CPU in ``dtype``. numpy's fp32 -> fp64 conversion is ~7x faster than torch's
    single-threaded one, and the copy is a visible share of a Gram + eigvalsh pass."""
    import torch

    numpy_floats = {torch.float32: np.float32, torch.float64: np.float64}
    W = W.detach().to("cpu")
    if W.dtype == dtype:
        return W
    if W.dtype in numpy_floats and dtype in numpy_floats:
        return torch.from_numpy(W.numpy().astype(numpy_floats[dtype]))
    return W.to(dtype)


# Below this many rows/columns on its short side a matrix's CPU spectrum runs on one BLAS thread.
SINGLE_THREAD_MAX_SIDE = 1024


@contextlib.contextmanager
def _blas_threads_for(shape) -> None:
    """One BLAS thread for small matrices. Their Gram eigenvalues are mostly Householder
    tridiagonalization (memory-bound BLAS2 steps that gain little from threads), and OpenBLAS
    threads spin while they wait for each other: on a shared 2-core machine with a busy core,
    the 211 spectra of SmolLM2-135M (576 wide) took 42.7 s with 2 threads and 11.7 s with one
    (measured). One thread also makes the bits independent of the core count."""
    if min(shape) > SINGLE_THREAD_MAX_SIDE:
        yield
        return
    # threadpoolctl limits only libraries already loaded: load scipy's BLAS first, or the first
    # matrix of a process would run on every thread (and get other bits than the rest).
    import scipy.linalg  # noqa: F401
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _stacked_spectrum(same_shape, dtype, device, method, need_small) -> list[tuple[torch.Tensor, str]]:
    import torch
    if device.type == "cpu":
        # CPU LAPACK works one matrix at a time anyway; skipping the stack saves its copy.
        results = []
        with _blas_threads_for(same_shape[0].shape):
            for W in same_shape:
                sigma, names = _spectrum(_cpu_cast(W, dtype).unsqueeze(0), method, need_small, dtype)
                results.append((_to_result(sigma[0]), names[0]))
        return results
    stack = torch.stack([W.detach().to(device).to(dtype) for W in same_shape])
    sigma, names = _spectrum(stack, method, need_small, dtype)
    sigma = _to_result(sigma)
    # clone: each result owns its storage instead of pinning the whole batch tensor
    return [(sigma[position].clone(), names[position]) for position in range(len(same_shape))]


def singular_values(
    W,
    *,
    dtype="fp64",
    device="cpu",
    method: str = "auto",
    need_small: bool = False,
) -> tuple[torch.Tensor, str]:
    """Singular values of the full 2-D matrix ``W``.

    Returns ``(sigma, method_used)``: ``sigma`` descending, fp64, on the CPU, ``min(W.shape)``
    long; ``method_used`` is ``"gram"`` or ``"svd"`` (``"+cpu"`` appended after a CUDA OOM
    fallback), or ``"non-finite"`` with an all-NaN ``sigma`` when ``W`` holds NaN/inf (nothing
    is decomposed; the estimators then return NaN with a reason). ``dtype`` (fp64/fp32) is the
    arithmetic precision; ``method``/``need_small`` follow the guard rule in the module docstring.
    """
    W = _check_matrix(W)
    return _single(W, _resolve_dtype(dtype), _resolve_device(device), _check_method(method), need_small)


def singular_values_batched(
    matrices,
    *,
    dtype="fp64",
    device="cpu",
    method: str = "auto",
    need_small: bool = False,
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
) -> list[tuple[torch.Tensor, str]]:
    """:func:`singular_values` for many matrices, in input order.

    Matrices of the same shape (e.g. every ``q_proj`` of a model) are stacked and decomposed in
    one batched call, in chunks whose stacked size in ``dtype`` stays under ``max_batch_bytes``
    (at least one matrix per chunk). A CUDA OOM on a chunk retries its matrices one by one, each
    with the single-matrix CPU fallback.
    """
    import torch
    dtype = _resolve_dtype(dtype)
    device = _resolve_device(device)
    method = _check_method(method)
    matrices = [_check_matrix(W) for W in matrices]
    results: list[tuple[torch.Tensor, str] | None] = [None] * len(matrices)

    by_shape: dict[tuple[int, int], list[int]] = {}
    for index, W in enumerate(matrices):
        if all_finite(W):
            by_shape.setdefault(tuple(W.shape), []).append(index)
        else:
            results[index] = _non_finite_result(W)

    itemsize = torch.empty(0, dtype=dtype).element_size()
    for (rows, cols), indices in by_shape.items():
        if min(rows, cols) == 0:
            for index in indices:
                results[index] = _single(matrices[index], dtype, device, method, need_small)
            continue
        # The stack plus the Gram matrix dominate memory; budget both.
        bytes_per_matrix = (rows * cols + min(rows, cols) ** 2) * itemsize
        per_chunk = max(1, int(max_batch_bytes // bytes_per_matrix))
        for start in range(0, len(indices), per_chunk):
            chunk = indices[start : start + per_chunk]
            try:
                chunk_results = _stacked_spectrum(
                    [matrices[i] for i in chunk], dtype, device, method, need_small
                )
            except torch.cuda.OutOfMemoryError:
                if device.type != "cuda":
                    raise
                chunk_results = None
            if chunk_results is None:
                # Outside the except block the failed attempt's GPU tensors are already released.
                torch.cuda.empty_cache()
                chunk_results = [_single(matrices[i], dtype, device, method, need_small) for i in chunk]
            for index, result in zip(chunk, chunk_results):
                results[index] = result
    return results  # type: ignore[return-value]


def eigenvalues(W, **kwargs) -> tuple[torch.Tensor, str]:
    """``(λ, method_used)`` with ``λ = σ(W)²`` descending, fp64 CPU — no normalization (not divided
    by N or anything else). Keyword arguments as :func:`singular_values`."""
    sigma, method_used = singular_values(W, **kwargs)
    return sigma**2, method_used


# --------------------------------------------------------------------------- estimators


def _descending_fp64(values) -> np.ndarray:
    """1-D fp64 numpy copy of ``values`` sorted descending."""
    torch = sys.modules.get("torch")  # a tensor implies torch is imported; arrays need no torch
    if torch is not None and isinstance(values, torch.Tensor):
        values = values.detach().to(device="cpu", dtype=torch.float64).numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise LLMProbeError(f"expected a 1-D array of eigen/singular values, got shape {array.shape}")
    return -np.sort(-array)


class HillEstimate(tuple):
    """``(alpha, k_used, n)``; unpacks as a 3-tuple. ``.reason`` says why alpha is NaN (else None)."""

    def __new__(cls, alpha: float, k_used: int, n: int, reason: str | None = None):
        estimate = super().__new__(cls, (alpha, k_used, n))
        estimate.reason = reason
        return estimate

    @property
    def alpha(self) -> float:
        return self[0]

    @property
    def k_used(self) -> int:
        return self[1]

    @property
    def n(self) -> int:
        return self[2]


def hill_k(n: int, k_frac: float) -> int:
    """The number of top eigenvalues Alpha-Hill uses: ``max(10, floor(k_frac·n))`` capped at ``n - 1``."""
    return min(max(HILL_MIN_K, math.floor(k_frac * n)), n - 1)


def alpha_hill(lam, k_frac: float = 0.1) -> HillEstimate:
    """Hill estimator of the ESD tail exponent.

    ``λ`` sorted descending, ``n = len(λ)``, ``k`` from :func:`hill_k`,
    ``alpha = 1 + k / Σ_{i=1..k} ln(λ_i / λ_{k+1})`` with ``λ_{k+1}`` the (k+1)-th largest.
    NaN (with ``.reason``) when n < 2, λ has non-finite values, ``λ_{k+1} <= 0`` (rank-deficient
    tail) or the top k+1 eigenvalues are all equal (sum of logs is 0).
    """
    if isinstance(k_frac, bool) or not isinstance(k_frac, (int, float)) or not 0.0 < k_frac < 1.0:
        raise LLMProbeError(f"k_frac must be strictly between 0 and 1, got {k_frac!r}")
    lam = _descending_fp64(lam)
    n = int(lam.size)
    if n < 2:
        return HillEstimate(math.nan, 0, n, f"need at least 2 eigenvalues, got {n}")
    if not np.all(np.isfinite(lam)):
        return HillEstimate(math.nan, 0, n, "eigenvalues contain NaN or inf")
    k = hill_k(n, k_frac)
    reference = lam[k]
    if reference <= 0:
        return HillEstimate(
            math.nan, k, n, f"the ({k + 1})-th largest eigenvalue is {reference:g} (rank-deficient)"
        )
    log_sum = float(np.sum(np.log(lam[:k] / reference)))
    if log_sum <= 0:
        return HillEstimate(math.nan, k, n, f"the top {k + 1} eigenvalues are equal (sum of logs is 0)")
    return HillEstimate(1.0 + k / log_sum, k, n, None)


@dataclass(frozen=True)
class PowerLawFit:
    """Clauset–Shalizi–Newman continuous power-law fit of the eigenvalue tail."""

    alpha: float
    xmin: float
    D_ks: float
    sigma: float
    n_tail: int
    reason: str | None = None


def _ks_distances(
    log_x: np.ndarray,
    starts: np.ndarray,
    log_xmins: np.ndarray,
    alphas: np.ndarray,
    columns: np.ndarray | None = None,
) -> np.ndarray:
    """KS distance of each candidate's tail ``x[start:]`` (ascending ``x``) to its fitted power law.

    D = sup|S(x) − P(x)| over the tail. For a step empirical CDF against a continuous P the sup is
    attained at the data points, on one side of a step or the other:
    ``D = max_i max(i/n − P(x_i), P(x_i) − (i−1)/n)``, i = 1..n the rank inside the tail (ties
    are covered by the same formula). With ``t_i = i/n + (x_i/xmin)^(1−alpha)`` (the second term
    is the survival 1 − P) this is ``max(max_i t_i − 1, 1 + 1/n − min_i t_i)``.

    Candidates are evaluated in [candidates × elements] numpy blocks, never a Python loop over
    eigenvalues. Elements below a candidate's xmin are clipped to rank 1 and ratio 1, which makes
    them copies of the tail's first element and so leaves max/min unchanged. With ``columns`` (a
    subset of element indices) the result is a *lower bound* on D: a max over fewer points.
    ``starts`` must be ascending.
    """
    total = log_x.size
    distances = np.empty(starts.size, dtype=np.float64)
    block = max(1, _KS_CANDIDATE_BLOCK_ELEMENTS // max(total if columns is None else columns.size, 1))
    for first in range(0, starts.size, block):
        last = min(first + block, starts.size)
        block_starts = starts[first:last]
        block_columns = np.arange(int(block_starts[0]), total) if columns is None else columns
        tail_size = (total - block_starts).astype(np.float64)[:, None]
        survival = log_x[None, block_columns] - log_xmins[first:last, None]
        np.maximum(survival, 0.0, out=survival)
        survival *= (1.0 - alphas[first:last])[:, None]
        np.exp(survival, out=survival)
        t = block_columns.astype(np.float64)[None, :] + (1.0 - block_starts)[:, None]
        np.maximum(t, 1.0, out=t)
        t /= tail_size
        t += survival
        upper = t.max(axis=1) - 1.0
        lower = 1.0 + 1.0 / tail_size[:, 0] - t.min(axis=1)
        distances[first:last] = np.maximum(upper, lower)
    return distances


def _min_ks_candidate(log_x: np.ndarray, starts: np.ndarray, log_xmins: np.ndarray, alphas: np.ndarray):
    """Index and D of the candidate with the smallest KS distance (first one among ties).

    The full scan is O(N²). Branch and bound keeps the answer exact while skipping most of it:
    a cheap lower bound of every candidate's D from ~500 probe points, then exact distances in
    order of increasing bound, stopping once the next bound exceeds the best exact D (such a
    candidate cannot win). The small margin covers last-ulp differences between the two passes.
    """
    total = log_x.size
    exact = np.full(starts.size, np.inf)
    if starts.size * total <= _KS_CANDIDATE_BLOCK_ELEMENTS:
        exact = _ks_distances(log_x, starts, log_xmins, alphas)
    else:
        even = np.linspace(0, total - 1, _KS_PROBES)
        # denser near the top, where the small-tail candidates live
        near_top = total - np.geomspace(1, total, _KS_PROBES)
        probes = np.unique(np.concatenate([even, near_top]).round().astype(np.int64).clip(0, total - 1))
        bounds = _ks_distances(log_x, starts, log_xmins, alphas, columns=probes)
        order = np.argsort(bounds, kind="stable")
        best = np.inf
        for chunk_from in range(0, order.size, _KS_EXACT_CHUNK):
            chunk = order[chunk_from : chunk_from + _KS_EXACT_CHUNK]
            if bounds[chunk[0]] > best + _KS_PRUNE_MARGIN:
                break
            chunk = np.sort(chunk)
            exact[chunk] = _ks_distances(log_x, starts[chunk], log_xmins[chunk], alphas[chunk])
            best = min(best, float(exact[chunk].min()))
    winner = int(np.argmin(exact))
    return winner, float(exact[winner])


def powerlaw_fit(lam, xmin_candidates=None, *, min_tail: int = POWERLAW_MIN_TAIL) -> PowerLawFit:
    """Continuous power-law MLE with xmin chosen by minimum KS distance (Clauset et al. 2009).

    Data: the positive eigenvalues (zeros carry no power-law information). Candidates: by
    default every distinct eigenvalue whose tail ``{x >= xmin}`` keeps at least ``min_tail``
    points (so the largest ``min_tail - 1`` values are never candidates); or the given
    ``xmin_candidates`` values, with the same minimum-tail rule. For each candidate:
    ``alpha = 1 + n / Σ ln(x_i / xmin)`` (suffix sums of sorted logs — one pass for all
    candidates), ``D`` = KS distance between the tail's empirical CDF and
    ``P(x) = 1 − (x/xmin)^(1−alpha)``, found by an exact branch-and-bound scan
    (:func:`_min_ks_candidate`; ~0.1–0.2 s for n = 10⁴). The smallest D wins (ties: the smaller xmin);
    ``sigma = (alpha − 1)/sqrt(n_tail)``. Candidates whose tail has all-equal values (alpha
    infinite) are skipped. NaN fit with ``reason`` when nothing qualifies.
    """
    if isinstance(min_tail, bool) or not isinstance(min_tail, int) or min_tail < 2:
        raise LLMProbeError(f"min_tail must be an integer >= 2, got {min_tail!r}")
    values = _descending_fp64(lam)

    def failed(reason: str) -> PowerLawFit:
        return PowerLawFit(math.nan, math.nan, math.nan, math.nan, 0, reason)

    if not np.all(np.isfinite(values)):
        return failed("eigenvalues contain NaN or inf")
    x = np.sort(values[values > 0])  # ascending
    total = x.size
    if total < min_tail:
        return failed(f"need at least {min_tail} positive eigenvalues, got {total}")
    log_x = np.log(x)

    if xmin_candidates is None:
        candidate_starts = np.flatnonzero(np.r_[True, x[1:] != x[:-1]])  # first index of each distinct value
        candidate_xmins = x[candidate_starts]
    else:
        candidate_xmins = np.unique(_descending_fp64(xmin_candidates))
        candidate_xmins = candidate_xmins[np.isfinite(candidate_xmins) & (candidate_xmins > 0)]
        candidate_starts = np.searchsorted(x, candidate_xmins, side="left")
    tail_sizes = total - candidate_starts
    keep = tail_sizes >= min_tail
    candidate_starts, candidate_xmins, tail_sizes = (
        candidate_starts[keep],
        candidate_xmins[keep],
        tail_sizes[keep],
    )

    # Σ_{i>=start} ln x_i for every start at once; then Σ ln(x_i/xmin) = suffix − n·ln xmin.
    suffix_log_sums = np.cumsum(log_x[::-1])[::-1]
    log_xmins = np.log(candidate_xmins)
    log_ratio_sums = (
        suffix_log_sums[candidate_starts] - tail_sizes * log_xmins if candidate_starts.size else np.zeros(0)
    )
    usable = log_ratio_sums > 0
    if not np.any(usable):
        return failed(f"no xmin candidate leaves a non-degenerate tail of >= {min_tail} eigenvalues")
    candidate_starts, log_xmins = candidate_starts[usable], log_xmins[usable]
    candidate_xmins, tail_sizes = candidate_xmins[usable], tail_sizes[usable]
    alphas = 1.0 + tail_sizes / log_ratio_sums[usable]

    best, distance = _min_ks_candidate(log_x, candidate_starts, log_xmins, alphas)
    alpha = float(alphas[best])
    n_tail = int(tail_sizes[best])
    return PowerLawFit(
        alpha, float(candidate_xmins[best]), distance, (alpha - 1.0) / math.sqrt(n_tail), n_tail
    )


def alpha_weighted(alpha: float, lam_max: float) -> float:
    """WeightWatcher's weighted alpha: ``alpha · log10(λ_max)``."""
    return float(alpha) * math.log10(lam_max) if lam_max > 0 else math.nan


def log_spectral_norm(lam) -> float:
    """``log10(λ_max)`` = log10 of the *squared* spectral norm ``σ_max²`` (WeightWatcher's convention)."""
    values = _descending_fp64(lam)
    lam_max = float(values[0]) if values.size else 0.0
    return math.log10(lam_max) if lam_max > 0 else math.nan


def log_norm(lam) -> float:
    """``log10(Σλ)`` = log10 of the *squared* Frobenius norm ``‖W‖_F²`` (WeightWatcher's ``log_norm``)."""
    total = float(np.sum(_descending_fp64(lam)))
    return math.log10(total) if total > 0 else math.nan


def stable_rank(lam) -> float:
    """``Σλ / λ_max`` = ``‖W‖_F² / ‖W‖_2²``; NaN for a zero matrix or a non-finite spectrum."""
    values = _descending_fp64(lam)
    if values.size == 0 or not np.all(np.isfinite(values)) or values[0] <= 0:
        return math.nan
    return float(np.sum(values) / values[0])


def numerical_rank(sigma, rtol: float = 1e-6) -> int | float:
    """Number of singular values ``> rtol · σ_max`` (np.linalg.matrix_rank with ``tol = rtol·σ_max``).

    Like every rank here: 0 for a zero matrix, NaN (a float) when σ holds NaN/inf."""
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not rtol >= 0:
        raise LLMProbeError(f"rank tolerance must be >= 0, got {rtol!r}")
    values = _descending_fp64(sigma)
    if not np.all(np.isfinite(values)):
        return math.nan
    if values.size == 0 or values[0] <= 0:
        return 0
    return int(np.count_nonzero(values > rtol * values[0]))


def energy_rank(sigma, energy: float = 0.9) -> int | float:
    """Smallest r with ``Σ_{i<=r} σ_i² >= energy · Σ σ²`` (0 for a zero matrix, NaN if non-finite)."""
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0.0 < energy <= 1.0:
        raise LLMProbeError(f"energy must be in (0, 1], got {energy!r}")
    values = _descending_fp64(sigma)
    if not np.all(np.isfinite(values)):
        return math.nan
    squares = values**2
    total = float(np.sum(squares))
    if values.size == 0 or total <= 0:
        return 0
    cumulative = np.cumsum(squares)
    # searchsorted gives the first index whose cumulative energy reaches the target; the clip
    # guards energy=1.0 against the cumsum's last element landing one ulp short of the total.
    first_index = int(np.searchsorted(cumulative, energy * total, side="left"))
    return min(first_index + 1, int(values.size))


def effective_rank(sigma) -> float:
    """Roy & Vetterli (2007) effective rank ``exp(H(p))`` with ``p_i = σ_i / Σσ`` — built from σ,
    not σ² — and ``0·log 0 = 0``. 0.0 for a zero matrix, NaN if non-finite."""
    values = _descending_fp64(sigma)
    if not np.all(np.isfinite(values)):
        return math.nan
    total = float(np.sum(values))
    if values.size == 0 or total <= 0:
        return 0.0
    p = values[values > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))))


def spectral_norm(sigma) -> float:
    """``σ_max`` (0.0 for an empty spectrum)."""
    values = _descending_fp64(sigma)
    return float(values[0]) if values.size else 0.0


def frobenius_norm(sigma) -> float:
    """``sqrt(Σσ²)``."""
    values = _descending_fp64(sigma)
    return float(np.sqrt(np.sum(values**2)))


FITS = ("hill", "powerlaw", "both", "none")


def summarize(
    sigma,
    *,
    k_frac: float = 0.1,
    rank_rtol: float = 1e-6,
    energy: float = 0.9,
    fit: str = "hill",
) -> dict:
    """Every spectral number of one matrix from its singular values, so commands don't recompute.

    ``fit``: ``"hill"`` (alpha = Alpha-Hill), ``"powerlaw"`` (alpha = Clauset MLE), ``"both"``
    (alpha = Hill, the power-law columns filled too) or ``"none"``. The key set is the same for
    every ``fit`` (``None`` where not computed) so records stay uniform. ``design_rank`` is
    ``len(sigma)``, i.e. min(rows, cols) for a full spectrum. λ = σ².
    """
    if fit not in FITS:
        raise LLMProbeError(f"unknown fit {fit!r}; accepted: {', '.join(FITS)}")
    values = _descending_fp64(sigma)
    lam = values**2
    n = int(values.size)
    lam_max = float(lam[0]) if n else 0.0
    numeric = numerical_rank(values, rank_rtol)
    energetic = energy_rank(values, energy)
    summary = {
        "design_rank": n,
        "n_eigs": n,
        "spectral_norm": spectral_norm(values),
        "frobenius_norm": frobenius_norm(values),
        "lambda_max": lam_max,
        "log_spectral_norm": log_spectral_norm(lam),
        "log_norm": log_norm(lam),
        "stable_rank": stable_rank(lam),
        "numerical_rank": numeric,
        "numerical_rank_ratio": numeric / n if n else math.nan,
        "energy_rank": energetic,
        "energy_rank_ratio": energetic / n if n else math.nan,
        "effective_rank": effective_rank(values),
        "fit": fit,
        "alpha": None,
        "alpha_weighted": None,
        "alpha_reason": None,
        "k_used": None,
        "alpha_hill": None,
        "alpha_powerlaw": None,
        "xmin": None,
        "D_ks": None,
        "alpha_sigma": None,
        "n_tail": None,
    }
    if fit in ("hill", "both"):
        hill = alpha_hill(lam, k_frac)
        summary.update(alpha_hill=hill.alpha, k_used=hill.k_used, alpha=hill.alpha, alpha_reason=hill.reason)
    if fit in ("powerlaw", "both"):
        law = powerlaw_fit(lam)
        summary.update(
            alpha_powerlaw=law.alpha, xmin=law.xmin, D_ks=law.D_ks, alpha_sigma=law.sigma, n_tail=law.n_tail
        )
        if fit == "powerlaw":
            summary.update(alpha=law.alpha, alpha_reason=law.reason)
    if summary["alpha"] is not None:
        summary["alpha_weighted"] = alpha_weighted(summary["alpha"], lam_max)
    return summary
