"""Interventions: modify a model for the length of a ``with`` block and always undo it.

* :func:`patched_weights` changes parameters in place (zero, set, scale, add noise, flip bits,
  apply a mask, or any function) and restores every touched tensor bit for bit on exit, also when
  the block raises. Only the touched slices are saved, so a single-weight patch costs bytes.
* :func:`forward_hooks` registers forward hooks that may *modify* a module's output (return a
  value) and removes them on exit, exceptions included.

Both are plain context managers; nothing else in the package patches weights or leaves hooks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import LLMProbeError

# Integer views used to flip bits: same width as the float dtype.
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
             torch.float64: torch.int64}
# Bit layout per stored dtype: (exponent bits, mantissa bits); the sign is the top bit.
BIT_LAYOUT = {torch.float32: (8, 23), torch.float16: (5, 10), torch.bfloat16: (8, 7), torch.float64: (11, 52)}


def bit_role(dtype: torch.dtype, bit: int) -> str:
    """'sign', 'exponent' or 'mantissa' for bit index ``bit`` (0 = least significant) of ``dtype``."""
    exponent, mantissa = BIT_LAYOUT[dtype]
    if bit < 0 or bit > exponent + mantissa:
        raise LLMProbeError(f"bit {bit} is outside {str(dtype).replace('torch.', '')} "
                            f"(bits 0-{exponent + mantissa})")
    if bit == exponent + mantissa:
        return "sign"
    return "exponent" if bit >= mantissa else "mantissa"


@dataclass
class Patch:
    """One change to one parameter.

    ``op``: 'zero' | 'set' | 'scale' | 'add' | 'mask' | 'flip_bit' | 'apply'.
    ``index``: anything torch indexing takes (None: the whole tensor).
    ``value``: the number or tensor for set/scale/add; the keep-mask (bool/0-1) for mask; the bit
    index for flip_bit; a function ``tensor -> tensor`` for apply (given the selected slice).
    """

    name: str
    op: str
    index: Any = None
    value: Any = None


@dataclass
class _Saved:
    param: torch.Tensor
    index: Any
    data: torch.Tensor = field(repr=False)


def _select(param: torch.Tensor, index: Any) -> torch.Tensor:
    return param.data if index is None else param.data[index]


def _write(param: torch.Tensor, index: Any, value: torch.Tensor) -> None:
    if index is None:
        param.data.copy_(value)
    else:
        param.data[index] = value


def _apply(param: torch.Tensor, patch: Patch) -> None:
    current = _select(param, patch.index)
    op = patch.op
    if op == "zero":
        new = torch.zeros_like(current)
    elif op == "set":
        new = torch.as_tensor(patch.value, dtype=current.dtype, device=current.device).expand_as(current)
    elif op == "scale":
        new = current * torch.as_tensor(patch.value, dtype=current.dtype, device=current.device)
    elif op == "add":
        new = current + torch.as_tensor(patch.value, dtype=current.dtype, device=current.device)
    elif op == "mask":
        keep = torch.as_tensor(patch.value, device=current.device).to(torch.bool)
        new = torch.where(keep, current, torch.zeros_like(current))
    elif op == "flip_bit":
        if current.dtype not in _INT_VIEW:
            raise LLMProbeError(f"cannot flip bits of {patch.name}: stored as {current.dtype}")
        bit = int(patch.value)
        bit_role(current.dtype, bit)
        int_dtype = _INT_VIEW[current.dtype]
        width = torch.iinfo(int_dtype).bits
        # the top bit of a signed integer view is its sign: XOR with the most negative value
        mask = torch.tensor(-(1 << (width - 1)) if bit == width - 1 else (1 << bit), dtype=int_dtype)
        new = (current.contiguous().view(int_dtype) ^ mask.to(current.device)).view(current.dtype)
    elif op == "apply":
        new = patch.value(current.clone())
    else:
        raise LLMProbeError(f"unknown weight patch operation '{op}'")
    _write(param, patch.index, new)


def parameter(model: torch.nn.Module, name: str) -> torch.Tensor:
    """The parameter called ``name`` (``model.layers.0.mlp.down_proj.weight``; ``.weight`` may be left off)."""
    params = dict(model.named_parameters())
    for key in (name, f"{name}.weight"):
        if key in params:
            return params[key]
    raise LLMProbeError(f"no parameter '{name}' in the model")


@contextlib.contextmanager
def patched_weights(model: torch.nn.Module, patches: Sequence[Patch]) -> Iterator[list[Patch]]:
    """Apply ``patches`` in order; on exit restore every touched slice bit for bit (reverse order)."""
    saved: list[_Saved] = []
    try:
        with torch.no_grad():
            for patch in patches:
                param = parameter(model, patch.name)
                saved.append(_Saved(param, patch.index, _select(param, patch.index).clone()))
                _apply(param, patch)
        yield list(patches)
    finally:
        with torch.no_grad():
            for item in reversed(saved):
                _write(item.param, item.index, item.data)


HookFn = Callable[[torch.nn.Module, tuple, Any], Any]


@contextlib.contextmanager
def forward_hooks(model: torch.nn.Module, hooks: Mapping[str, HookFn] | Sequence[tuple[str, HookFn]],
                  *, pre: bool = False, with_kwargs: bool = False) -> Iterator[None]:
    """Register forward hooks (``pre=True``: forward pre-hooks) on named modules; a hook may
    return a replacement output (or input, for pre-hooks). Always removed on exit.

    ``with_kwargs=True`` passes the keyword arguments too (torch's signatures: pre-hooks get
    ``(module, args, kwargs)`` and may return ``(args, kwargs)``; hooks get
    ``(module, args, kwargs, output)``), for modules such as decoder layers that take their
    hidden states or masks by keyword."""
    modules = dict(model.named_modules())
    items = hooks.items() if isinstance(hooks, Mapping) else hooks
    handles = []
    try:
        for name, fn in items:
            if name not in modules:
                raise LLMProbeError(f"no module '{name}' in the model")
            module = modules[name]
            if pre:
                handles.append(module.register_forward_pre_hook(fn, with_kwargs=with_kwargs))
            else:
                handles.append(module.register_forward_hook(fn, with_kwargs=with_kwargs))
        yield
    finally:
        for handle in handles:
            handle.remove()
