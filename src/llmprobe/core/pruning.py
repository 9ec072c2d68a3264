"""Pruning kernels: masks and the SparseGPT solver for one weight matrix.

Pure tensor functions: a weight ``W`` is ``[out, in]`` (rows are outputs, columns inputs); a
*prune mask* is a bool tensor of the same shape, True where the weight is removed. Nothing
here knows about models, hooks or analyses.

Selection rules (exact counts, ties broken by position):

* unstructured, per row: the ``floor(S * in)`` smallest scores of every row are pruned;
* unstructured, per matrix: the ``floor(S * out * in)`` smallest scores of the whole matrix;
* N:M: in every group of M consecutive inputs of a row, the N smallest scores are pruned.

Ties are broken by position (the earlier column goes first, as a stable sort would), so a mask is a function of
the scores alone. The Wanda reference code also sorts stably per row; its magnitude baseline
prunes every weight ``<=`` the k-th smallest, which can remove more than k weights when values
tie (we remove exactly k).
"""

from __future__ import annotations

import math

import torch

from .errors import LLMProbeError
from .specs import parse_nm  # noqa: F401  (re-exported: N:M parsing lives with the torch-free specs)


def check_sparsity(sparsity: float, flag: str = "--sparsity") -> float:
    """A sparsity in [0, 1), or a one-line error naming ``flag``."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not math.isfinite(sparsity):
        raise LLMProbeError(f"{flag} must be a number in [0, 1); got {sparsity!r}")
    if not 0.0 <= float(sparsity) < 1.0:
        raise LLMProbeError(f"{flag} must be in [0, 1) (the fraction of weights removed); got {sparsity}")
    return float(sparsity)


def _smallest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k smallest entries along the last dim, ties broken by position (what a
    stable sort would pick), found with a selection (kthvalue) instead of a full sort: the
    k-th smallest value t, every entry < t, then the first (k - #below) entries equal to t."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k <= 0:
        return mask
    if k >= scores.shape[-1]:
        return ~mask
    threshold = torch.kthvalue(scores, k, dim=-1, keepdim=True).values
    below = scores < threshold
    tied = scores == threshold
    still_needed = k - below.sum(dim=-1, keepdim=True)
    return below | (tied & (tied.cumsum(dim=-1) <= still_needed))


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``floor(sparsity * in)`` smallest scores of every row."""
    return _smallest_k(scores, int(math.floor(sparsity * scores.shape[1])))


def matrix_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``floor(sparsity * numel)`` smallest scores of the whole matrix."""
    return _smallest_k(scores.flatten(), int(math.floor(sparsity * scores.numel()))).view_as(scores)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the N smallest scores in every group of M consecutive inputs of each row."""
    rows, cols = scores.shape
    if cols % m:
        raise LLMProbeError(f"--nm {n}:{m} needs the input width to be a multiple of {m}; got {cols}")
    return _smallest_k(scores.reshape(rows, cols // m, m), n).view(rows, cols)


def select_mask(scores: torch.Tensor, *, sparsity: float = 0.0, nm: tuple[int, int] | None = None,
                scope: str = "row") -> torch.Tensor:
    """The prune mask for ``scores`` by one of the rules above (``scope``: 'row' | 'matrix')."""
    if nm is not None:
        return nm_mask(scores, *nm)
    if scope == "row":
        return row_mask(scores, sparsity)
    if scope == "matrix":
        return matrix_mask(scores, sparsity)
    raise LLMProbeError(f"unknown --scope '{scope}'; use row or matrix")


def magnitude_mask(weight: torch.Tensor, *, sparsity: float = 0.0, nm: tuple[int, int] | None = None,
                   scope: str = "matrix") -> torch.Tensor:
    """Magnitude pruning: the smallest |W| (one threshold per matrix by default, as the papers'
    baseline; ``scope='row'`` compares within each output row)."""
    return select_mask(weight.detach().float().abs(), sparsity=sparsity, nm=nm, scope=scope)


def wanda_scores(weight: torch.Tensor, input_sq_sum: torch.Tensor) -> torch.Tensor:
    """Wanda's score |W_ij| * sqrt(s_j), s_j the squared norm of input feature j over the
    calibration tokens (any positive normalisation of s gives the same per-row mask)."""
    return weight.detach().float().abs() * torch.sqrt(input_sq_sum.float()).unsqueeze(0)


def wanda_mask(weight: torch.Tensor, input_sq_sum: torch.Tensor, *, sparsity: float = 0.0,
               nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Wanda (arXiv 2306.11695): per output row, prune the smallest |W|*sqrt(s) (or N of M)."""
    return select_mask(wanda_scores(weight, input_sq_sum), sparsity=sparsity, nm=nm, scope="row")


def nm_valid(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of M consecutive inputs of every row holds at least N zeros."""
    rows, cols = weight.shape
    if cols % m:
        return False
    zeros = (weight.reshape(rows, cols // m, m) == 0).sum(dim=2)
    return bool((zeros >= n).all())


def reconstruction_error(weight: torch.Tensor, pruned: torch.Tensor, gram: torch.Tensor) -> float:
    """||W X - W' X||^2 / ||W X||^2 over the calibration inputs, from their Gram matrix
    G = sum_t x_t x_t^T (so X itself is never kept): ||A X||_F^2 = tr(A G A^T).

    Computed in the widest dtype of the inputs, at least fp32 (fp32 for an fp32 G: each term
    is a PSD quadratic form, so the relative error of the ratio stays ~1e-6)."""
    dtype = torch.promote_types(torch.promote_types(weight.dtype, gram.dtype), torch.float32)
    weight, gram = weight.to(dtype), gram.to(dtype)
    delta = weight - pruned.to(device=weight.device, dtype=dtype)
    err = float(((delta @ gram) * delta).sum(dtype=torch.float64))
    ref = float(((weight @ gram) * weight).sum(dtype=torch.float64))
    return err / ref if ref > 0 else float("nan")


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, *, sparsity: float = 0.0,
                    nm: tuple[int, int] | None = None, blocksize: int = 128,
                    percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (arXiv 2301.00774) for one matrix: returns (pruned W in fp32, prune mask).

    ``hessian`` is H = (2/n) sum_t x_t x_t^T over the layer's calibration inputs ([in, in]).
    Steps, in fp32 as the paper: dead inputs (H_jj = 0) get H_jj = 1 and their column of W set
    to 0; H += percdamp * mean(diag H) * I; U = upper Cholesky factor of H^-1 (H^-1 = U^T U).
    Columns are processed in blocks of ``blocksize``; at the start of a block the mask of the
    whole block is chosen from w^2 / U_cc^2 (unstructured: the floor(S * rows * block) smallest
    of the block; N:M: the N smallest of each M-column group, chosen when its first column is
    reached), then each column is pruned in turn and the error is spread over the block's later
    columns (OBS update); the later blocks get the accumulated update in one matmul (lazy batch).
    """
    if blocksize <= 0:
        raise LLMProbeError(f"--blocksize must be positive; got {blocksize}")
    if not 0 <= percdamp:
        raise LLMProbeError(f"--percdamp must be >= 0; got {percdamp}")
    W = weight.detach().clone().float()
    H = hessian.detach().clone().float()
    rows, cols = W.shape
    if nm is not None and blocksize % nm[1]:
        raise LLMProbeError(f"--blocksize {blocksize} must be a multiple of M={nm[1]} for --nm {nm[0]}:{nm[1]}")
    if nm is not None and cols % nm[1]:
        raise LLMProbeError(f"--nm {nm[0]}:{nm[1]} needs the input width to be a multiple of {nm[1]}; got {cols}")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    damp = percdamp * torch.mean(torch.diag(H))
    H += damp * torch.eye(cols, dtype=H.dtype, device=H.device)
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except RuntimeError as exc:  # torch.linalg.LinAlgError subclasses RuntimeError
        raise LLMProbeError(f"SparseGPT: the damped Hessian is not positive definite ({exc}); "
                            f"raise --percdamp or use more calibration samples") from None

    mask = torch.zeros_like(W, dtype=torch.bool)
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        # The block is held transposed ([columns, rows]) so that each column and each rank-1
        # update of the later columns touch contiguous memory.
        W1t = W[:, start:end].t().contiguous()
        Err1t = torch.zeros_like(W1t)
        Hinv1 = Hinv[start:end, start:end]
        diag1 = torch.diag(Hinv1)
        if nm is None:
            # chosen on the [rows, columns] view so ties go by row-major position, as documented
            mask1t = matrix_mask((W1t ** 2 / diag1.unsqueeze(1) ** 2).t(), sparsity).t().contiguous()
        else:
            mask1t = torch.zeros_like(W1t, dtype=torch.bool)
        # err = (w - q) / d: w on pruned rows, 0 on kept ones, so one multiply by mask / d.
        pruned_over_d = mask1t.to(W1t.dtype) / diag1.unsqueeze(1)
        for i in range(end - start):
            if nm is not None and i % nm[1] == 0:
                group = W1t[i:i + nm[1]] ** 2 / diag1[i:i + nm[1]].unsqueeze(1) ** 2
                mask1t[i:i + nm[1]] = _smallest_k(group.t(), nm[0]).t()
                pruned_over_d[i:i + nm[1]] = mask1t[i:i + nm[1]].to(W1t.dtype) / diag1[i:i + nm[1]].unsqueeze(1)
            err = W1t[i] * pruned_over_d[i]
            # OBS update of this and the block's later columns (column i becomes q up to round-off;
            # the pruned entries are set to exact zeros below).
            W1t[i:].addr_(Hinv1[i, i:], err, alpha=-1.0)
            Err1t[i] = err
        # Kept entries of column i are untouched by its own step and by every later one, so the
        # block's result is the updated block with the pruned entries zeroed.
        W[:, start:end] = W1t.masked_fill(mask1t, 0.0).t()
        mask[:, start:end] = mask1t.t()
        W[:, end:].addmm_(Err1t.t(), Hinv[start:end, end:], alpha=-1.0)
    mask[:, dead] = True
    return W, mask
