"""Run a model one decoder block at a time (the GPTQ / SparseGPT / Wanda execution scheme).

The calibration windows are pushed through the layers *before* the first block (embeddings,
rotary tables, mask construction) where the model lives; the first block's inputs and the
keyword arguments the model hands every block (attention mask, position ids, rotary
cos/sin, ...) are captured and moved to the compute device. After that a caller moves one
block at a time to the device, runs it over the stored hidden states, and keeps its outputs
as the next block's inputs. Only one block and the calibration activations (inputs and
outputs, ``2 * windows * seqlen * hidden`` numbers) are on the device at any time, so a model
larger than the accelerator can be processed; the rest stays where it was loaded (CPU).

Architecture knowledge is limited to "the first positional argument, or ``hidden_states``,
is the hidden state, and a block returns a tensor or a tuple whose first element is one".
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import LLMProbeError
from .modulemap import ModuleMap


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass after the first block's inputs."""


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the input embedding lives (where token ids must be sent)."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embed is not None and getattr(embed, "weight", None) is not None:
        return embed.weight.device
    return next(model.parameters()).device


@dataclass
class BlockInputs:
    """Hidden states entering the current block, one tensor per batch of windows, plus the
    keyword arguments the model passes to every block (per batch size: they depend on the
    shape of a batch, never on its tokens, because windows have equal length and no padding)."""

    hidden: list[torch.Tensor]
    kwargs_by_batch: dict[int, dict[str, Any]] = field(default_factory=dict)

    def kwargs(self, batch: torch.Tensor) -> dict[str, Any]:
        return self.kwargs_by_batch[int(batch.shape[0])]

    @property
    def tokens(self) -> int:
        return sum(int(h.shape[0] * h.shape[1]) for h in self.hidden)


@torch.no_grad()
def capture_block_inputs(model: torch.nn.Module, mmap: ModuleMap, windows: torch.Tensor, device: torch.device,
                         batch_size: int = 8, dtype: torch.dtype | None = None) -> BlockInputs:
    """Inputs of block 0 for ``windows`` ([N, L] ids), stored on ``device`` (in ``dtype``,
    default the model's)."""
    if not mmap.blocks:
        raise LLMProbeError("this model has no decoder blocks to process one at a time")
    if batch_size <= 0:
        raise LLMProbeError(f"--batch-size must be positive; got {batch_size}")
    first = mmap.blocks[0]
    ids_device = model_device(model)
    captured = BlockInputs(hidden=[])

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        # The cache object would keep keys/values alive across blocks: never hand one on.
        for key in ("past_key_value", "past_key_values", "cache", "layer_past"):
            if key in rest:
                rest[key] = None
        if "use_cache" in rest:
            rest["use_cache"] = False
        captured.hidden.append(hidden.detach().to(device=device, dtype=dtype or hidden.dtype))
        captured.kwargs_by_batch.setdefault(int(hidden.shape[0]), _to(rest, device))
        raise _Captured

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start:start + batch_size].to(ids_device)
            try:
                model(input_ids=batch, use_cache=False)
            except _Captured:
                continue
            raise LLMProbeError("could not capture the first decoder block's inputs (block never ran)")
    finally:
        handle.remove()
    return captured


def block_output(output: Any) -> torch.Tensor:
    """The hidden state a block returns (a tensor, or the first element of a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def run_block(block: torch.nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
    """The block's outputs for every stored batch (same device and dtype as its inputs)."""
    outputs = []
    for hidden in inputs.hidden:
        out = block_output(block(hidden, **inputs.kwargs(hidden)))
        outputs.append(out.to(hidden.dtype))
    return outputs


@contextlib.contextmanager
def on_device(module: torch.nn.Module, device: torch.device) -> Iterator[torch.nn.Module]:
    """Move ``module`` to ``device`` for the ``with`` block and back to where it was.

    Parameters are moved with ``.to`` (in place on the module), so tensors shared with other
    modules (tied weights inside one block) stay shared."""
    home = next(module.parameters()).device
    if home == device:
        yield module
        return
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)


def batches_of(windows: torch.Tensor, batch_size: int) -> Sequence[torch.Tensor]:
    return [windows[i:i + batch_size] for i in range(0, windows.shape[0], batch_size)]
