"""Hook collection: run calibration windows through a model and hand each hooked module's
activations (and, when asked, their gradients) to streaming statistics.

The contract with a statistic ("collector") is small:

* ``collector.update(key, batch)`` is called once per hooked site per forward pass, with a
  :class:`Batch` whose ``x`` is a ``[T, F]`` fp32 matrix of the tokens that survive masking
  (``--exclude-bos``, ``--exclude-tokens``), already rotated when ``rotate="hadamard"``, plus
  each token's id, window index and position. In backward mode ``batch.grad`` holds
  ∂loss/∂x for the same rows.
* collectors fold what they need into running state (moments, maxima, per-token scalars) and
  never keep ``x``; memory therefore grows with layers × features, not with windows.
* a collector may name, in ``int_error_bits``, the widths of per-token int errors it will ask
  for (:meth:`Batch.row_int_error_sse`), so the compiled pass computes them with the rest.

Keys: with ``site="input"`` modules that read the same tensor (q/k/v, gate/up) are hooked once,
under their shared ``input_group`` key; everything else is keyed by module name.
:func:`sites_for_key` maps a key back to its modules for reporting.
"""

from __future__ import annotations

import ctypes
import re
import sys
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from . import distributed, kernels, progress
from .errors import LLMProbeError
from .modulemap import LinearSite, ModuleMap, output_head
from .readouts import window_mean_loss

Site = Literal["input", "output"]


class Workspace:
    """Scratch matrices that live for a whole collection pass, reused by every hook call.

    Why: collect() pins glibc's mmap threshold (:func:`pin_mmap_threshold`), so every fresh
    activation-sized tensor is a new mapping whose pages fault in on first touch. On the 2-core
    VM that costs more than the arithmetic (a 256×1536 fp32 ``x.abs()`` into a fresh tensor:
    ~560 µs; into a reused one: ~40 µs). Temporaries written with ``out=`` into these buffers
    fault in once per pass. A buffer is handed out by name, so two uses of one name must not
    overlap within one hook call.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}

    def matrix(self, name: str, rows: int, features: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A contiguous [rows, features] tensor of undefined content (the first rows of the
        buffer, which grows to the largest row count asked for)."""
        key = (name, features, dtype, device)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape[0] < rows:
            buffer = torch.empty(rows, features, dtype=dtype, device=device)
            self._buffers[key] = buffer
        return buffer[:rows]


@dataclass
class Batch:
    """What a collector sees for one hooked site in one forward pass.

    ``x`` may be a view of the model's own activation: collectors read it and never write to
    it. Rows come in window order (a window's rows are contiguous). Quantities that several
    collectors need (|x|, x², per-token max|x|, ...) are computed once per batch by the methods
    below and shared; whatever they return is read-only too.
    """

    x: torch.Tensor                  # [T, F] fp32, masked tokens removed
    token_ids: torch.Tensor          # [T] int64, on CPU
    window: torch.Tensor             # [T] int64 global window index, on CPU
    position: torch.Tensor           # [T] int64 position inside the window, on CPU
    grad: torch.Tensor | None = None  # [T, F] fp32 ∂loss/∂x (backward mode only)
    workspace: Workspace = field(default_factory=Workspace, repr=False)
    # (window, its rows) for each window, in order; collect() knows them once per forward pass
    # (every hooked site sees the same tokens), so no hook call has to find them again.
    windows: list[tuple[int, slice]] | None = None
    # Widths of per-token symmetric int errors the collectors will ask for (row_int_error_sse):
    # the compiled pass computes them with everything else, in one pass.
    int_error_bits: tuple[int, ...] = ()
    _derived: dict = field(default_factory=dict, init=False, repr=False)

    def derived(self, name: Hashable, compute: Callable[[Batch], object]):
        """``compute(self)``, once per batch: every collector asking for ``name`` shares it."""
        if name not in self._derived:
            self._derived[name] = compute(self)
        return self._derived[name]

    def scratch(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A [T, F] workspace matrix for a temporary the size of ``x`` (see :class:`Workspace`)."""
        return self.workspace.matrix(name, self.x.shape[0], self.x.shape[1], dtype, self.x.device)

    @property
    def compiled(self) -> bool:
        """True where the one-pass CPU kernel of :mod:`llmprobe.core.kernels` serves this batch
        (fp32 rows on the CPU, numba importable); elsewhere the torch ops do."""
        return self.derived("compiled", lambda b: kernels.AVAILABLE and b.x.device.type == "cpu"
                            and b.x.dtype == torch.float32)

    def stats(self) -> kernels.ActivationStats:
        """Compiled batches only: every statistic of :func:`llmprobe.core.kernels.activation_stats`,
        from one pass (windows as in :meth:`window_rows`, the int widths of ``int_error_bits``)."""
        return self.derived("stats", lambda b: kernels.activation_stats(b.x, b.window_starts(), b.int_error_bits))

    def abs(self) -> torch.Tensor:
        """[T, F] fp32 |x| (a workspace matrix: valid for this batch only)."""
        return self.derived("abs", lambda b: torch.abs(b.x, out=b.scratch("abs")))

    def row_abs_max(self) -> torch.Tensor:
        """[T] fp32 max|x| over each token's features (NaN where the token has a NaN)."""
        if self.compiled:
            return torch.from_numpy(self.stats().row_abs_max)
        return self.derived("row_abs_max", lambda b: b.abs().amax(dim=1))

    def channel_abs_max(self) -> torch.Tensor:
        """[F] fp32 max|x| over the batch's tokens."""
        if self.compiled:
            return torch.from_numpy(self.stats().column_abs_max)
        return self.derived("channel_abs_max", lambda b: b.abs().amax(dim=0))

    def square(self) -> torch.Tensor:
        """[T, F] fp32 x² (a workspace matrix: valid for this batch only)."""
        return self.derived("square", lambda b: torch.mul(b.x, b.x, out=b.scratch("square")))

    def window_rows(self) -> list[tuple[int, slice]]:
        """(window, its rows) for each window of the batch, in order."""
        if self.windows is not None:
            return self.windows
        return self.derived("window rows", _window_rows)

    def window_starts(self) -> list[int]:
        """The first row of each window, then the row count."""
        return [rows.start for _, rows in self.window_rows()] + [self.x.shape[0]]

    def row_sum_sq(self) -> torch.Tensor:
        """[T] fp64 Σx² over each token's features: summed in fp64 on compiled batches, else
        fp32 squares summed in fp32 over one row (relative error ~1e-7)."""
        if self.compiled:
            return torch.from_numpy(self.stats().row_sum_sq)
        return self.derived("row sum sq", lambda b: b.square().sum(dim=1).to(torch.float64))

    def channel_sum_sq(self) -> torch.Tensor:
        """[F] fp64 Σx² over the batch's tokens: summed in fp64 on compiled batches, else fp32
        squares summed in fp32 over the batch's rows (relative error ~1e-7) and widened."""
        if self.compiled:
            return torch.from_numpy(self.stats().column_sum_sq)
        return self.derived("channel sum sq", lambda b: b.square().sum(dim=0).to(torch.float64))

    def row_int_error_sse(self, bits: int) -> torch.Tensor:
        """Compiled batches only: [T] fp64 Σ (Q(x) − x)² of symmetric per-token ``bits``-bit RTN.
        From the one pass when ``bits`` is in ``int_error_bits``; otherwise a pass of its own."""
        sse = self.stats().row_int_sse.get(bits)
        if sse is None:
            sse = self.derived(("int error", bits), lambda b: kernels.activation_stats(
                b.x, b.window_starts(), (bits,)).row_int_sse[bits])
        return torch.from_numpy(sse)


def _contiguous_rows(windows_and_counts) -> list[tuple[int, slice]]:
    """(window, its rows) for consecutive runs of rows, given (window, row count) in order; a
    window with no rows is left out."""
    rows, start = [], 0
    for window, count in windows_and_counts:
        if count:
            rows.append((int(window), slice(start, start + count)))
            start += count
    return rows


def _window_rows(batch: Batch) -> list[tuple[int, slice]]:
    window_ids, counts = torch.unique_consecutive(batch.window, return_counts=True)
    return _contiguous_rows(zip(window_ids.tolist(), counts.tolist()))


class Collector(Protocol):
    def update(self, key: str, batch: Batch) -> None: ...


@dataclass
class TokenFilter:
    """Which tokens enter statistics. ``exclude_bos`` drops each window's first position
    (the attention-sink slot, whatever its id) and every occurrence of the BOS id."""

    exclude_bos: bool = False
    exclude_ids: frozenset[int] = field(default_factory=frozenset)
    bos_id: int | None = None

    def keep_mask(self, ids: torch.Tensor) -> torch.Tensor:
        keep = torch.ones_like(ids, dtype=torch.bool)
        if self.exclude_bos:
            keep[:, 0] = False
            if self.bos_id is not None:
                keep &= ids != self.bos_id
        for token in self.exclude_ids:
            keep &= ids != token
        return keep


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "s": " ", "\\": "\\"}


def unescape_token(text: str) -> str:
    r"""Read ``\n``, ``\t``, ``\r``, ``\s`` (space) and ``\\`` typed on a command line as the
    characters they name; anything else is kept as typed (no general unicode-escape decoding,
    which would mangle non-ASCII text)."""
    return re.sub(r"\\([ntrs\\])", lambda m: _ESCAPES[m.group(1)], text)


def resolve_exclude_tokens(tokenizer, tokens: Sequence[str], vocab_size: int | None = None) -> frozenset[int]:
    """Token strings (or ids written as integers) to ids, as the tokenizer writes them in text.

    An id must exist: 0 <= id < the larger of the tokenizer's length and ``vocab_size`` (the
    model's embedding rows, which may be padded past the tokenizer). An id outside would
    silently exclude nothing.
    """
    ids: set[int] = set()
    sizes = [n for n in (_tokenizer_length(tokenizer), vocab_size) if isinstance(n, int) and n > 0]
    limit = max(sizes) if sizes else None
    for text in map(unescape_token, tokens):
        if text.strip().lstrip("-").isdigit():
            value = int(text)
            if value < 0 or (limit is not None and value >= limit):
                bound = f"0 to {limit - 1}" if limit is not None else "non-negative"
                raise LLMProbeError(f"--exclude-tokens: id {value} is not in the vocabulary (ids are {bound})")
            ids.add(value)
            continue
        found = tokenizer.convert_tokens_to_ids(text)
        unk = getattr(tokenizer, "unk_token_id", None)
        if isinstance(found, int) and found != unk:
            ids.add(found)
            continue
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if not encoded:
            raise LLMProbeError(f"--exclude-tokens: '{text}' encodes to no token")
        ids.update(encoded)
    return frozenset(ids)


def _tokenizer_length(tokenizer) -> int | None:
    try:
        return len(tokenizer)
    except TypeError:
        size = getattr(tokenizer, "get_vocab_size", None)  # a bare tokenizers.Tokenizer
        return int(size()) if callable(size) else None


def check_site(site: str) -> str:
    if site not in ("input", "output"):
        raise LLMProbeError(f"unknown --site '{site}'; use input or output")
    return site


def hook_plan(mmap: ModuleMap, sites: Sequence[LinearSite], site: Site, backward: bool = False
              ) -> dict[str, LinearSite]:
    """Key -> the module to hook. Shared inputs are hooked once unless gradients are needed
    (each consumer of a shared input receives its own gradient)."""
    plan: dict[str, LinearSite] = {}
    if site == "input" and not backward:
        for key, members in mmap.input_groups(sites).items():
            plan[key] = members[0]
    else:
        for s in sites:
            plan[s.name] = s
    return plan


def sites_for_key(mmap: ModuleMap, sites: Sequence[LinearSite], site: Site, backward: bool = False
                  ) -> dict[str, list[LinearSite]]:
    """Key -> every module whose statistics that key stands for (for per-module rows)."""
    if site == "input" and not backward:
        return dict(mmap.input_groups(sites))
    return {s.name: [s] for s in sites}


_HEAP = {"pinned": False}


def pin_mmap_threshold() -> None:
    """Keep large allocations out of the glibc heap (Linux only, once per process).

    Collection interleaves big short-lived activation tensors with small long-lived per-token
    results. glibc raises its mmap threshold after big blocks are freed, so later activations
    land on the heap, between the small results, and the heap can never shrink: peak memory
    then grows with the number of windows (measured: +970 MB from 8 to 32 windows of 256
    tokens on SmolLM2-135M). A fixed 128 KiB threshold (glibc's own default, made static)
    keeps activations in mmap'd blocks that return to the OS when freed.
    """
    if _HEAP["pinned"] or not sys.platform.startswith("linux"):
        return
    _HEAP["pinned"] = True
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc (musl, say): nothing to pin
        pass


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for value in kwargs.values():
        if isinstance(value, torch.Tensor):
            return value
    raise RuntimeError("hooked module received no tensor input")


def _as_tokens(x: torch.Tensor, batch_shape: tuple[int, int]) -> torch.Tensor:
    """[B, L, F] (or [B*L, F]) -> [B, L, F]."""
    b, length = batch_shape
    if x.dim() == 3 and x.shape[0] == b and x.shape[1] == length:
        return x
    if x.dim() == 2 and x.shape[0] == b * length:
        return x.view(b, length, -1)
    if x.dim() == 3 and x.shape[0] == length and x.shape[1] == b:  # seq-first models
        return x.transpose(0, 1)
    raise RuntimeError(f"cannot read activation of shape {tuple(x.shape)} as [batch={b}, seq={length}, features]")


class _HeadReached(Exception):
    """Raised when a forward-only collection pass reaches the model's output head."""


def _head_to_skip(lm_model: torch.nn.Module, plan: dict[str, LinearSite], backward: bool) -> torch.nn.Module | None:
    """The output head, where a pass may stop as it is reached: forward only (no loss needs the
    logits), the head not hooked itself, and (checked as the head is reached) every hooked module
    already run in this pass — in a causal LM they all run before the head. The head is the
    largest single matrix product of a small model (SmolLM2-135M: 28M of its 135M weights, about
    a fifth of the forward's arithmetic). A model that computes its logits without calling the
    head module never reaches the hook and simply runs to the end."""
    if backward:
        return None
    head = output_head(lm_model)
    if head is None or any(s.module is head for s in plan.values()):
        return None
    return head


class Deferred(Exception):
    """Raised inside an analysis while a :class:`SharedPass` records what it would collect."""


_SHARED: dict[str, SharedPass | None] = {"pass": None}


def _pass_key(lm_model, sites, windows, site, token_filter, rotate, batch_size, backward) -> tuple:
    """What makes two collection passes the same pass: model, modules, windows, where and how."""
    return (id(lm_model), tuple(s.name for s in sites), windows.data_ptr(), tuple(windows.shape), site,
            repr(token_filter), id(rotate), batch_size, backward)


class SharedPass:
    """Folds the collection passes of several analyses into one pass per distinct setting.

    Usage (``report run`` does this)::

        shared = SharedPass()
        with shared.active():
            for name in analyses:
                with shared.recording(name):     # the analysis runs until its first collect()
                    ...                           # -> its collectors are kept, Deferred is raised
            shared.run()                          # one forward (and one backward) pass for all
            for name in analyses:
                with shared.replaying(name):     # collect() hands back the filled collectors
                    ...

    Only an analysis's first collection pass is folded; a second pass of the same analysis (one
    that depends on the first one's result) runs on its own.
    """

    def __init__(self):
        self._recorded: dict[str, tuple[tuple, list]] = {}
        self._key_sites: dict[tuple, dict] = {}
        self._args: dict[tuple, tuple] = {}
        self._mode: tuple[str, str] | None = None
        self._used: set[str] = set()
        self.passes_run = 0

    def active(self):
        import contextlib

        @contextlib.contextmanager
        def scope():
            previous, _SHARED["pass"] = _SHARED["pass"], self
            try:
                yield self
            finally:
                _SHARED["pass"] = previous
        return scope()

    def _scope(self, mode: str, label: str):
        import contextlib

        @contextlib.contextmanager
        def scope():
            self._mode = (mode, label)
            try:
                yield
            except Deferred:
                if mode != "record":
                    raise
            finally:
                self._mode = None
        return scope()

    def recording(self, label: str):
        return self._scope("record", label)

    def replaying(self, label: str):
        return self._scope("replay", label)

    def intercept(self, key: tuple, collectors: list, call: dict):
        if self._mode is None:
            return None
        mode, label = self._mode
        if mode == "record":
            self._recorded[label] = (key, collectors)
            self._args[key] = call
            raise Deferred(label)
        if label in self._used or label not in self._recorded or self._recorded[label][0] != key:
            return None  # not the recorded pass: it runs on its own
        self._used.add(label)
        for fresh, filled in zip(collectors, self._recorded[label][1]):
            fresh.__dict__.update(filled.__dict__)
        return self._key_sites[key]

    def run(self) -> None:
        """One pass per distinct setting, feeding the collectors of every recorded analysis."""
        by_key: dict[tuple, list] = {}
        for key, collectors in self._recorded.values():
            by_key.setdefault(key, []).extend(collectors)
        previous, _SHARED["pass"] = _SHARED["pass"], None
        try:
            for key, collectors in by_key.items():
                self._key_sites[key] = collect(collectors=collectors, **self._args[key])
                self.passes_run += 1
        finally:
            _SHARED["pass"] = previous

    @property
    def recorded(self) -> list[str]:
        return list(self._recorded)


def collect(lm_model: torch.nn.Module, mmap: ModuleMap, sites: Sequence[LinearSite], windows: torch.Tensor,
            collectors: Iterable[Collector], *, site: Site = "input", token_filter: TokenFilter | None = None,
            rotate: Callable[[torch.Tensor], torch.Tensor] | None = None, batch_size: int = 1,
            backward: bool = False, description: str = "collect") -> dict[str, list[LinearSite]]:
    """Run ``windows`` ([N, L] token ids) through the model, feeding every collector.

    ``backward=True`` also back-propagates the next-token loss (mean over each window's shifted
    targets, summed over the windows of a batch so windows stay independent) and passes
    ∂loss/∂x of each module's input; parameter gradients are never formed.

    Returns key -> modules, for turning keyed statistics into per-module rows.
    """
    collectors = list(collectors)
    shared = _SHARED["pass"]
    if shared is not None:
        key = _pass_key(lm_model, sites, windows, site, token_filter, rotate, batch_size, backward)
        call = dict(lm_model=lm_model, mmap=mmap, sites=sites, windows=windows, site=site,
                    token_filter=token_filter, rotate=rotate, batch_size=batch_size, backward=backward,
                    description="shared pass")
        replayed = shared.intercept(key, collectors, call)
        if replayed is not None:
            return replayed
    pin_mmap_threshold()
    if windows.dim() != 2 or windows.shape[0] == 0:
        raise LLMProbeError("no calibration windows to run")
    check_site(site)
    if backward and site != "input":
        raise LLMProbeError("gradient statistics are defined on module inputs; use --site input")
    token_filter = token_filter or TokenFilter()
    plan = hook_plan(mmap, sites, site, backward)
    device = next(lm_model.parameters()).device

    state: dict[str, object] = {}

    workspace = Workspace()
    int_error_bits = tuple(sorted({bits for c in collectors for bits in getattr(c, "int_error_bits", ())}))

    def kept_rows(tensor: torch.Tensor) -> torch.Tensor:
        keep = state["keep"]
        tokens = _as_tokens(tensor.detach(), keep.shape)
        # Every token kept (the default): a [T, F] view, no copy of the activation.
        rows = tokens.reshape(-1, tokens.shape[-1]) if state["keep_all"] else tokens[keep]
        return rows.float()

    def deliver(key: str, x: torch.Tensor, grad: torch.Tensor | None = None) -> None:
        state["delivered"].add(key)
        x = kept_rows(x)
        g = None if grad is None else kept_rows(grad)
        if rotate is not None:
            x = rotate(x)
            g = None if g is None else rotate(g)
        batch = Batch(x=x, token_ids=state["ids"], window=state["window"], position=state["position"], grad=g,
                      workspace=workspace, windows=state["windows"], int_error_bits=int_error_bits)
        # The collectors run on the forward's own threads. Dropping to one thread around them
        # (tried: it helps on a machine whose cores are busy elsewhere) costs more than it saves
        # on a quiet one: each change of the thread count makes the forward's next parallel
        # region rebuild its thread team (measured, 8 × 256 tokens on the 2-core VM, 4 rounds
        # interleaved: shared pass 1.57× a bare forward with the switch, 1.42× without).
        for collector in collectors:
            collector.update(key, batch)

    handles = []

    def forward_pre(key: str):
        def hook(module, args, kwargs):
            deliver(key, _first_tensor(args, kwargs))
        return hook

    def forward_out(key: str):
        def hook(module, args, kwargs, output):
            out = output[0] if isinstance(output, tuple) else output
            deliver(key, out)
        return hook

    def gradient_tap(key: str):
        # Backward mode: hand the module an alias of its input and hook the alias's gradient.
        # Only this module consumes the alias, so its gradient is ∂loss/∂x through this module
        # alone (q, k and v each get their own). Tensor hooks avoid full module backward hooks,
        # which break on architectures that add into a module's output in place (Falcon).
        def hook(module, args, kwargs):
            x = _first_tensor(args, kwargs)
            if not x.requires_grad:
                return None
            alias = x.view_as(x)
            alias.register_hook(lambda grad: deliver(key, x, grad))
            if args and args[0] is x:
                return (alias, *args[1:]), kwargs
            return args, {k: (alias if v is x else v) for k, v in kwargs.items()}
        return hook

    params_grad = {p: p.requires_grad for p in lm_model.parameters()}
    try:
        for key, s in plan.items():
            if backward:
                handles.append(s.module.register_forward_pre_hook(gradient_tap(key), with_kwargs=True))
            elif site == "input":
                handles.append(s.module.register_forward_pre_hook(forward_pre(key), with_kwargs=True))
            else:
                handles.append(s.module.register_forward_hook(forward_out(key), with_kwargs=True))
        head = _head_to_skip(lm_model, plan, backward)
        if head is not None:
            def stop(module, args):
                # Only once every hooked module has run in this pass: a module that runs after
                # the head, or a mixture-of-experts expert that got no token, lets it finish.
                if len(state["delivered"]) == len(plan):
                    raise _HeadReached
            handles.append(head.register_forward_pre_hook(stop))
        if backward:
            for p in lm_model.parameters():
                p.requires_grad_(False)
            # Gradients must flow to activations though no parameter wants one: make the
            # embedding output a leaf that requires grad.
            embed = lm_model.get_input_embeddings()
            handles.append(embed.register_forward_hook(lambda m, a, out: out.requires_grad_(True)))

        # Under torchrun each rank runs a contiguous block of the batches (the same batches as
        # one process would run: same windows, same global window indices); the collectors
        # are merged across ranks below.
        starts = distributed.share(range(0, windows.shape[0], batch_size))
        for start in progress.track(starts, description, total=len(starts)):
            ids = windows[start:start + batch_size]
            keep = token_filter.keep_mask(ids)
            b, length = ids.shape
            state["keep"] = keep.to(device)
            state["keep_all"] = bool(keep.all())
            state["ids"] = ids[keep]
            state["window"] = (torch.arange(start, start + b).unsqueeze(1).expand(b, length))[keep]
            state["position"] = torch.arange(length).unsqueeze(0).expand(b, length)[keep]
            state["windows"] = _contiguous_rows(zip(range(start, start + b), keep.sum(dim=1).tolist()))
            state["delivered"] = set()
            inputs = ids.to(device)
            if backward:
                with torch.enable_grad():
                    logits = lm_model(input_ids=inputs, use_cache=False).logits
                    loss = window_mean_loss(logits, inputs)
                    loss.backward()
            else:
                with torch.inference_mode():
                    try:
                        lm_model(input_ids=inputs, use_cache=False)
                    except _HeadReached:
                        pass
    except Exception as exc:
        distributed.abort(exc)  # the other ranks fail with this rank, instead of waiting for it
    finally:
        for handle in handles:
            handle.remove()
        if backward:
            for p, flag in params_grad.items():
                p.requires_grad_(flag)
    distributed.merge_collectors(collectors)
    return sites_for_key(mmap, sites, site, backward)
