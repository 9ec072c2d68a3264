"""The one-pass CPU kernels (core/kernels.py) against plain references, and the collectors'
compiled path against their torch path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from llmprobe.analyses.activation_quant import QuantSpec, _QuantErrorCollector
from llmprobe.core import kernels
from llmprobe.core.collect import Batch, Workspace
from llmprobe.core.collectors import ChannelCollector, MomentCollector
from llmprobe.core.quant import fake_quant_int

pytestmark = pytest.mark.skipif(not kernels.AVAILABLE, reason="numba is not installed")


def _activation(rows: int, features: int, offset: float = 0.0, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # heavy-tailed, like real activations, with a constant offset to test the shift
    return (torch.randn(rows, features, generator=generator) ** 3 * 0.7 + offset).float()


@pytest.mark.parametrize("offset", [0.0, 2.5, 3e4])
@pytest.mark.parametrize("features", [1, 7, 64, 193])
def test_activation_stats_match_plain_references(offset, features):
    x = _activation(9, features, offset)
    x[7] += 40.0  # windows of different means: each is shifted by its own
    starts = [0, 4, 7]  # windows of rows 0-3, 4-6 and 7-8
    stats = kernels.activation_stats(x, starts, int_bits=(4, 8))
    values = x.double().numpy()
    bounds = starts + [9]
    for window in range(3):
        part = values[bounds[window]:bounds[window + 1]]
        shift = stats.window_sums[window, 0]
        assert shift == pytest.approx(part.mean(), rel=1e-13, abs=1e-13)
        d = part - shift
        expected = [d.sum(), (d ** 2).sum(), (d ** 3).sum(), (d ** 4).sum()]
        np.testing.assert_allclose(stats.window_sums[window, 1:], expected, rtol=1e-12,
                                   atol=1e-12 * np.abs(d).max() ** 4 * d.size)
    np.testing.assert_allclose(stats.row_sum_sq, (values ** 2).sum(axis=1), rtol=1e-13)
    np.testing.assert_allclose(stats.column_sum_sq, (values ** 2).sum(axis=0), rtol=1e-13)
    assert np.array_equal(stats.row_abs_max, x.abs().amax(dim=1).numpy())
    assert np.array_equal(stats.column_abs_max, x.abs().amax(dim=0).numpy())
    for bits in (4, 8):
        error = (fake_quant_int(x, bits, granularity="per-token") - x).double().numpy()
        np.testing.assert_allclose(stats.row_int_sse[bits], (error ** 2).sum(axis=1), rtol=1e-12)


def test_nan_and_inf_reach_every_statistic_as_torch_has_them():
    x = _activation(6, 5)
    x[1, 2] = float("inf")
    x[4, 0] = float("nan")
    x[4, 3] = float("inf")  # NaN and inf in one row and one column: NaN wins, as in torch.amax
    x[2, 0] = float("-inf")
    stats = kernels.activation_stats(x, [0, 2])
    assert np.array_equal(stats.row_abs_max, x.abs().amax(dim=1).numpy(), equal_nan=True)
    assert np.array_equal(stats.column_abs_max, x.abs().amax(dim=0).numpy(), equal_nan=True)
    assert math.isnan(stats.row_abs_max[4]) and math.isnan(stats.column_abs_max[0])
    assert math.isinf(stats.row_abs_max[1]) and math.isinf(stats.column_abs_max[2])
    # a window whose mean is not finite is not shifted (callers take their torch path for it)
    assert stats.window_sums[0, 0] == 0.0
    assert not np.isfinite(stats.window_sums[0, 1:]).all()


def test_a_window_with_nan_or_inf_gets_no_shift():
    x = _activation(4, 5)
    x[1, 2] = float("inf")
    stats = kernels.activation_stats(x, [0, 2])
    assert stats.window_sums[0, 0] == 0.0  # its sums are not finite: callers take their torch path
    assert stats.window_sums[1, 0] == pytest.approx(x[2:].double().mean().item(), rel=1e-13)


def test_compiled_kernel_equals_its_python_source():
    x = _activation(5, 33, 1.0)
    compiled = kernels.activation_stats(x, [0, 2], int_bits=(4,))
    plain_function = kernels._activation_stats
    kernels.AVAILABLE, available = False, kernels.AVAILABLE
    try:
        plain = kernels.activation_stats(x, [0, 2], int_bits=(4,))
    finally:
        kernels.AVAILABLE = available
    assert kernels._activation_stats is plain_function
    # Σd is a sum of rounding noise about the mean: compared on the scale of the values
    np.testing.assert_allclose(compiled.window_sums, plain.window_sums, rtol=1e-13, atol=1e-12)
    for name in ("row_sum_sq", "column_sum_sq"):
        np.testing.assert_allclose(getattr(compiled, name), getattr(plain, name), rtol=1e-13)
    for name in ("row_abs_max", "column_abs_max"):
        assert np.array_equal(getattr(compiled, name), getattr(plain, name))
    np.testing.assert_allclose(compiled.row_int_sse[4], plain.row_int_sse[4], rtol=1e-13)


def test_int_errors_match_fake_quant_int():
    bits = (2, 3, 4, 8)
    x = _activation(12, 50, seed=7)
    x[3] = 0.0  # an all-zero row: quantizes to itself
    x[5, 7] = float("nan")
    x[6, 2] = float("inf")
    stats = kernels.activation_stats(x, [0], int_bits=bits)
    for width in bits:
        got = stats.row_int_sse[width]
        error = (fake_quant_int(x, width, granularity="per-token") - x).double().numpy()
        expected = (error ** 2).sum(axis=1)  # the same fp32 errors, squared and summed in fp64
        np.testing.assert_allclose(got, expected, rtol=1e-12)
        assert got[3] == 0.0 and math.isnan(got[5]) and math.isnan(got[6])


def test_kernels_refuse_what_they_were_not_written_for():
    with pytest.raises(ValueError, match="fp32"):
        kernels.activation_stats(torch.zeros(2, 3, dtype=torch.float64), [0])
    with pytest.raises(ValueError, match="2-D"):
        kernels.activation_stats(torch.zeros(6), [0])


def _batch(x: torch.Tensor, windows: list[int], int_error_bits: tuple[int, ...] = ()) -> Batch:
    window = torch.tensor(windows)
    return Batch(x=x, token_ids=torch.arange(len(windows)), window=window, position=torch.arange(len(windows)),
                 workspace=Workspace(), int_error_bits=int_error_bits)


def _collect(x: torch.Tensor, windows: list[int]):
    moments, channels = MomentCollector(), ChannelCollector()
    quant = _QuantErrorCollector(QuantSpec("int4", "per-token"))
    batch = _batch(x, windows, quant.int_error_bits)
    for collector in (moments, channels, quant):
        collector.update("key", batch)
    return moments.result("key"), channels.result("key"), quant


def test_compiled_and_torch_paths_agree_and_match_scipy(monkeypatch):
    # two windows with very different means in one batch: each is shifted by its own mean
    x = torch.cat([_activation(6, 40, 0.0, seed=1), _activation(5, 40, 5e3, seed=2)])
    windows = [0] * 6 + [1] * 5
    fast = _collect(x, windows)
    monkeypatch.setattr(kernels, "AVAILABLE", False)
    slow = _collect(x, windows)
    values = x.double().numpy()
    for result in (fast, slow):
        moments, channels, quant = result
        assert moments.kurtosis_pooled == pytest.approx(scipy.stats.kurtosis(values.ravel(), bias=True), rel=1e-9)
        per_window = [scipy.stats.kurtosis(values[:6].ravel(), bias=True),
                      scipy.stats.kurtosis(values[6:].ravel(), bias=True)]
        assert moments.kurtosis_window_mean == pytest.approx(np.mean(per_window), rel=1e-9)
        assert moments.skewness == pytest.approx(scipy.stats.skew(values.ravel()), rel=1e-9)
        assert moments.mean == pytest.approx(values.mean(), rel=1e-12)
        np.testing.assert_allclose(channels.sum_sq.numpy(), (values ** 2).sum(axis=0), rtol=1e-6)
        assert quant.signal["key"] == pytest.approx((values ** 2).sum(), rel=1e-6)
        error = (fake_quant_int(x, 4, granularity="per-token") - x).double().numpy()
        assert quant.sse["key"] == pytest.approx((error ** 2).sum(), rel=1e-6)
    assert fast[0].abs_max == slow[0].abs_max
    assert torch.equal(fast[1].abs_max, slow[1].abs_max)


def test_int_errors_not_announced_get_a_pass_of_their_own():
    x = _activation(6, 16, seed=3)
    announced = _batch(x, [0] * 6, int_error_bits=(4,)).row_int_error_sse(4)
    late = _batch(x, [0] * 6).row_int_error_sse(4)
    assert torch.equal(announced, late)
    assert _QuantErrorCollector(QuantSpec("int4", "per-token")).int_error_bits == (4,)
    assert _QuantErrorCollector(QuantSpec("int4", "per-tensor")).int_error_bits == ()
    assert _QuantErrorCollector(QuantSpec("int4", "per-token", symmetric=False)).int_error_bits == ()


def test_compiled_path_keeps_nan_and_inf_semantics(monkeypatch):
    x = _activation(4, 8)
    x[1, 2] = float("inf")
    fast = _collect(x, [0, 0, 1, 1])[0]
    monkeypatch.setattr(kernels, "AVAILABLE", False)
    slow = _collect(x, [0, 0, 1, 1])[0]
    for result in (fast, slow):
        assert math.isinf(result.abs_max) and math.isnan(result.kurtosis_pooled)
    # the window without inf keeps its kurtosis; merging it with the inf window leaves no mean
    assert fast.kurtosis_window_mean == pytest.approx(slow.kurtosis_window_mean, rel=1e-12)
    assert fast.windows_without_spread == slow.windows_without_spread == 1
    assert math.isnan(fast.mean) and math.isnan(slow.mean)


def test_kernels_work_without_a_writable_cache_location(monkeypatch):
    """A read-only install with no writable home: numba finds nowhere to cache; the kernels are
    then compiled in the process instead of failing."""
    from numba.core import caching

    monkeypatch.setattr(caching.CacheImpl, "_locator_classes", [])
    monkeypatch.setattr(kernels, "_COMPILED", {})
    x = _activation(3, 5)
    stats = kernels.activation_stats(x, [0])
    np.testing.assert_allclose(stats.column_sum_sq, (x.double().numpy() ** 2).sum(axis=0), rtol=1e-13)
