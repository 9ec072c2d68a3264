"""Weight patches and hooks always undo themselves; bit flips equal a flip done by hand."""

import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmprobe.core.errors import LLMProbeError
from llmprobe.core.interventions import Patch, bit_role, forward_hooks, patched_weights
from llmprobe.core.readouts import (
    kl_from_logprobs,
    next_token_kl,
    nll_from_logprobs,
    nll_sum,
    token_nll,
    top1_agreement,
)


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _bitwise_equal(a, b):
    return all(torch.equal(a[k].view(torch.uint8) if a[k].dtype != torch.bfloat16 else a[k].view(torch.int16),
                           b[k].view(torch.uint8) if b[k].dtype != torch.bfloat16 else b[k].view(torch.int16))
               for k in a)


@pytest.mark.parametrize("patch", [
    Patch("0.weight", "zero"), Patch("0.weight", "zero", index=(1, 2)), Patch("0.bias", "set", value=7.0),
    Patch("2.weight", "scale", value=0.5), Patch("2.weight", "add", value=torch.ones(2, 3)),
    Patch("0.weight", "mask", value=torch.rand(3, 4) > 0.5), Patch("0.weight", "flip_bit", index=(0, 0), value=30),
    Patch("0.weight", "apply", value=lambda w: w.neg()),
])
def test_patches_restore_bitwise_after_an_exception(patch):
    model = _net()
    before = _state(model)
    with pytest.raises(RuntimeError, match="boom"):
        with patched_weights(model, [patch]):
            assert not _bitwise_equal(before, _state(model))
            raise RuntimeError("boom")
    assert _bitwise_equal(before, _state(model))


def test_overlapping_patches_restore_in_reverse_order():
    model = _net()
    before = _state(model)
    with patched_weights(model, [Patch("0.weight", "scale", value=2.0), Patch("0.weight", "zero", index=(0,)),
                                 Patch("0.weight", "add", value=1.0)]):
        assert torch.all(model[0].weight[0] == 1.0)
    assert _bitwise_equal(before, _state(model))


@pytest.mark.parametrize("dtype,fmt,width", [(torch.float32, "<f", 32), (torch.float16, "<e", 16)])
def test_bit_flip_equals_struct_flip(dtype, fmt, width):
    model = torch.nn.Linear(3, 2).to(dtype)
    for bit in range(width):
        value = float(model.weight[1, 2])
        raw = int.from_bytes(struct.pack(fmt, value), "little") ^ (1 << bit)
        expected = struct.unpack(fmt, raw.to_bytes(width // 8, "little"))[0]
        with patched_weights(model, [Patch("weight", "flip_bit", index=(1, 2), value=bit)]):
            got = float(model.weight[1, 2])
        assert (np.isnan(got) and np.isnan(expected)) or got == expected
        assert float(model.weight[1, 2]) == value


def test_bf16_bit_flip_and_roles():
    w = torch.nn.Linear(2, 2).to(torch.bfloat16)
    value = w.weight[0, 0].clone()
    with patched_weights(w, [Patch("weight", "flip_bit", index=(0, 0), value=15)]):
        assert float(w.weight[0, 0]) == -float(value)
    assert bit_role(torch.bfloat16, 15) == "sign" and bit_role(torch.bfloat16, 7) == "exponent"
    assert bit_role(torch.bfloat16, 6) == "mantissa" and bit_role(torch.float16, 10) == "exponent"
    with pytest.raises(LLMProbeError, match="outside"):
        bit_role(torch.float16, 16)


def test_unknown_parameter_restores_what_was_applied():
    model = _net()
    before = _state(model)
    with pytest.raises(LLMProbeError, match="no parameter"):
        with patched_weights(model, [Patch("0.weight", "zero"), Patch("nope", "zero")]):
            pass
    assert _bitwise_equal(before, _state(model))


def test_hooks_modify_and_are_removed_after_an_exception():
    model = _net()
    x = torch.randn(5, 4)
    clean = model(x)
    with pytest.raises(RuntimeError):
        with forward_hooks(model, {"1": lambda mod, inp, out: torch.zeros_like(out)}):
            assert torch.all(model(x) == model[2].bias)
            raise RuntimeError("boom")
    assert not model[1]._forward_hooks
    assert torch.equal(model(x), clean)


def test_readouts_against_plain_loops():
    torch.manual_seed(1)
    logits, other = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    nll = token_nll(logits, ids)
    for b in range(2):
        for t in range(4):
            ref = -float(torch.log_softmax(logits[b, t].double(), -1)[ids[b, t + 1]])
            assert abs(float(nll[b, t]) - ref) < 1e-5
    total, count = nll_sum(logits, ids, n_scored=[2, 4])
    assert count == 6 and abs(total - float(nll[0, 2:].sum() + nll[1].sum())) < 1e-4
    kl = next_token_kl(logits, other)
    ref_kl = F.kl_div(F.log_softmax(other, -1), F.log_softmax(logits, -1), log_target=True, reduction="none").sum(-1)
    assert torch.allclose(kl, ref_kl, atol=1e-5)
    assert torch.all(top1_agreement(logits, logits) == 1)
    # the forms that reuse log-probabilities give the same numbers, bit for bit
    other_lp, ref_lp = torch.log_softmax(logits[:, :-1], -1), torch.log_softmax(other[:, :-1], -1)
    assert torch.equal(nll_from_logprobs(other_lp, ids), nll)
    assert torch.equal(kl_from_logprobs(ref_lp, other_lp), next_token_kl(other[:, :-1], logits[:, :-1]))
    assert torch.equal(kl_from_logprobs(ref_lp, other_lp, ref_lp.exp()), kl_from_logprobs(ref_lp, other_lp))
