"""Weight source: ``(name, tensor)`` one tensor at a time, without building the model.

Memory stays near the size of one tensor whatever the checkpoint size: safetensors shards are
opened lazily and read tensor by tensor; GGUF tensors are memory-mapped and dequantized one at
a time. Names are always the Hugging Face parameter names (GGUF names such as
``blk.0.attn_q.weight`` are mapped back, and llama.cpp's rotary permutation of q/k is undone),
so rows from a GGUF file line up with rows from the original checkpoint.

Sources: a local directory (``*.safetensors`` with or without an index; ``pytorch_model*.bin``
through ``weights_only`` loading as a last resort), a hub id (safetensors files fetched through
the hub cache), a ``.gguf`` file, the embedded model, or an in-memory ``nn.Module``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Iterator
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import LLMProbeError
from .loading import ModelSource, cache_root, load_config, resolve_source
from .modulemap import compile_regex  # noqa: F401  (re-exported: weight commands import it from here)

if TYPE_CHECKING:  # torch is imported where a function needs it
    import torch


class WeightSource:
    """Uniform read access to a checkpoint's tensors. Create with :meth:`open` or :meth:`from_model`."""

    kind: str

    # -- construction ---------------------------------------------------------------------
    @staticmethod
    def open(model: ModelSource | str | None = None, *, revision: str | None = None,
             trust_remote_code: bool = False) -> WeightSource:
        source = model if isinstance(model, ModelSource) else resolve_source(
            model, revision=revision, trust_remote_code=trust_remote_code)
        if source.kind in ("embedded", "gguf"):
            # Dequantizing a GGUF costs seconds on every read; load_model converts it once into
            # fp32 safetensors under the cache, and weight commands share that copy (building it
            # when absent, as load_model would). Architectures transformers cannot convert are
            # read from the GGUF directly.
            converted = _existing_conversion(source)
            if converted is None:
                try:
                    converted = _build_conversion(source)
                except LLMProbeError:
                    return GGUFSource(source)
            return ConvertedGGUFSource(converted, source)
        if source.kind == "local":
            return SafetensorsSource(Path(source.location), source)
        return SafetensorsSource(_hub_snapshot(source), source)

    @staticmethod
    def from_model(model: torch.nn.Module) -> WeightSource:
        return ModelWeights(model)

    # -- interface ------------------------------------------------------------------------
    source: ModelSource | None = None

    def __getstate__(self) -> dict:
        # Sent to a helper process without the module map (built classes, torch modules): a
        # source there reads tensors, and builds the map again if it is asked for one.
        return {key: value for key, value in self.__dict__.items() if key != "module_map"}

    def names(self) -> list[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def stored_dtype(self, name: str) -> str:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        """One tensor, as stored (dequantized to fp32 for GGUF quant types), on CPU."""
        raise NotImplementedError

    def readable_as_array(self, name: str) -> bool:
        """Whether :meth:`array` reads ``name`` (without torch)."""
        return False

    def array(self, name: str) -> np.ndarray:
        """One tensor as stored, as a numpy array read without torch, where
        :meth:`readable_as_array` (an fp32/fp16/fp64 safetensors tensor); elsewhere use :meth:`get`."""
        raise LLMProbeError(f"{name} cannot be read as a numpy array from a {self.kind} source")

    def config(self):
        return load_config(self.source)

    def bytes_on_disk(self) -> int:
        return 0

    # -- shared helpers -------------------------------------------------------------------
    def select(self, regex: str | None = None, *, min_dim: int = 1, max_dim: int | None = None) -> list[str]:
        """Names matching ``regex`` (re.search) with ndim in [min_dim, max_dim]."""
        pattern = compile_regex(regex)
        chosen = []
        for name in self.names():
            ndim = len(self.shape(name))
            if ndim < min_dim or (max_dim is not None and ndim > max_dim):
                continue
            if pattern is None or pattern.search(name):
                chosen.append(name)
        return chosen

    def iter_tensors(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for name in (self.names() if names is None else names):
            yield name, self.get(name)

    def config_file(self) -> Path | None:
        """The ``config.json`` beside the weights, when there is one."""
        return None

    @cached_property
    def module_map(self):
        """The module map of this checkpoint's architecture, built on the meta device (no memory).

        A checkpoint with a ``config.json`` (and no remote code, which may change under the
        same config) is mapped from its structure as cached by the first run on the same config
        with the same transformers and torch (:func:`~llmprobe.core.modulemap.model_structure`):
        the same map, without importing transformers (~2-3 s of every weight command)."""
        from .modulemap import ModuleMap

        if isinstance(self, ModelWeights):
            return ModuleMap(self.model)
        trust = bool(self.source and self.source.trust_remote_code)
        config_file = self.config_file()
        if trust or config_file is None:
            return ModuleMap.from_config(self.config(), trust_remote_code=trust)
        return _cached_structure_map(config_file, self.config)


    def weight_places(self, names: Iterable[str]) -> dict:
        """:meth:`ModuleMap.weight_places` of ``names`` (layer, role, model order, linear shape).
        For a checkpoint whose module map comes from a cached structure, the answer is kept as
        plain data beside it, keyed by the structure and the names asked for: a later weight
        command selects its matrices without the module map, and so without torch."""
        from .modulemap import WeightPlace

        names = list(names)
        trust = bool(self.source and self.source.trust_remote_code)
        config_file = self.config_file()
        if isinstance(self, ModelWeights) or trust or config_file is None:
            return self.module_map.weight_places(names)
        import hashlib

        from .._version import __version__
        from .files import atomic_write_text

        # Keyed by the structure (config, transformers, torch), the names asked for and this
        # llmprobe's version: roles come from llmprobe's rules, which a new version may change.
        structure = _structure_file(config_file)
        digest = hashlib.sha256(f"{structure.name}|{__version__}|".encode())
        digest.update(json.dumps(names).encode())
        kept = cache_root() / "weight-places" / f"{digest.hexdigest()[:32]}.json"
        try:
            stored = json.loads(kept.read_text())
            return {name: WeightPlace(layer, role, position, tuple(linear) if linear else None)
                    for name, (layer, role, position, linear) in zip(names, stored, strict=True)}
        except (OSError, ValueError, TypeError):
            pass  # absent, or written by something else: ask the module map
        places = self.module_map.weight_places(names)
        try:
            atomic_write_text(kept, json.dumps([[p.layer, p.role, p.position, p.linear] for p in places.values()]))
        except OSError:  # a read-only cache still works; the next run asks the module map again
            pass
        return places


def _structure_file(config_file: Path) -> Path:
    import hashlib
    from importlib.metadata import PackageNotFoundError, version

    from .modulemap import STRUCTURE_FORMAT

    def installed(package: str) -> str:  # from the metadata: neither is imported for this
        try:
            return version(package)
        except PackageNotFoundError:  # pragma: no cover - dependencies
            return "?"

    # The model class comes from the config and the installed transformers; torch builds it.
    digest = hashlib.sha256(config_file.read_bytes())
    digest.update(f"|{installed('transformers')}|{installed('torch')}|{STRUCTURE_FORMAT}".encode())
    return cache_root() / "module-structures" / f"{digest.hexdigest()[:32]}.json"


def _cached_structure_map(config_file: Path, load):
    """The module map from the cached structure for ``config_file``; on a miss (or an unreadable
    cache entry) from ``load()``'s config through transformers, and the structure is kept."""
    from .files import atomic_write_text
    from .modulemap import ModuleMap, model_structure

    kept = _structure_file(config_file)
    try:
        return ModuleMap.from_structure(json.loads(kept.read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # absent, or written by something else: rebuild it
    module_map = ModuleMap.from_config(load())
    try:
        atomic_write_text(kept, json.dumps(model_structure(module_map.model)))
    except OSError:  # a read-only cache still works; the next run builds the map again
        pass
    return module_map


def no_match_error(regex: str | None, names: list[str], what: str = "tensor") -> LLMProbeError:
    sample = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
    return LLMProbeError(f"no {what} matches '{regex}'; names look like: {sample}")


# --------------------------------------------------------------------------------------------
# safetensors (and .bin as a last resort)


class SafetensorsSource(WeightSource):
    kind = "safetensors"

    def __init__(self, directory: Path, source: ModelSource | None = None):
        self.directory = Path(directory)
        self.source = source
        self._where: dict[str, Path] = {}
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}
        files = self._shard_files()
        if not files:
            bins = sorted(self.directory.glob("pytorch_model*.bin"))
            if not bins:
                raise LLMProbeError(f"no *.safetensors (or pytorch_model*.bin) weights in {self.directory}")
            self.kind = "bin"
            self._bins = bins
            self._index_bins()
            return
        self._index_safetensors(files)

    def _shard_files(self) -> list[Path]:
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise LLMProbeError(f"corrupt safetensors index {index}: {exc}") from None
            files = sorted({self.directory / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise LLMProbeError(f"{index.name} names shards that are missing: {', '.join(missing[:3])}")
            return files
        return sorted(self.directory.glob("*.safetensors"))

    def _index_safetensors(self, files: list[Path]) -> None:
        from safetensors import safe_open

        for file in files:
            try:  # the header only: the numpy framework reads it without importing torch
                with safe_open(str(file), framework="numpy") as handle:
                    for name in handle.keys():
                        sl = handle.get_slice(name)
                        self._where[name] = file
                        self._meta[name] = (tuple(sl.get_shape()), str(sl.get_dtype()))
            except Exception as exc:  # safetensors raises its own error types for bad headers
                raise LLMProbeError(f"corrupt or truncated safetensors file {file}: {exc}") from None

    def _index_bins(self) -> None:
        # Pickle checkpoints are only ever read with weights_only=True (no arbitrary code);
        # mmap keeps memory near one tensor for zip-format files.
        import torch
        self._legacy_cache: tuple[Path, dict] | None = None
        for file in self._bins:
            state = self._load_bin(file)
            for name, tensor in state.items():
                if not isinstance(tensor, torch.Tensor):
                    continue
                self._where[name] = file
                self._meta[name] = (tuple(tensor.shape), str(tensor.dtype).replace("torch.", ""))
            del state
        self._legacy_cache = None

    def _load_bin(self, file: Path) -> dict:
        import pickle
        import zipfile

        import torch

        from .loading import pickle_refusal

        # Only zip-format checkpoints (torch >= 1.6) can be memory-mapped; the legacy format is
        # read whole, and the last such file is kept so reading its tensors one by one does
        # not re-read the file each time.
        zipped = zipfile.is_zipfile(file)
        if not zipped and self._legacy_cache is not None and self._legacy_cache[0] == file:
            return self._legacy_cache[1]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                state = torch.load(str(file), map_location="cpu", weights_only=True, mmap=zipped)
        except pickle.UnpicklingError:
            raise pickle_refusal(str(file)) from None
        except Exception as exc:
            if "Weights only load failed" in str(exc):
                raise pickle_refusal(str(file)) from None
            raise LLMProbeError(f"cannot read {file}: {str(exc).splitlines()[0] if str(exc) else exc!r} "
                                f"(corrupt or truncated?)") from None
        if not isinstance(state, dict):
            raise LLMProbeError(f"{file} holds a {type(state).__name__}, not a state dict of tensors")
        if not zipped:
            self._legacy_cache = (file, state)
        return state

    def names(self) -> list[str]:
        return list(self._meta)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def stored_dtype(self, name: str) -> str:
        return self._meta[name][1]

    # safetensors dtypes numpy reads as they are (bf16 and fp8 need torch)
    _ARRAY_DTYPES = {"F32", "F16", "F64"}

    def readable_as_array(self, name: str) -> bool:
        return self.kind != "bin" and self._meta[name][1] in self._ARRAY_DTYPES

    def array(self, name: str) -> np.ndarray:
        if not self.readable_as_array(name):
            return super().array(name)
        from safetensors import safe_open

        file = self._where[name]
        try:
            with safe_open(str(file), framework="numpy") as handle:
                return handle.get_tensor(name)
        except Exception as exc:
            raise LLMProbeError(f"cannot read tensor {name} from {file}: {exc}") from None

    def get(self, name: str) -> torch.Tensor:
        file = self._where[name]
        if self.kind == "bin":
            return self._load_bin(file)[name].clone()
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt") as handle:
                return handle.get_tensor(name)
        except Exception as exc:
            raise LLMProbeError(f"cannot read tensor {name} from {file}: {exc}") from None

    def config_file(self) -> Path | None:
        path = self.directory / "config.json"
        return path if path.is_file() else None

    def config(self):
        if (self.directory / "config.json").is_file():
            trust = bool(self.source and self.source.trust_remote_code)
            # The same checks and messages as model loading (remote code, unknown model type,
            # impossible sizes), for the directory that actually holds the weights.
            here = ModelSource("local", str(self.directory),
                               self.source.display if self.source is not None else str(self.directory),
                               trust_remote_code=trust)
            return load_config(here)
        return super().config()

    def bytes_on_disk(self) -> int:
        return sum(f.stat().st_size for f in set(self._where.values()))


def _existing_conversion(source: ModelSource) -> Path | None:
    from .loading import EMBEDDED_NAME, _gguf_key

    gguf = source.gguf_path
    name = EMBEDDED_NAME if source.kind == "embedded" else gguf.stem
    target = cache_root() / "models" / f"{name}-{_gguf_key(gguf)}"
    return target if (target / "llmprobe-converted.json").is_file() else None


def _build_conversion(source: ModelSource) -> Path:
    from .loading import EMBEDDED_NAME, converted_gguf_dir

    return converted_gguf_dir(source.gguf_path, name=EMBEDDED_NAME if source.kind == "embedded" else None)


class ConvertedGGUFSource(SafetensorsSource):
    """A GGUF read through its cached fp32 safetensors conversion: the same tensors under the
    same names as :class:`GGUFSource` (tests/test_speed.py checks it), without dequantizing
    again. What is *stored* is still the GGUF: ``stored_dtype`` reports its quantization types
    (Q4_1, F32, ...) and ``bytes_on_disk`` its size, whichever way the tensors are read."""

    kind = "gguf-converted"
    DTYPES_FILE = "gguf-stored-dtypes.json"

    def __init__(self, directory: Path, source: ModelSource):
        super().__init__(directory, source)
        self.gguf_path = Path(source.gguf_path)

    @cached_property
    def _gguf_dtypes(self) -> dict[str, str]:
        # Read once from the GGUF header (through GGUFSource's name map) and kept next to the
        # conversion, so later runs open neither the GGUF nor the module map for it.
        side = self.directory / self.DTYPES_FILE
        if side.is_file():
            try:
                return json.loads(side.read_text())
            except ValueError:
                pass
        gguf = GGUFSource(self.source)
        dtypes = {name: gguf.stored_dtype(name) for name in gguf.names()}
        try:
            from .files import atomic_write_text

            atomic_write_text(side, json.dumps(dtypes, indent=1))
        except OSError:  # a read-only cache still works, it just reads the header again next time
            pass
        return dtypes

    def stored_dtype(self, name: str) -> str:
        return self._gguf_dtypes.get(name) or super().stored_dtype(name)

    def bytes_on_disk(self) -> int:
        return self.gguf_path.stat().st_size


def _hub_snapshot(source: ModelSource) -> Path:
    from huggingface_hub import snapshot_download

    kwargs = source.hf_kwargs()
    kwargs.pop("trust_remote_code", None)
    try:
        path = snapshot_download(source.location, allow_patterns=["*.safetensors", "*.json"], **kwargs)
    except Exception as exc:
        from .loading import _hub_failure

        raise _hub_failure(source, exc) from None
    return Path(path)


# --------------------------------------------------------------------------------------------
# GGUF


class GGUFSource(WeightSource):
    """Tensors of a GGUF file, dequantized one at a time, under their Hugging Face names."""

    kind = "gguf"

    def __init__(self, source: ModelSource):
        self.source = source
        self.path = Path(source.gguf_path)
        try:
            import gguf
        except ImportError:
            raise LLMProbeError("reading GGUF files needs the package gguf: pip install gguf") from None
        try:
            self._reader = gguf.GGUFReader(str(self.path))
        except Exception as exc:
            raise LLMProbeError(f"corrupt or truncated GGUF file {self.path}: {exc}") from None
        self._tensors = {t.name: t for t in self._reader.tensors}
        self._arch = self._field("general.architecture")
        self._hf_to_gguf = self._name_map()
        self._gguf_to_hf = {g: h for h, g in self._hf_to_gguf.items()}

    def _field(self, key: str):
        field = self._reader.fields.get(key)
        if field is None:
            return None
        value = field.parts[field.data[0]]
        return bytes(value).decode() if value.dtype == np.uint8 else value.tolist()[0]

    def _name_map(self) -> dict[str, str]:
        """HF parameter name -> GGUF tensor name, from gguf's own name tables."""
        import gguf

        arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == self._arch), None)
        if arch is None:
            raise LLMProbeError(f"GGUF architecture '{self._arch}' is not known to the gguf package")
        blocks = int(self._field(f"{self._arch}.block_count") or 0)
        table = gguf.get_tensor_name_map(arch, blocks)
        mapping = {}
        for hf_name in self._hf_names():
            gguf_name = table.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name in self._tensors:
                mapping[hf_name] = gguf_name
        return mapping

    def _hf_names(self) -> list[str]:
        from .modulemap import ModuleMap

        mmap = ModuleMap.from_config(self.config())
        return [name for name, _ in mmap.model.named_parameters(remove_duplicate=False)]

    def names(self) -> list[str]:
        # GGUF tensors with no HF counterpart (rope tables, say) keep their GGUF name.
        mapped = [self._gguf_to_hf.get(name, name) for name in self._tensors]
        return mapped

    def _tensor(self, name: str):
        return self._tensors[self._hf_to_gguf.get(name, name)]

    def shape(self, name: str) -> tuple[int, ...]:
        # GGUF lists dimensions fastest-first; torch lists them slowest-first.
        return tuple(int(d) for d in reversed(self._tensor(name).shape))

    def stored_dtype(self, name: str) -> str:
        return self._tensor(name).tensor_type.name

    def get(self, name: str) -> torch.Tensor:
        import torch
        from gguf.quants import dequantize

        tensor = self._tensor(name)
        values = dequantize(tensor.data, tensor.tensor_type)
        # F32/F16 tensors come back as read-only views of the memory map: copy those.
        values = np.asarray(values, dtype=np.float32)
        if not values.flags.writeable:
            values = values.copy()
        out = torch.from_numpy(values).reshape(self.shape(name))
        return self._undo_rotary_permutation(name, tensor.name, out)

    def _undo_rotary_permutation(self, hf_name: str, gguf_name: str, weight: torch.Tensor) -> torch.Tensor:
        # llama.cpp's converter reorders the rows of Llama q/k projections (interleaved rotary
        # pairs); put them back in Hugging Face order so values match the original checkpoint.
        if self._arch not in ("llama", "mistral") or weight.dim() != 2:
            return weight
        if ".attn_q." in gguf_name:
            heads = int(self._field(f"{self._arch}.attention.head_count"))
        elif ".attn_k." in gguf_name:
            heads = int(self._field(f"{self._arch}.attention.head_count_kv")
                        or self._field(f"{self._arch}.attention.head_count"))
        else:
            return weight
        rows, cols = weight.shape
        return weight.reshape(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)

    def bytes_on_disk(self) -> int:
        return self.path.stat().st_size


# --------------------------------------------------------------------------------------------
# an in-memory model


class ModelWeights(WeightSource):
    kind = "model"

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.source = None
        self._params = dict(model.named_parameters())

    def names(self) -> list[str]:
        return list(self._params)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._params[name].shape)

    def stored_dtype(self, name: str) -> str:
        return str(self._params[name].dtype).replace("torch.", "")

    def get(self, name: str) -> torch.Tensor:
        return self._params[name].detach()

    def config(self):
        return self.model.config
