"""Orthonormal Hadamard transform of the last dimension (QuaRot-style rotation), pure torch.

QuaRot / QuIP# rotate activations by an orthonormal Hadamard matrix before quantizing: the
rotation spreads a few outlier channels over all channels, so kurtosis and max|x| drop while
norms (and therefore any linear layer's output, with the weight rotated the same way) stay
the same. llmprobe applies ``x -> x @ H.T`` with ``H`` orthonormal (``H @ H.T = I``) to measure
what a rotated model would see.

Sizes. A Hadamard matrix of order ``n`` can exist only for n = 1, 2 or a multiple of 4. We
build one from constructions that need no lookup tables:

* Sylvester: ``H_2k = [[H_k, H_k], [H_k, -H_k]]`` for powers of two. These are applied as a fast
  Walsh–Hadamard transform (log2 n vectorised butterfly stages, O(n log n) per row), and the
  result equals ``scipy.linalg.hadamard(n) / sqrt(n)`` applied to the row.
* Paley I: for a prime q ≡ 3 (mod 4), an order q + 1 matrix (12, 20, 24, 32, 44, 48, ...).
* Paley II: for a prime q ≡ 1 (mod 4), an order 2(q + 1) matrix (12, 28, 36, 60, ...).
* Kronecker products of the above (order a·b from orders a and b).

A size ``n = m·2^k`` is transformed as ``H_m ⊗ H_{2^k}``: the fast transform over the 2^k part and a
small dense matmul with ``H_m`` over the rest, where ``m`` is the smallest order we can build
whose quotient is a power of two (576 = 36·16 uses Paley II with q = 17, 1536 = 12·128 uses
Paley I with q = 11, 14336 = 28·512 uses Paley II with q = 13). Sizes with no construction
(any n that is not 1, 2 or a multiple of 4, and a few multiples of 4 such as 92 that need other
constructions) are refused with an :class:`LLMProbeError` naming the size.
"""

from __future__ import annotations

import math
from functools import cache, lru_cache

import torch

from .errors import LLMProbeError

__all__ = ["HadamardPlan", "can_build", "hadamard_matrix", "hadamard_transform", "plan_for"]


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    if q % 2 == 0:
        return q == 2
    return all(q % d for d in range(3, math.isqrt(q) + 1, 2))


# -- constructions (±1 integer matrices, not yet normalised) ------------------------------------


def _sylvester(n: int) -> torch.Tensor:
    matrix = torch.ones(1, 1, dtype=torch.float64)
    while matrix.shape[0] < n:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j − i) with χ the quadratic character mod the prime q (χ(0) = 0)."""
    residues = torch.zeros(q, dtype=torch.float64)
    residues[1:] = -1.0
    for x in range(1, q):
        residues[(x * x) % q] = 1.0
    index = (torch.arange(q).unsqueeze(0) - torch.arange(q).unsqueeze(1)) % q
    return residues[index]


def _paley_one(q: int) -> torch.Tensor:
    """Order q + 1 for a prime q ≡ 3 mod 4: H = I + S with S the skew conference matrix
    [[0, 1ᵀ], [-1, Q]] (Q is skew-symmetric for these q)."""
    n = q + 1
    skew = torch.zeros(n, n, dtype=torch.float64)
    skew[0, 1:] = 1.0
    skew[1:, 0] = -1.0
    skew[1:, 1:] = _jacobsthal(q)
    return torch.eye(n, dtype=torch.float64) + skew


def _paley_two(q: int) -> torch.Tensor:
    """Order 2(q + 1) for a prime q ≡ 1 mod 4: from the symmetric conference matrix
    C = [[0, 1ᵀ], [1, Q]], replace 0 by [[1, -1], [-1, -1]] and ±1 by ±[[1, 1], [1, -1]]."""
    n = q + 1
    conference = torch.zeros(n, n, dtype=torch.float64)
    conference[0, 1:] = 1.0
    conference[1:, 0] = 1.0
    conference[1:, 1:] = _jacobsthal(q)
    on_zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    on_one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    zero_mask = (conference == 0).to(torch.float64)
    return torch.kron(conference, on_one) + torch.kron(zero_mask, on_zero)


@cache
def _recipe(order: int) -> tuple | None:
    """How to build a Hadamard matrix of ``order`` (a small tree of constructions), or None.

    Prefers the direct constructions, then Sylvester doubling, then a Kronecker product of two
    buildable factors; memoised because the factor search revisits the same orders.
    """
    if _is_power_of_two(order):
        return ("sylvester", order)
    if order % 4:
        return None
    if _is_prime(order - 1) and (order - 1) % 4 == 3:
        return ("paley1", order - 1)
    if order % 2 == 0 and _is_prime(order // 2 - 1) and (order // 2 - 1) % 4 == 1:
        return ("paley2", order // 2 - 1)
    if _recipe(order // 2) is not None:
        return ("double", order // 2)
    for left in range(4, math.isqrt(order) + 1):
        if order % left == 0 and _recipe(left) is not None and _recipe(order // left) is not None:
            return ("kron", left, order // left)
    return None


def _build(recipe: tuple) -> torch.Tensor:
    kind = recipe[0]
    if kind == "sylvester":
        return _sylvester(recipe[1])
    if kind == "paley1":
        return _paley_one(recipe[1])
    if kind == "paley2":
        return _paley_two(recipe[1])
    if kind == "double":
        half = _build(_recipe(recipe[1]))
        return torch.cat([torch.cat([half, half], 1), torch.cat([half, -half], 1)], 0)
    left, right = recipe[1], recipe[2]
    return torch.kron(_build(_recipe(left)), _build(_recipe(right)))


def can_build(n: int) -> bool:
    """Whether :func:`hadamard_transform` supports size ``n``."""
    return n >= 1 and _recipe(n) is not None


# -- plan: n = dense_order · 2^k ----------------------------------------------------------------


class HadamardPlan:
    """Size ``n`` split as ``dense_order · fast_order``: a dense ±1 block (built once) and a fast
    Walsh–Hadamard transform over a power of two."""

    def __init__(self, n: int):
        self.n = n
        self.dense_order = self._smallest_dense_order(n)
        self.fast_order = n // self.dense_order
        # ±1 entries kept as int8 (an order-5504 block, needed for 11008 = 43·256, is 30 MB
        # this way); per-(device, dtype) copies are made on first use and cached.
        self.dense = None if self.dense_order == 1 else _build(_recipe(self.dense_order)).to(torch.int8)
        self._dense_copies: dict[tuple, torch.Tensor] = {}

    @staticmethod
    def _smallest_dense_order(n: int) -> int:
        # A smaller dense part means a cheaper matmul; the rest of n goes to the fast transform.
        odd = n
        while odd % 2 == 0:
            odd //= 2
        order = odd
        while order <= n:
            if n % order == 0 and _is_power_of_two(n // order) and _recipe(order) is not None:
                return order
            order *= 2
        raise LLMProbeError(
            f"no Hadamard matrix of size {n} can be built here (Sylvester, Paley I/II and their Kronecker "
            f"products cover sizes 2^k and multiples of 4 such as 12·2^k, 20·2^k, 28·2^k); "
            f"--rotate hadamard cannot rotate a {n}-wide activation")

    def dense_on(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (str(device), dtype)
        if key not in self._dense_copies:
            self._dense_copies[key] = self.dense.to(device=device, dtype=dtype)
        return self._dense_copies[key]


@lru_cache(maxsize=64)
def plan_for(n: int) -> HadamardPlan:
    """The cached plan for size ``n`` (raises LLMProbeError for unsupported sizes)."""
    if n < 1:
        raise LLMProbeError(f"cannot build a Hadamard transform of size {n}")
    return HadamardPlan(n)


def _fast_walsh_hadamard(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Sylvester-ordered transform over the last dim (a power of two).

    Each stage views the last dim as [blocks, 2, half] and replaces (a, b) by (a + b, a − b);
    after log2(n) stages this is x @ H_n (H_n symmetric), with H_n as scipy.linalg.hadamard builds it.
    """
    n = x.shape[-1]
    lead = x.shape[:-1]
    half = 1
    out = x.reshape(-1, n)
    rows = out.shape[0]
    while half < n:
        pairs = out.view(rows, n // (2 * half), 2, half)
        first, second = pairs[:, :, 0, :], pairs[:, :, 1, :]
        out = torch.stack((first + second, first - second), dim=2).view(rows, n)
        half *= 2
    return out.view(*lead, n)


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """``x @ H.T`` for the orthonormal Hadamard matrix H of size ``x.shape[-1]``.

    Works on any device; half-precision inputs are transformed in fp32 and cast back so the
    rotation itself adds no rounding beyond the input's own format.
    """
    n = x.shape[-1]
    plan = plan_for(n)
    original_dtype = x.dtype
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    # Index i = dense_index · fast_order + fast_index, so the fast part is the trailing axis.
    work = work.reshape(*work.shape[:-1], plan.dense_order, plan.fast_order)
    if plan.fast_order > 1:
        work = _fast_walsh_hadamard(work)
    if plan.dense is not None:
        # (H_m ⊗ H_f) x = vec(H_m · X · H_fᵀ) with X the [m, f] view: contract the dense axis.
        dense = plan.dense_on(work.device, work.dtype)
        work = torch.matmul(dense, work)
    out = (work.reshape(*x.shape) * (1.0 / math.sqrt(n)))
    return out.to(original_dtype)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The orthonormal matrix H used by :func:`hadamard_transform` (so that
    ``hadamard_transform(x) == x @ H.T``), built explicitly, for tests and weight rotation."""
    return hadamard_transform(torch.eye(n, dtype=torch.float64)).T.contiguous().to(dtype)
