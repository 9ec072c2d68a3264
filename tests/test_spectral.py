"""Spectral core and estimators against numpy/scipy and plain-Python loops, on small inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from llmprobe.core import spectral
from llmprobe.core.errors import LLMProbeError
from llmprobe.core.spectral import (
    alpha_hill,
    alpha_weighted,
    effective_rank,
    eigenvalues,
    energy_rank,
    frobenius_norm,
    hill_k,
    log_norm,
    log_spectral_norm,
    numerical_rank,
    powerlaw_fit,
    singular_values,
    singular_values_batched,
    spectral_norm,
    stable_rank,
    summarize,
)


def matrix_with_singular_values(rows: int, cols: int, sigma: np.ndarray, seed: int = 0) -> np.ndarray:
    """U diag(sigma) Vᵀ with random orthonormal U, V."""
    rng = np.random.default_rng(seed)
    rank = sigma.size
    left, _ = np.linalg.qr(rng.standard_normal((rows, rank)))
    right, _ = np.linalg.qr(rng.standard_normal((cols, rank)))
    return left @ np.diag(sigma) @ right.T


# ----------------------------------------------------------------------------- decomposition


@pytest.mark.parametrize("shape", [(40, 70), (70, 40), (33, 33)])
def test_gram_path_matches_numpy_svd(shape):
    rng = np.random.default_rng(sum(shape))
    W = rng.standard_normal(shape)
    reference = np.linalg.svd(W, compute_uv=False)
    sigma, method = singular_values(torch.from_numpy(W), method="gram")
    assert method == "gram"
    assert sigma.dtype == torch.float64 and sigma.device.type == "cpu"
    assert sigma.shape == (min(shape),)
    assert torch.all(sigma[:-1] >= sigma[1:])
    top = min(shape) // 2
    np.testing.assert_allclose(sigma.numpy()[:top], reference[:top], rtol=1e-10, atol=0)
    # auto without need_small is the gram path; svd agrees everywhere
    assert singular_values(torch.from_numpy(W))[1] == "gram"
    svd_sigma, svd_method = singular_values(torch.from_numpy(W), method="svd")
    assert svd_method == "svd"
    np.testing.assert_allclose(svd_sigma.numpy(), reference, rtol=1e-10, atol=0)


def test_guard_recovers_tiny_singular_values_gram_cannot():
    true_sigma = np.logspace(0, -9, 60)
    W = torch.from_numpy(matrix_with_singular_values(60, 90, true_sigma, seed=1))
    gram_sigma, _ = singular_values(W, method="gram")
    guarded, method = singular_values(W, need_small=True)
    assert method == "svd"  # smallest σ far below 1e3·sqrt(eps)·σ_max: recomputed
    np.testing.assert_allclose(guarded.numpy(), true_sigma, rtol=1e-5)
    # gram alone has lost the smallest values entirely
    assert np.max(np.abs(gram_sigma.numpy()[-5:] / true_sigma[-5:] - 1)) > 0.5
    tolerances = [1e-6, 1e-7, 1e-8, 3e-9, 5e-10]
    true_ranks = [int(np.sum(true_sigma > rtol)) for rtol in tolerances]
    assert [numerical_rank(guarded, rtol) for rtol in tolerances] == true_ranks
    assert [numerical_rank(gram_sigma, rtol) for rtol in tolerances] != true_ranks


def test_guard_keeps_gram_for_well_conditioned_matrices():
    true_sigma = np.linspace(3.0, 0.5, 30)
    W = torch.from_numpy(matrix_with_singular_values(30, 50, true_sigma, seed=2))
    sigma, method = singular_values(W, need_small=True)
    assert method == "gram"
    np.testing.assert_allclose(sigma.numpy(), true_sigma, rtol=1e-10)


def test_fp32_and_fp64_arithmetic_are_honoured():
    # σ_min = 5e-11 exists only in fp64: in fp32 the entry 1 + 1e-10 rounds to 1 and the matrix is singular
    W = torch.tensor([[1.0, 1.0], [1.0, 1.0 + 1e-10]], dtype=torch.float64)
    reference = np.linalg.svd(W.numpy(), compute_uv=False)
    sigma64, _ = singular_values(W, method="svd", dtype=torch.float64)
    sigma32, _ = singular_values(W, method="svd", dtype="fp32")
    np.testing.assert_allclose(sigma64.numpy(), reference, rtol=1e-5)
    # fp32 round-off of an exactly singular matrix; returned as fp64
    assert sigma32[1] < 4 * 2.0 ** -23 and sigma32.dtype == torch.float64
    # a bf16 weight is converted exactly to fp64 before any arithmetic
    W16 = torch.randn(20, 30, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    sigma_bf16, _ = singular_values(W16, method="svd")
    np.testing.assert_allclose(
        sigma_bf16.numpy(), np.linalg.svd(W16.double().numpy(), compute_uv=False), rtol=1e-12
    )
    # fp32 gram differs from fp64 gram on the small values of an ill-conditioned matrix
    ill = torch.from_numpy(matrix_with_singular_values(20, 30, np.logspace(0, -5, 20), seed=3))
    g64, _ = singular_values(ill, method="gram", dtype=torch.float64)
    g32, _ = singular_values(ill, method="gram", dtype=torch.float32)
    assert abs(g64[-1].item() / 1e-5 - 1) < 1e-3
    assert abs(g32[-1].item() / 1e-5 - 1) > 0.1


@pytest.mark.parametrize("need_small", [False, True])
def test_batched_equals_unbatched(need_small):
    rng = np.random.default_rng(4)
    shapes = [(20, 30), (30, 20), (20, 30), (15, 15), (20, 30), (30, 20)]
    matrices = [torch.from_numpy(rng.standard_normal(shape)) for shape in shapes]
    # one ill-conditioned member so the guard recomputes only that one inside its batch
    matrices[2] = torch.from_numpy(matrix_with_singular_values(20, 30, np.logspace(0, -10, 20), seed=5))
    for max_batch_bytes in (spectral.DEFAULT_MAX_BATCH_BYTES, 1):  # 1 byte: one matrix per chunk
        batched = singular_values_batched(matrices, need_small=need_small, max_batch_bytes=max_batch_bytes)
        assert len(batched) == len(matrices)
        for W, (sigma, method) in zip(matrices, batched):
            single_sigma, single_method = singular_values(W, need_small=need_small)
            assert method == single_method
            np.testing.assert_allclose(sigma.numpy(), single_sigma.numpy(), rtol=1e-12, atol=1e-15)
    methods = [method for _, method in singular_values_batched(matrices, need_small=True)]
    assert methods == ["gram", "gram", "svd", "gram", "gram", "gram"]


def test_eigenvalues_are_squared_singular_values_without_normalization():
    W = torch.randn(12, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    lam, method = eigenvalues(W)
    reference = np.linalg.eigvalsh(W.numpy() @ W.numpy().T)[::-1]
    np.testing.assert_allclose(lam.numpy(), reference, rtol=1e-10)
    assert method == "gram"


def test_decomposition_bad_input_and_edge_cases():
    with pytest.raises(LLMProbeError):
        singular_values(torch.randn(3, 4, 5))
    with pytest.raises(LLMProbeError):
        singular_values(torch.randn(3, 4), dtype=torch.float16)
    with pytest.raises(LLMProbeError):
        singular_values(torch.randn(3, 4), method="lanczos")
    with pytest.raises(LLMProbeError):
        singular_values(torch.randn(3, 4), device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(LLMProbeError, match="CUDA"):
            singular_values(torch.randn(3, 4), device="cuda")
    sigma, _ = singular_values(torch.zeros(0, 5))
    assert sigma.numel() == 0
    zero_sigma, _ = singular_values(torch.zeros(4, 6), need_small=True)
    assert torch.all(zero_sigma == 0)
    np.testing.assert_allclose(singular_values(np.eye(3))[0].numpy(), np.ones(3))
    broken = torch.randn(5, 7)
    broken[1, 2] = math.nan
    nan_sigma, nan_method = singular_values(broken)
    assert nan_method == "non-finite" and nan_sigma.shape == (5,) and torch.isnan(nan_sigma).all()
    assert math.isnan(alpha_hill(nan_sigma**2).alpha)
    mixed = singular_values_batched([torch.randn(5, 7), broken, torch.randn(5, 7)])
    assert [method for _, method in mixed] == ["gram", "non-finite", "gram"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    W = torch.randn(64, 96, dtype=torch.float32, generator=torch.Generator().manual_seed(7))
    for method in ("gram", "svd"):
        cpu, _ = singular_values(W, method=method)
        gpu, used = singular_values(W, method=method, device="cuda")
        assert used == method
        np.testing.assert_allclose(gpu.numpy(), cpu.numpy(), rtol=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_out_of_memory_falls_back_to_cpu(monkeypatch):
    real_spectrum = spectral._spectrum

    def out_of_memory_on_gpu(stack, *args):
        if stack.device.type == "cuda":
            raise torch.cuda.OutOfMemoryError("simulated")
        return real_spectrum(stack, *args)

    monkeypatch.setattr(spectral, "_spectrum", out_of_memory_on_gpu)
    W = torch.randn(16, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    reference = np.linalg.svd(W.numpy(), compute_uv=False)
    sigma, method = singular_values(W, device="cuda")
    assert method == "gram+cpu"
    np.testing.assert_allclose(sigma.numpy(), reference, rtol=1e-10)
    batched = singular_values_batched([W, W], device="cuda")
    assert [used for _, used in batched] == ["gram+cpu", "gram+cpu"]


# ----------------------------------------------------------------------------- Alpha-Hill


def hill_reference(values, k_frac):
    """Plain-Python Alpha-Hill, as the SPEC states it."""
    lam = sorted((float(v) for v in values), reverse=True)
    n = len(lam)
    k = min(max(10, math.floor(k_frac * n)), n - 1)
    log_sum = 0.0
    for i in range(k):
        log_sum += math.log(lam[i] / lam[k])
    return 1.0 + k / log_sum, k, n


@pytest.mark.parametrize("n,k_frac", [(500, 0.1), (1000, 0.25), (50, 0.1), (8, 0.1), (2, 0.5), (300, 0.01)])
def test_alpha_hill_matches_python_loop(n, k_frac):
    rng = np.random.default_rng(n)
    lam = (rng.pareto(2.0, n) + 1.0) ** 2
    shuffled = torch.from_numpy(rng.permutation(lam))  # unsorted torch input is fine
    alpha, k_used, n_used = alpha_hill(shuffled, k_frac)
    ref_alpha, ref_k, ref_n = hill_reference(lam, k_frac)
    assert (k_used, n_used) == (ref_k, ref_n)
    assert alpha == pytest.approx(ref_alpha, rel=1e-12)


def test_hill_k_rule():
    assert hill_k(1000, 0.1) == 100  # floor(k_frac·n)
    assert hill_k(50, 0.1) == 10  # max(10, 5)
    assert hill_k(109, 0.1) == 10  # floor(10.9) = 10
    assert hill_k(8, 0.1) == 7  # capped at n - 1
    assert hill_k(11, 0.5) == 10  # max(10, 5), within n - 1
    assert alpha_hill(np.arange(1.0, 9.0)).k_used == 7


def test_alpha_hill_degenerate_cases_give_nan_with_reason():
    single = alpha_hill([3.0])
    assert math.isnan(single.alpha) and single.n == 1 and "at least 2" in single.reason
    flat = alpha_hill(np.ones(50))
    assert math.isnan(flat.alpha) and "equal" in flat.reason
    low_rank = alpha_hill(np.r_[np.linspace(5, 1, 5), np.zeros(45)])
    assert math.isnan(low_rank.alpha) and "rank-deficient" in low_rank.reason
    assert math.isnan(alpha_hill([1.0, math.nan, 2.0]).alpha)
    assert alpha_hill(np.arange(1.0, 30.0)).reason is None
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(LLMProbeError):
            alpha_hill(np.arange(1.0, 30.0), bad)


# ----------------------------------------------------------------------------- power law


def fit_at_xmin(x_sorted, xmin):
    """Plain-Python continuous MLE and KS distance for one xmin: (alpha, D, n_tail), or None."""
    tail = [v for v in x_sorted if v >= xmin]
    n = len(tail)
    log_sum = 0.0
    for v in tail:
        log_sum += math.log(v / xmin)
    if log_sum <= 0:
        return None
    alpha = 1.0 + n / log_sum
    distance = 0.0
    for i, v in enumerate(tail, start=1):
        model_cdf = 1.0 - (v / xmin) ** (1.0 - alpha)
        distance = max(distance, i / n - model_cdf, model_cdf - (i - 1) / n)
    return alpha, distance, n


def powerlaw_reference(values, candidates=None, min_tail=10):
    """Brute-force Clauset scan: every distinct value (or each given candidate) as xmin, tail >=
    min_tail, smallest D wins (first among ties). Returns (alpha, xmin, D, n_tail)."""
    x = sorted(float(v) for v in values if v > 0)
    best = None
    for xmin in sorted(set(x) if candidates is None else set(candidates)):
        result = fit_at_xmin(x, xmin)
        if result is None or result[2] < min_tail:
            continue
        alpha, distance, n = result
        if best is None or distance < best[2]:
            best = (alpha, xmin, distance, n)
    return best


@pytest.mark.parametrize("force_pruning", [False, True])
def test_powerlaw_fit_matches_brute_force(force_pruning, monkeypatch):
    if force_pruning:  # small blocks send a small input through the branch-and-bound path
        monkeypatch.setattr(spectral, "_KS_CANDIDATE_BLOCK_ELEMENTS", 1 << 10)
        monkeypatch.setattr(spectral, "_KS_EXACT_CHUNK", 8)
    rng = np.random.default_rng(10)
    body = rng.uniform(0.1, 1.0, 150)  # a non-power-law bulk below the tail
    tail = rng.pareto(2.0, 250) + 1.0  # density ∝ x^-3
    sample = np.r_[body, tail]
    fit = powerlaw_fit(torch.from_numpy(sample))
    alpha, xmin, distance, n_tail = powerlaw_reference(sample)
    assert fit.xmin == xmin
    assert fit.n_tail == n_tail
    assert fit.alpha == pytest.approx(alpha, rel=1e-12)
    assert fit.D_ks == pytest.approx(distance, rel=1e-10, abs=1e-13)
    assert fit.sigma == pytest.approx((alpha - 1) / math.sqrt(n_tail), rel=1e-12)
    assert fit.reason is None


def test_powerlaw_fit_recovers_known_alpha():
    rng = np.random.default_rng(11)
    true_alpha = 2.5
    sample = rng.pareto(true_alpha - 1.0, 5000) + 1.0  # classical Pareto, xmin = 1
    fit = powerlaw_fit(sample)
    assert abs(fit.alpha - true_alpha) < 4 * fit.sigma + 0.05
    assert 1.0 <= fit.xmin < 2.0
    assert fit.D_ks < 0.03


def test_powerlaw_fit_with_candidates_and_degenerate_input():
    rng = np.random.default_rng(12)
    sample = rng.pareto(1.5, 400) + 1.0
    candidates = np.quantile(sample, [0.0, 0.2, 0.5])
    fit = powerlaw_fit(sample, xmin_candidates=candidates)
    assert fit.xmin in candidates
    alpha, xmin, distance, n_tail = powerlaw_reference(sample, candidates=candidates)
    assert (fit.xmin, fit.n_tail) == (xmin, n_tail)
    assert fit.alpha == pytest.approx(alpha, rel=1e-12)
    assert fit.D_ks == pytest.approx(distance, rel=1e-10)
    few = powerlaw_fit([1.0, 2.0, 3.0])
    assert math.isnan(few.alpha) and "at least" in few.reason
    constant = powerlaw_fit(np.ones(40))
    assert math.isnan(constant.alpha) and constant.reason
    with pytest.raises(LLMProbeError):
        powerlaw_fit(sample, min_tail=1)


# ----------------------------------------------------------------------------- norms and ranks


def test_ranks_and_norms_match_numpy_and_scipy():
    true_sigma = np.r_[np.linspace(10.0, 1.0, 12), np.full(4, 1e-8)]
    A = matrix_with_singular_values(25, 40, true_sigma, seed=13)
    sigma, _ = singular_values(torch.from_numpy(A), need_small=True)
    reference = np.linalg.svd(A, compute_uv=False)
    for rtol in (1e-6, 1e-10, 0.5):
        tol = rtol * reference[0]
        assert numerical_rank(sigma, rtol) == np.linalg.matrix_rank(A, tol=tol)
    assert numerical_rank(sigma, 1e-6) == 12
    squares = reference**2
    for energy in (0.5, 0.9, 0.99, 1.0):
        r = 0
        while r < squares.size and squares[: r + 1].sum() < energy * squares.sum() * (1 - 1e-15):
            r += 1
        assert energy_rank(sigma, energy) == r + 1
    expected_effective = math.exp(scipy.stats.entropy(reference))  # scipy normalizes σ to p
    assert effective_rank(sigma) == pytest.approx(expected_effective, rel=1e-10)
    lam = sigma**2
    fro, two = np.linalg.norm(A, "fro"), np.linalg.norm(A, 2)
    assert stable_rank(lam) == pytest.approx(fro**2 / two**2, rel=1e-10)
    assert spectral_norm(sigma) == pytest.approx(two, rel=1e-12)
    assert frobenius_norm(sigma) == pytest.approx(fro, rel=1e-12)
    assert log_spectral_norm(lam) == pytest.approx(math.log10(two**2), rel=1e-12)
    assert log_norm(lam) == pytest.approx(math.log10(fro**2), rel=1e-12)
    assert alpha_weighted(2.0, 100.0) == pytest.approx(4.0)


def test_rank_edge_cases_and_errors():
    zeros = np.zeros(5)
    assert numerical_rank(zeros) == 0 and energy_rank(zeros) == 0 and effective_rank(zeros) == 0.0
    assert math.isnan(stable_rank(zeros))
    assert effective_rank(np.ones(7)) == pytest.approx(7.0)
    assert energy_rank([3.0, 0.0, 0.0], 1.0) == 1
    for bad in (0.0, 1.5, -1.0):
        with pytest.raises(LLMProbeError):
            energy_rank([1.0, 2.0], bad)
    with pytest.raises(LLMProbeError):
        numerical_rank([1.0], -1.0)
    broken = [2.0, math.nan, 1.0]
    for rank in (numerical_rank(broken), energy_rank(broken), effective_rank(broken), stable_rank(broken)):
        assert math.isnan(rank)
    with pytest.raises(LLMProbeError):
        effective_rank(np.ones((2, 2)))


def test_summarize_is_consistent_with_the_estimators():
    rng = np.random.default_rng(14)
    W = torch.from_numpy(rng.standard_normal((60, 100)) * np.linspace(0.1, 3, 100))
    sigma, _ = singular_values(W)
    lam = sigma**2
    hill = summarize(sigma, k_frac=0.2, rank_rtol=1e-3, energy=0.8, fit="hill")
    law = summarize(sigma, fit="powerlaw")
    both = summarize(sigma, fit="both")
    assert hill.keys() == law.keys() == both.keys()
    assert hill["alpha"] == alpha_hill(lam, 0.2).alpha and hill["k_used"] == 12 and hill["n_eigs"] == 60
    assert hill["alpha_weighted"] == pytest.approx(hill["alpha"] * math.log10(lam[0].item()))
    assert hill["numerical_rank"] == numerical_rank(sigma, 1e-3)
    assert hill["energy_rank"] == energy_rank(sigma, 0.8)
    assert hill["energy_rank_ratio"] == hill["energy_rank"] / 60
    assert hill["stable_rank"] == stable_rank(lam) and hill["effective_rank"] == effective_rank(sigma)
    assert hill["xmin"] is None and hill["D_ks"] is None
    fit = powerlaw_fit(lam)
    assert law["alpha"] == fit.alpha and law["xmin"] == fit.xmin and law["k_used"] is None
    assert both["alpha"] == both["alpha_hill"] and both["alpha_powerlaw"] == fit.alpha
    with pytest.raises(LLMProbeError):
        summarize(sigma, fit="mle")


def test_small_matrices_take_one_blas_thread_and_large_ones_keep_theirs():
    from threadpoolctl import threadpool_info

    from llmprobe.core.spectral import SINGLE_THREAD_MAX_SIDE, _blas_threads_for

    def blas_threads():
        return {info["filepath"]: info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"}

    before = blas_threads()
    with _blas_threads_for((49152, 576)):
        assert set(blas_threads().values()) <= {1}
    assert blas_threads() == before  # restored
    with _blas_threads_for((SINGLE_THREAD_MAX_SIDE + 1, SINGLE_THREAD_MAX_SIDE + 1)):
        assert blas_threads() == before


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("scale", [1.0, 1e-12, 0.0])
def test_symmetric_eigenvalues_equal_scipy_syev_bit_for_bit(dtype, scale):
    """sytrd (optimal workspace) + sterf is what syev does for eigenvalues: the same bits; a
    matrix outside syev's no-rescaling range (1e-12² in fp32) goes through eigh itself."""
    from scipy.linalg import blas, eigh

    from llmprobe.core.spectral import _symmetric_eigenvalues

    rng = np.random.default_rng(7)
    for n in (2, 9, 130):
        W = (rng.standard_normal((n, n + 5)) * scale).astype(dtype)
        gram = (blas.ssyrk if dtype == np.float32 else blas.dsyrk)(1.0, W.T, trans=1, lower=1)
        expected = eigh(gram.copy(), lower=True, eigvals_only=True, driver="ev", check_finite=False)
        assert np.array_equal(_symmetric_eigenvalues(gram), expected)


@pytest.mark.parametrize("dtype", ["fp32", "fp64"])
def test_array_singular_values_are_the_batched_cpu_bits(dtype):
    """The torch-free entry point: the same σ, bit for bit, as singular_values_batched on the CPU
    (mixed shapes, a NaN matrix, an empty one, a tall one above the one-thread size)."""
    generator = torch.Generator().manual_seed(3)
    matrices = [torch.randn(shape, generator=generator) for shape in ((7, 5), (5, 7), (12, 12), (1100, 6))]
    matrices.append(torch.full((4, 3), float("nan")))
    matrices.append(torch.zeros(0, 3))
    want = spectral.singular_values_batched(matrices, dtype=dtype, device="cpu", method="gram")
    got = spectral.array_singular_values([m.numpy() for m in matrices], dtype=dtype)
    for (sigma, method), (expected, expected_method) in zip(got, want):
        assert method == expected_method and sigma.dtype == np.float64
        np.testing.assert_array_equal(sigma, expected.numpy())


def test_all_finite_on_arrays_and_tensors():
    for values in ([1.0, 2.0], [3e38, 3e38], [1.0, float("inf")], [float("nan"), 1.0]):
        array = np.array(values, dtype=np.float32)
        assert spectral.all_finite(array) == spectral.all_finite(torch.from_numpy(array)) == bool(
            np.isfinite(array).all())
    assert spectral.all_finite(np.array([1, 2])) and spectral.all_finite(np.zeros(0, dtype=np.float32))
