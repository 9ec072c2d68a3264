"""A modified model read out against the unmodified one: the readout that robustness analyses and
the measured quant-plan metrics share.

:class:`Reference` runs the unmodified model once over the evaluation windows and keeps, per
window, only what later comparisons need:

* the summed next-token NLL (for Δppl) — a float;
* the unmodified log-probabilities (fp32) and their argmax only when all windows' logits fit in
  ``logits_cache_mb`` (default 256 MiB: e.g. 2 windows × 64 tokens of a 49k vocabulary);
  otherwise the input of the output head (``[L, hidden]``), so the unmodified logits of a window
  are *recomputed* by one head matmul whenever a modified run of that window needs them (KL,
  top-1). Either way memory is bounded whatever the vocabulary; recomputing costs one extra head
  matmul per window and target. Models whose logits are not just ``head(input)`` (logit
  soft-capping, say) are detected on the first window and then get their unmodified logits from
  a full unmodified forward instead (correct, twice the cost). ``ReferenceInfo.reference_logits``
  says which of "cached", "head" or "forward" a run used;
* optionally (``prefix_cache``), the hidden states entering every decoder block and the extra
  arguments the blocks were called with (rotary embeddings, masks, captured with a forward
  pre-hook), so a modification whose first effect is in block ℓ reruns blocks ℓ…end only.
  This costs ``windows × seqlen × hidden × layers`` elements of the model's dtype; when that is
  above ``cache_budget_mb`` the cache is not built and every target runs the whole model.

:meth:`Reference.evaluate` runs one modification (a factory of context managers from
``core.interventions``: the context is entered per window and undone after it) and returns a
:class:`Readout`. Loss, KL and top-1 agreement use the same positions: every position that
predicts a target (0 … L−2). Non-finite results are kept as they are and counted.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ContextManager

import torch

from . import progress
from .errors import LLMProbeError
from .interventions import forward_hooks
from .modulemap import ModuleMap, output_head
from .readouts import kl_from_logprobs, nll_from_logprobs, token_nll
from .records import Record

Modification = Callable[[], ContextManager]

# Names of the final norm applied between the last block and the output head.
_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_norm", "norm_f", "final_layernorm")


def safe_exp(value: float) -> float:
    """exp that returns inf (not OverflowError) for huge losses and keeps NaN."""
    if math.isnan(value):
        return math.nan
    return math.inf if value > 709.0 else math.exp(value)


class ReferenceInfo(Record):
    """The unmodified model on the evaluation windows (one row per run)."""

    model: str
    dataset: str
    windows: int
    seqlen: int
    tokens: int                 # scored targets: windows × (seqlen − 1)
    nll_sum: float
    mean_nll: float
    ppl: float
    prefix_cache: bool          # blocks before the first modified one are reused
    prefix_cache_mb: float      # memory held by the cached block inputs
    reference_logits: str       # "head" (recomputed from the cached head input) or "forward"


@dataclass
class Readout:
    """One modified model against the reference, over every evaluation window."""

    nll_sum: float
    tokens: int
    kl_sum: float
    agree_sum: float
    nonfinite_windows: int
    window_losses: list[float] = field(default_factory=list)

    def add(self, nll: list[float], kl: list[float], agree: list[float], tokens: int, *, row: int) -> None:
        """Fold one window's sums (row ``row`` of a scored batch) into the totals."""
        loss = nll[row]
        self.nll_sum += loss
        self.kl_sum += kl[row]
        self.agree_sum += agree[row]
        self.tokens += tokens
        self.nonfinite_windows += 0 if math.isfinite(loss) else 1
        self.window_losses.append(loss / tokens)

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.tokens

    @property
    def ppl(self) -> float:
        return safe_exp(self.mean_nll)

    @property
    def kl(self) -> float:
        return self.kl_sum / self.tokens

    @property
    def top1(self) -> float:
        return self.agree_sum / self.tokens

    def fields(self, reference: Reference) -> dict[str, Any]:
        """The readout columns every robustness table carries."""
        ppl, base = self.ppl, reference.ppl
        finite = math.isfinite(self.nll_sum) and math.isfinite(self.kl_sum)
        return dict(loss=self.mean_nll, delta_loss=self.mean_nll - reference.mean_nll, ppl=ppl,
                    delta_ppl=ppl - base, ppl_ratio=ppl / base, kl=self.kl, top1_agreement=self.top1,
                    nonfinite_windows=self.nonfinite_windows, finite=finite)


def block_output(output: Any) -> torch.Tensor:
    """Decoder layers return a tensor (transformers ≥ 5) or a tuple whose first item is it."""
    return output[0] if isinstance(output, (tuple, list)) else output


def final_norm(model: torch.nn.Module, mmap: ModuleMap) -> torch.nn.Module | None:
    """The norm between the last block and the head: a sibling of the block list."""
    parent_path = mmap.blocks_path.rpartition(".")[0]
    parent = model.get_submodule(parent_path) if parent_path else model
    for name in _FINAL_NORM_NAMES:
        module = getattr(parent, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    return None


class Reference:
    """The unmodified model's results on ``windows``, computed once (see module docstring)."""

    HEAD_TOKENS = 1024   # evaluate_in_block: rows × tokens per head product

    def __init__(self, model: torch.nn.Module, windows: Sequence[torch.Tensor], *, prefix_cache: bool = True,
                 cache_budget_mb: float = 4096.0, logits_cache_mb: float = 256.0, keep_block_outputs: bool = False,
                 logits_chunk_mb: float = 256.0):
        if not windows:
            raise LLMProbeError("no evaluation windows")
        self.model = model
        self.logits_chunk_mb = logits_chunk_mb
        self.mmap = ModuleMap(model)
        self.device = next(model.parameters()).device
        self.windows = [w.reshape(1, -1).to(self.device) for w in windows]
        self.head = output_head(model)
        self.norm = final_norm(model, self.mmap)
        blocks = self.mmap.blocks
        hidden = int(getattr(model.config, "hidden_size", 0) or 0)
        dtype_bytes = next(model.parameters()).element_size()
        tokens = sum(int(w.shape[1]) for w in self.windows)
        self.cache_mb = tokens * hidden * len(blocks) * dtype_bytes / 2**20
        want_prefix = prefix_cache and bool(blocks) and hidden > 0 and self.cache_mb <= cache_budget_mb
        self.head_inputs: list[torch.Tensor] = []
        self.block_inputs: list[list[torch.Tensor]] = []
        self.block_outputs: list[list[torch.Tensor]] = []   # only with keep_block_outputs
        self.block_args: list[list[tuple[tuple, dict]]] = []
        self.window_nll: list[float] = []
        self.window_tokens: list[int] = []
        vocab = int(getattr(model.config, "vocab_size", 0) or 0)
        self.logits_mb = tokens * vocab * 4 * 2 / 2**20   # log-probabilities and probabilities
        self.cached_logits: list[torch.Tensor] | None = [] if 0 < self.logits_mb <= logits_cache_mb else None
        self.cached_probs: list[torch.Tensor] = []
        self.cached_top1: list[torch.Tensor] = []
        self._run(want_prefix or keep_block_outputs, keep_block_outputs)
        self.nll_sum = float(sum(self.window_nll))
        self.tokens = int(sum(self.window_tokens))
        self.mean_nll = self.nll_sum / self.tokens
        self.ppl = safe_exp(self.mean_nll)
        self.head_ok = self.head is not None and self._check_head()
        self.prefix_ok = want_prefix and self.head_ok and self.norm is not None and self._check_prefix()
        self.batch_ok = self.prefix_ok and self._check_batch()
        if not self.prefix_ok and not keep_block_outputs:
            self.block_inputs, self.block_args = [], []   # free what cannot be used
        if self.cached_logits is not None:
            self.head_inputs = [] if not self.prefix_ok else self.head_inputs
            self.reference_logits_mode = "cached"
        else:
            self.reference_logits_mode = "head" if self.head_ok else "forward"
        self._logits0 = None   # only needed by the two checks above

    # -- the unmodified run -------------------------------------------------------------------

    @torch.inference_mode()
    def _run(self, capture_blocks: bool, keep_outputs: bool) -> None:
        blocks = self.mmap.blocks
        names = {id(b): n for n, b in self.model.named_modules()}
        for ids in self.windows:
            inputs: list[Any] = [None] * len(blocks)
            outputs: list[Any] = [None] * len(blocks)
            args: list[Any] = [None] * len(blocks)
            head_in: list[torch.Tensor] = []
            hooks: list[tuple[str, Callable]] = []
            pre_hooks: list[tuple[str, Callable]] = []

            def head_pre(_m, a, kw, head_in=head_in):
                head_in.append((a[0] if a else kw["input"]).detach())

            if self.head is not None:
                pre_hooks.append((names[id(self.head)], head_pre))
            if capture_blocks:
                for index, block in enumerate(blocks):
                    def block_pre(_m, a, kw, index=index, inputs=inputs, args=args):
                        if a:
                            inputs[index], rest, kwargs = a[0].detach(), tuple(a[1:]), dict(kw)
                        else:
                            kwargs = dict(kw)
                            inputs[index], rest = kwargs.pop("hidden_states").detach(), ()
                        args[index] = (rest, kwargs)

                    def block_post(_m, _a, _kw, out, index=index, outputs=outputs):
                        outputs[index] = block_output(out).detach()

                    pre_hooks.append((names[id(block)], block_pre))
                    if keep_outputs:
                        hooks.append((names[id(block)], block_post))
            with forward_hooks(self.model, pre_hooks, pre=True, with_kwargs=True), \
                    forward_hooks(self.model, hooks, with_kwargs=True):
                logits = self.model(input_ids=ids, use_cache=False).logits
            per_token = token_nll(logits, ids)
            self.window_nll.append(float(per_token.double().sum()))
            self.window_tokens.append(int(per_token.numel()))
            if head_in:
                self.head_inputs.append(head_in[0])
            if self.cached_logits is not None:
                # kept as log-probabilities with their argmax: what KL and top-1 need, computed once
                logprobs = torch.log_softmax(logits.detach().float(), dim=-1)
                self.cached_logits.append(logprobs)
                self.cached_probs.append(logprobs.exp())
                self.cached_top1.append(logprobs.argmax(dim=-1))
            if capture_blocks:
                self.block_inputs.append(inputs)
                self.block_args.append(args)
                if keep_outputs:
                    self.block_outputs.append(outputs)
            if len(self.window_nll) == 1:
                self._logits0 = logits.detach().clone()

    def _check_head(self) -> bool:
        if not self.head_inputs:
            return False
        with torch.inference_mode():
            recomputed = self.head(self.head_inputs[0])
        return recomputed.shape == self._logits0.shape and bool(torch.equal(recomputed, self._logits0))

    def _check_prefix(self) -> bool:
        """The block-by-block rerun from the middle must reproduce the unmodified logits."""
        start = len(self.mmap.blocks) // 2
        logits = self._forward_from(0, start)
        return bool(torch.allclose(logits, self._logits0, rtol=0.0, atol=1e-5 * float(self._logits0.abs().max())))

    def _check_batch(self) -> bool:
        """Blocks called with a batch of rows and one window's cached arguments (rotary tables,
        masks of batch size 1) must give each row what it gives alone: checked on two copies of
        window 0 from the middle block."""
        start = len(self.mmap.blocks) // 2
        with torch.inference_mode():
            hidden = self.block_inputs[0][start].expand(2, -1, -1).contiguous()
            try:
                for index in range(start, self.num_layers):
                    rest, kwargs = self.block_args[0][index]
                    hidden = block_output(self.mmap.blocks[index](hidden, *rest, **kwargs))
                logits = self.head(self.norm(hidden))
            except (RuntimeError, ValueError):
                return False
        tol = 1e-5 * float(self._logits0.abs().max())
        return logits.shape[0] == 2 and all(
            bool(torch.allclose(logits[i:i + 1], self._logits0, rtol=0.0, atol=tol)) for i in range(2))

    # -- evaluating a modification ------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return len(self.mmap.blocks)

    def _forward_from(self, window: int, layer: int) -> torch.Tensor:
        """Logits of window ``window`` recomputed from the cached input of block ``layer``."""
        with torch.inference_mode():
            if layer >= self.num_layers:
                return self.head(self.head_inputs[window])
            hidden = self.block_inputs[window][layer]
            for index in range(layer, self.num_layers):
                rest, kwargs = self.block_args[window][index]
                hidden = block_output(self.mmap.blocks[index](hidden, *rest, **kwargs))
            return self.head(self.norm(hidden))

    def reference_logits(self, window: int) -> torch.Tensor:
        with torch.inference_mode():
            if self.cached_logits is not None:
                return self.cached_logits[window]
            if self.head_ok:
                return self.head(self.head_inputs[window])
            return self.model(input_ids=self.windows[window], use_cache=False).logits

    def modified_logits(self, window: int, modification: Modification | None, first_layer: int | None) -> torch.Tensor:
        """Logits of one window under ``modification`` (entered and undone here)."""
        context = modification() if modification is not None else contextlib.nullcontext()
        with context, torch.inference_mode():
            if self.prefix_ok and first_layer is not None and first_layer >= 0:
                return self._forward_from(window, first_layer)
            return self.model(input_ids=self.windows[window], use_cache=False).logits

    def _reference_side(self, window: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The unmodified model's log-probabilities, probabilities (None: not kept) and argmax at
        the predicting positions of window ``window``: kept from the clean run, or recomputed
        (head or full forward, so never inside a modification's context)."""
        if self.cached_logits is not None:
            return (self.cached_logits[window][:, :-1], self.cached_probs[window][:, :-1],
                    self.cached_top1[window][:, :-1])
        reference = self.reference_logits(window)[:, :-1]
        return torch.log_softmax(reference.float(), dim=-1), None, reference.argmax(dim=-1)

    def _score(self, window: int, logits: torch.Tensor, reference: tuple | None = None
               ) -> tuple[list[float], list[float], list[float], int]:
        """Per row of ``logits`` [K, L, V] (K modified models on window ``window``): the summed
        NLL, KL to the reference and top-1 agreement over the positions 0 … L−2. ``reference``:
        the window's :meth:`_reference_side` when the caller scores several rows of it."""
        ids = self.windows[window]
        # one log-softmax of the modified logits serves the loss and the KL
        other_lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        per_token = nll_from_logprobs(other_lp, ids)
        ref_lp, ref_p, ref_top = reference if reference is not None else self._reference_side(window)
        kl = kl_from_logprobs(ref_lp, other_lp, ref_p)
        agree = (ref_top == logits[:, :-1].argmax(dim=-1)).float()
        return (per_token.double().sum(dim=1).tolist(), kl.double().sum(dim=1).tolist(),
                agree.double().sum(dim=1).tolist(), int(per_token.shape[1]))

    def evaluate(self, modification: Modification | None, first_layer: int | None = None,
                 use_prefix: bool = True) -> Readout:
        """Run every window under ``modification``. ``first_layer``: the first decoder block whose
        computation the modification changes (None: something before the blocks, e.g. the
        embedding, so the whole model runs). ``use_prefix=False`` forces full forwards."""
        start = first_layer if use_prefix else None
        readout = Readout(0.0, 0, 0.0, 0.0, 0)
        for window in range(len(self.windows)):
            logits = self.modified_logits(window, modification, start)
            readout.add(*self._score(window, logits), row=0)
        return readout

    def evaluate_in_block(self, modifications: Sequence[Modification], layer: int) -> list[Readout]:
        """Readouts of several modifications that each change decoder block ``layer`` and nothing
        else (one matrix of it, a group of its matrices, a hook on it). Equal to
        ``[evaluate(m, layer) for m in modifications]`` to float rounding, but faster: each
        modification reruns only block ``layer`` on the cached input; the unmodified blocks after
        it then run once for all modifications, stacked as one batch (bigger matrix products),
        and so do the final norm and the head, in chunks of at most ``logits_chunk_mb``."""
        if not modifications:
            return []
        if layer is None or not (self.prefix_ok and self.batch_ok and 0 <= layer < self.num_layers):
            return [self.evaluate(m, layer) for m in modifications]
        readouts = [Readout(0.0, 0, 0.0, 0.0, 0) for _ in modifications]
        blocks = self.mmap.blocks
        for window in range(len(self.windows)):
            rest, kwargs = self.block_args[window][layer]
            outputs = []
            for modification in modifications:
                with modification(), torch.inference_mode():
                    outputs.append(block_output(blocks[layer](self.block_inputs[window][layer], *rest, **kwargs)))
            with torch.inference_mode():
                hidden = torch.cat(outputs)
                del outputs
                for index in range(layer + 1, self.num_layers):
                    rest, kwargs = self.block_args[window][index]
                    hidden = block_output(blocks[index](hidden, *rest, **kwargs))
                hidden = self.norm(hidden)
                vocab = int(getattr(self.model.config, "vocab_size", 0) or 1)
                # The head's product gains from more rows up to ~1k tokens; the readout over the
                # vocabulary is memory-bound and runs one row at a time (measured on CPU).
                length = hidden.shape[1]
                rows = max(1, min(int(self.logits_chunk_mb * 2**20 // (length * vocab * 4)),
                                  self.HEAD_TOKENS // length))
                reference = self._reference_side(window)   # once per window, not per target
                for first in range(0, hidden.shape[0], rows):
                    logits = self.head(hidden[first:first + rows])
                    for offset in range(logits.shape[0]):
                        scores = self._score(window, logits[offset:offset + 1], reference)
                        readouts[first + offset].add(*scores, row=0)
        return readouts

    def evaluate_many(self, targets: Sequence[tuple[Modification, int | None]],
                      description: str | None = None) -> list[Readout]:
        """Readouts of many (modification, block) pairs, in their order. Each modification must
        change its block and nothing else (None: something outside the blocks — a full forward).
        Pairs of one block are run together by :meth:`evaluate_in_block`; ``description``: show
        a progress bar over the blocks."""
        by_layer: dict[int | None, list[int]] = {}
        for index, (_modification, layer) in enumerate(targets):
            by_layer.setdefault(layer, []).append(index)
        readouts: list[Readout | None] = [None] * len(targets)
        groups = list(by_layer.items())
        if description is not None:
            groups = progress.track(groups, description, total=len(groups))
        for layer, indices in groups:
            modifications = [targets[i][0] for i in indices]
            if layer is None:
                found = [self.evaluate(m, None) for m in modifications]
            else:
                found = self.evaluate_in_block(modifications, layer)
            for index, readout in zip(indices, found):
                readouts[index] = readout
        return readouts

    def info(self, model_name: str, dataset: str) -> ReferenceInfo:
        return ReferenceInfo(model=model_name, dataset=dataset, windows=len(self.windows),
                             seqlen=int(self.windows[0].shape[1]), tokens=self.tokens, nll_sum=self.nll_sum,
                             mean_nll=self.mean_nll, ppl=self.ppl, prefix_cache=self.prefix_ok,
                             prefix_cache_mb=round(self.cache_mb if self.prefix_ok else 0.0, 3),
                             reference_logits=self.reference_logits_mode)

    def first_layer_of(self, param_names: Sequence[str]) -> int | None:
        """The earliest block any of these parameters sits in; None when one is outside the
        blocks (embedding, head, final norm: tied embeddings make the head an input too)."""
        layers = []
        for name in param_names:
            layer, _role = self.mmap.param_info(name if name.endswith((".weight", ".bias")) else f"{name}.weight")
            if layer is None:
                return None
            layers.append(layer)
        return min(layers) if layers else None
