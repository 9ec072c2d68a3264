"""The orthonormal Hadamard transform: scipy's Sylvester matrix for powers of two, orthonormal
matrices from Paley constructions for the other supported sizes, refusal for the rest."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from llmprobe.core.errors import LLMProbeError
from llmprobe.core.hadamard import can_build, hadamard_matrix, hadamard_transform, plan_for

torch.set_num_threads(1)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 32, 64, 256, 1024])
def test_power_of_two_equals_scipy_sylvester(n):
    x = torch.randn(5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    reference = x.numpy() @ (scipy.linalg.hadamard(n) / math.sqrt(n)).T
    np.testing.assert_allclose(hadamard_transform(x).numpy(), reference, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [12, 20, 24, 28, 36, 44, 48, 576, 1536])
def test_non_power_of_two_is_orthonormal_hadamard(n):
    matrix = hadamard_matrix(n).numpy()
    np.testing.assert_allclose(matrix @ matrix.T, np.eye(n), atol=1e-12)
    # A Hadamard matrix: every entry is ±1/sqrt(n).
    np.testing.assert_allclose(np.abs(matrix), np.full((n, n), 1 / math.sqrt(n)), rtol=1e-12)


@pytest.mark.parametrize("n", [64, 576, 1536])
def test_transform_is_x_times_h_transpose_and_keeps_norms(n):
    x = torch.randn(7, 3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = hadamard_transform(x)
    assert y.shape == x.shape
    np.testing.assert_allclose(y.numpy(), x.numpy() @ hadamard_matrix(n).numpy().T, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(y.norm(dim=-1).numpy(), x.norm(dim=-1).numpy(), rtol=1e-12)
    # Orthonormal and symmetric up to ordering is not assumed; applying H then H^T restores x.
    back = y @ hadamard_matrix(n)
    np.testing.assert_allclose(back.numpy(), x.numpy(), atol=1e-10)


def test_embedded_model_sizes_use_small_dense_blocks():
    # 576 = 36 · 16 (Paley II, q = 17), 1536 = 12 · 128 (Paley I, q = 11): the dense part stays small.
    assert (plan_for(576).dense_order, plan_for(576).fast_order) == (36, 16)
    assert (plan_for(1536).dense_order, plan_for(1536).fast_order) == (12, 128)


def test_fp32_and_half_inputs_keep_their_dtype():
    x = torch.randn(4, 576)
    assert hadamard_transform(x).dtype == torch.float32
    y = hadamard_transform(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    np.testing.assert_allclose(y.float().numpy(), hadamard_transform(x.to(torch.bfloat16).float()).numpy(),
                               rtol=1e-2, atol=1e-2)


def test_matrix_is_cached():
    assert plan_for(1536) is plan_for(1536)


@pytest.mark.parametrize("n", [3, 6, 10, 18, 92, 100])
def test_sizes_without_a_construction_are_refused(n):
    # 3, 6, 10, 18: no Hadamard matrix exists (n must be 1, 2 or a multiple of 4). 92 and 100 exist
    # but need constructions (Williamson, Paley II over GF(49)) this module does not implement.
    assert not can_build(n)
    with pytest.raises(LLMProbeError, match=str(n)):
        hadamard_transform(torch.zeros(2, n))
