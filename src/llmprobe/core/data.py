"""Text corpora, tokenization and the windows that evaluation and calibration run on.

Three steps, each a plain function so analyses can share them:

1. :func:`load_corpus` turns ``--dataset`` (a hub name or a local file) into a :class:`Corpus`:
   rows of text plus, for the run manifest, the SHA-256 of the text that is tokenized
   (``text_sha256``) and, for a local file, the SHA-256 of the file's bytes (``file_sha256``).
2. :func:`tokenize_corpus` tokenizes ``corpus.text()`` once, as one string (the GPTQ protocol:
   rows joined with ``"\\n\\n"``, tokenized in one call, never row by row).
3. :func:`eval_windows` cuts the ids into perplexity windows (non-overlapping by default, or the
   sliding-window protocol with ``stride``); :func:`calibration_windows` draws full-length
   windows at seeded random offsets for activation statistics and pruning.

Hub corpora are read with ``datasets.load_dataset`` (WikiText-2 raw by its config, C4 as the
single shard named with ``data_files``, as the GPTQ code does), so they share the user's
Hugging Face datasets cache and its offline switches (``HF_DATASETS_OFFLINE``,
``HF_HUB_OFFLINE``). Offline with nothing cached, the hub step fails with a one-line
:class:`LLMProbeError` that tells the user to pass a local file instead. Local files never
touch ``datasets``. :func:`corpus_manifest` and :func:`windows_manifest` give the manifest
entries that let a run be reproduced.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import numbers
import re
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import LLMProbeError
from .paths import describe_kind, expand_user
from .specs import check_range

# The GPTQ / SparseGPT / Wanda evaluation joins dataset rows with a blank line.
DEFAULT_JOINER = "\n\n"

PURPOSES = ("eval", "calibration")

# Hub layouts. WikiText is stored as one parquet file per split under its config folder.
WIKITEXT_REPO = "Salesforce/wikitext"
WIKITEXT_CONFIG = "wikitext-2-raw-v1"
WIKITEXT_SPLITS = {"eval": "test", "calibration": "train"}

C4_REPO = "allenai/c4"
C4_FILES = {
    "calibration": ("train", "en/c4-train.00000-of-01024.json.gz"),
    "eval": ("validation", "en/c4-validation.00000-of-00008.json.gz"),
}
# A C4 shard holds ~45k (validation) to ~356k (train) documents, far more text than any
# calibration or evaluation run consumes; tokenizing all of it would take minutes and gigabytes.
# Evaluation keeps the first 1,100 validation documents, the slice GPTQ evaluates on; calibration
# keeps the first 5,000 training documents (~2.5M tokens, ten times what 128 x 2048 windows need).
C4_MAX_ROWS = {"eval": 1100, "calibration": 5000}

# Accepted spellings of the named datasets, mapped to the canonical name.
DATASET_NAMES = {"wikitext2": "wikitext2", "wikitext-2": "wikitext2", "wikitext": "wikitext2", "c4": "c4"}

FILE_FORMATS = ".txt, .jsonl, .json, .parquet (optionally .jsonl.gz / .json.gz) or wiki.*.raw"

# Local files named like the original WikiText release (wiki.test.raw, wiki.train.raw, ...).
_WIKI_RAW = re.compile(r"^wiki\..+\.raw$", re.IGNORECASE)


@dataclass
class Corpus:
    """Rows of text from one dataset split or file.

    ``name`` is ``"wikitext2"``, ``"c4"`` or the path as given; ``split`` is the hub split
    (``"train"``, ``"test"``, ``"validation"``) or ``"file"`` for local files. ``sha256`` (also
    ``text_sha256``) is the hex digest of ``text()`` (default joiner) in UTF-8 and is filled in
    automatically; it identifies the text tokenized, not the file (``file_sha256``).
    """

    name: str
    split: str
    rows: list[str]
    sha256: str = field(default="")
    # SHA-256 of the data file's bytes (local files; None for hub corpora, see ``source``).
    file_sha256: str | None = None
    # Where a hub corpus came from: repo, config, data_files, split (None for local files).
    source: dict | None = None

    def __post_init__(self):
        if not self.sha256:
            self.sha256 = hashlib.sha256(self.text().encode("utf-8")).hexdigest()

    @property
    def text_sha256(self) -> str:
        """SHA-256 of ``text()`` in UTF-8: the text that is tokenized (``sha256`` is its old name)."""
        return self.sha256

    def text(self, joiner: str = DEFAULT_JOINER) -> str:
        """The rows joined with ``joiner`` (``"\\n\\n"``, as the GPTQ/Wanda evaluation does)."""
        return joiner.join(self.rows)


def bytes_in_text(corpus: Corpus, joiner: str = DEFAULT_JOINER) -> int:
    """UTF-8 byte count of ``corpus.text(joiner)``: the denominator of bits per byte.

    When evaluation scores only part of the tokens (tail dropped, ``--max-windows``), scale
    this by the scored fraction of tokens before dividing, or the bits per byte come out low.
    """
    return len(corpus.text(joiner).encode("utf-8"))


def bits_per_byte(nll_sum_nats: float, n_bytes: float) -> float:
    """Total negative log-likelihood (natural log, summed over scored tokens) in bits per byte."""
    if n_bytes <= 0:
        raise LLMProbeError(f"bits per byte needs a positive byte count, got {n_bytes}")
    return float(nll_sum_nats) / math.log(2) / float(n_bytes)


# --------------------------------------------------------------------------------------------
# Loading


def load_corpus(dataset: str, purpose: str = "eval") -> Corpus:
    """Load ``dataset`` for ``purpose`` (``"eval"`` or ``"calibration"``).

    ``dataset`` is a hub name or a local file:

    - ``"wikitext2"``: hub ``Salesforce/wikitext`` config ``wikitext-2-raw-v1``; the test split
      for eval, the train split for calibration. Rows are kept exactly as on the hub (including
      the empty ones) so ``"\\n\\n".join(rows)`` is the text GPTQ evaluates.
    - ``"c4"``: hub ``allenai/c4``, the first validation shard for eval (first 1,100 documents)
      and the first train shard for calibration (first 5,000 documents); see ``C4_MAX_ROWS``.
    - a path: ``.txt`` is one row (the whole file); ``.jsonl`` / ``.json`` give the ``"text"``
      field of each record (a ``.json`` may hold a list of records, ``{"text": [...]}``,
      ``{"text": "..."}`` or JSON lines); ``.parquet`` gives its ``text`` column; a file named
      ``wiki.*.raw`` gives WikiText rows (each non-empty line, line ending removed, plus
      ``"\\n"``, which is how the hub stores them). ``.gz`` compressed JSON files are read too.
      The split of a file is ``"file"`` whatever the purpose.
    """
    if purpose not in PURPOSES:
        raise LLMProbeError(f"unknown data purpose {purpose!r}: use one of {', '.join(PURPOSES)}")
    if not isinstance(dataset, (str, Path)) or not str(dataset).strip():
        raise LLMProbeError(f"--dataset must be {_accepted()}, got {dataset!r}")
    key = str(dataset).strip()
    canonical = DATASET_NAMES.get(key.lower())
    # Named datasets win over a same-named file in the working directory; write ./c4 for that.
    if canonical == "wikitext2":
        corpus = _load_wikitext_hub(purpose)
    elif canonical == "c4":
        corpus = _load_c4_hub(purpose)
    else:
        corpus = _load_file(key)
    if not any(row.strip() for row in corpus.rows):
        raise LLMProbeError(f"{corpus.name} contains no text")
    return corpus


def _accepted() -> str:
    return f"'wikitext2', 'c4' or a path to a {FILE_FORMATS} file"


def _hub_dataset(repo: str, *, config: str | None = None, data_files: dict | None = None, split: str,
                 label: str, local_hint: str):
    """One split of a hub dataset through ``datasets.load_dataset`` (the user's datasets cache)."""
    try:
        import datasets
    except ImportError:
        raise LLMProbeError(f"reading {label} needs the package datasets (pip install datasets); "
                            f"or pass a local file, e.g. --dataset {local_hint}") from None
    from . import progress

    if progress.is_quiet():
        datasets.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset = datasets.load_dataset(repo, config, data_files=data_files, split=split)
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:
        # Offline, datasets raises ConnectionError / FileNotFoundError / hub errors; a gated or
        # missing file raises HTTP errors. All of them have the same remedy.
        raise LLMProbeError(f"cannot get {label} from the Hugging Face hub ({type(exc).__name__}; offline?): "
                            f"go online or pass a local file, e.g. --dataset {local_hint}") from None
    columns = list(getattr(dataset, "column_names", None) or [])
    if "text" not in columns:
        raise LLMProbeError(f"{label} has no 'text' column (columns: {', '.join(columns) or 'none'})")
    return dataset


def _text_rows(dataset, max_rows: int | None = None) -> list[str]:
    if max_rows is not None and len(dataset) > max_rows:
        dataset = dataset.select(range(max_rows))
    return [row for row in list(dataset["text"]) if row is not None]


def _load_wikitext_hub(purpose: str) -> Corpus:
    split = WIKITEXT_SPLITS[purpose]
    dataset = _hub_dataset(WIKITEXT_REPO, config=WIKITEXT_CONFIG, split=split,
                           label=f"{WIKITEXT_REPO} ({WIKITEXT_CONFIG}, {split})",
                           local_hint=f"path/to/wiki.{split}.raw")
    return Corpus(name="wikitext2", split=split, rows=_text_rows(dataset),
                  source={"repo": WIKITEXT_REPO, "config": WIKITEXT_CONFIG, "split": split})


def _load_c4_hub(purpose: str) -> Corpus:
    split, filename = C4_FILES[purpose]
    dataset = _hub_dataset(C4_REPO, data_files={split: filename}, split=split, label=f"{C4_REPO}/{filename}",
                           local_hint=f"path/to/{Path(filename).name}")
    return Corpus(name="c4", split=split, rows=_text_rows(dataset, C4_MAX_ROWS[purpose]),
                  source={"repo": C4_REPO, "data_files": filename, "split": split, "rows": C4_MAX_ROWS[purpose]})


def _load_file(dataset: str) -> Corpus:
    path = expand_user(dataset, "--dataset")
    if not path.exists():
        if Path(dataset).suffix or "/" in dataset or "\\" in dataset:
            raise LLMProbeError(f"dataset file not found: {dataset}")
        raise LLMProbeError(f"unknown dataset {dataset!r}: use {_accepted()}")
    if path.is_dir():
        raise LLMProbeError(f"--dataset {dataset} is a directory: give one {FILE_FORMATS} file")
    mode = path.stat().st_mode
    if not stat.S_ISREG(mode):
        # A named pipe would block the read forever, a device would never end: plain files only.
        raise LLMProbeError(f"--dataset {dataset} is {describe_kind(mode)}: give a regular {FILE_FORMATS} file")
    name = path.name.lower()
    compressed = name.endswith(".gz")
    base = name[:-3] if compressed else name
    suffix = Path(base).suffix
    if _WIKI_RAW.match(base) and not compressed:
        rows = _read_wiki_raw(path, dataset)
    elif suffix == ".txt" and not compressed:
        rows = [_read_text(path, dataset)]
    elif suffix == ".parquet" and not compressed:
        rows = _read_parquet(path, label=dataset)
    elif suffix == ".jsonl":
        rows = _read_json_lines(_read_text(path, dataset, gz=compressed), label=dataset)
    elif suffix == ".json":
        rows = _read_json(_read_text(path, dataset, gz=compressed), label=dataset)
    else:
        raise LLMProbeError(f"cannot read {dataset}: unsupported file type, use a {FILE_FORMATS} file")
    return Corpus(name=dataset, split="file", rows=rows, file_sha256=_file_sha256(path))


def _file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _read_text(path: Path, label: str, gz: bool = False) -> str:
    """Whole file as text: UTF-8 (a BOM is dropped) with CRLF / CR turned into LF."""
    try:
        raw = gzip.decompress(path.read_bytes()) if gz else path.read_bytes()
    except (OSError, EOFError) as exc:  # unreadable, or a corrupt / truncated gzip stream
        raise LLMProbeError(f"cannot read {label}: {exc}") from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LLMProbeError(f"{label} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    # Universal newlines, as Python's text mode would do: a tokenizer should never see "\r".
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _read_wiki_raw(path: Path, label: str) -> list[str]:
    """WikiText rows from a raw release file (one row per line, possibly CRLF-terminated).

    The hub stores each row with its trailing "\\n" (" = Robert Boulter = \\n"), and the raw
    file holds the same rows without the blank ones, so adding "\\n" back to every non-empty
    line rebuilds the hub rows; "\\n\\n".join then equals the hub text up to the blank rows.
    Only the line terminator is removed: trailing spaces are part of the WikiText row.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise LLMProbeError(f"cannot read {label}: {exc}") from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LLMProbeError(f"{label} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    rows = []
    for line in text.split("\n"):
        line = line.rstrip("\r\n")
        if line.strip():
            rows.append(line + "\n")
    return rows


def _read_parquet(path: Path, label: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        if "text" not in schema.names:
            raise LLMProbeError(
                f"{label} contains no text: no 'text' column (columns: {', '.join(schema.names) or 'none'})"
            )
        column = pq.read_table(path, columns=["text"]).column("text")
    except LLMProbeError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise LLMProbeError(
            f"cannot read {label} as parquet: {str(exc).splitlines()[0] if str(exc) else exc!r}"
        ) from exc
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise LLMProbeError(f"{label}: the 'text' column holds {column.type}, not strings")
    # Null cells are missing rows, not empty strings; drop them.
    return [value for value in column.to_pylist() if value is not None]


def _text_of(record, label: str, where: str) -> str | None:
    """The "text" field of one JSON record (None for a null value)."""
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise LLMProbeError(
            f"{label}: {where} is a JSON {type(record).__name__}, expected an object with a 'text' field"
        )
    if "text" not in record:
        raise LLMProbeError(f"{label} contains no text: {where} has no 'text' field")
    value = record["text"]
    if value is not None and not isinstance(value, str):
        raise LLMProbeError(f"{label}: the 'text' field of {where} is a {type(value).__name__}, not a string")
    return value


def _read_json_lines(text: str, label: str) -> list[str]:
    return _json_lines_rows(io.StringIO(text), label, max_rows=None)


def _json_lines_rows(lines, label: str, max_rows: int | None) -> list[str]:
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LLMProbeError(f"{label}: line {number} is not valid JSON ({exc.msg})") from exc
        value = _text_of(record, label, f"line {number}")
        if value is not None:
            rows.append(value)
        if max_rows is not None and len(rows) >= max_rows:
            break
    return rows


def _read_json(text: str, label: str) -> list[str]:
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":
            # Several top-level values: the file is JSON lines under a .json name.
            return _read_json_lines(text, label)
        raise LLMProbeError(f"{label} is not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if isinstance(data, list):
        rows = [_text_of(record, label, f"record {i}") for i, record in enumerate(data)]
        return [row for row in rows if row is not None]
    if isinstance(data, dict):
        if "text" not in data:
            raise LLMProbeError(f"{label} contains no text: no 'text' field")
        value = data["text"]
        if isinstance(value, str):
            return [value]
        # Column layout {"text": [...]}, as a dataframe's to_json(orient="list") writes.
        if isinstance(value, list) and all(v is None or isinstance(v, str) for v in value):
            return [v for v in value if v is not None]
        raise LLMProbeError(f"{label}: 'text' must be a string or a list of strings")
    raise LLMProbeError(f"{label} contains no text: expected a list of records or an object with 'text'")


# --------------------------------------------------------------------------------------------
# Tokenization


def tokenize_corpus(corpus: Corpus, tokenizer, *, add_bos: bool | None = None) -> torch.Tensor:
    """1-D LongTensor of the ids of ``corpus.text()``, tokenized in one call (GPTQ protocol).

    ``add_bos=None`` keeps the tokenizer's default special tokens (a Llama tokenizer adds BOS, a
    GPT-2 one adds nothing). ``True`` tokenizes without special tokens and puts exactly one BOS
    in front; ``False`` tokenizes without any special tokens (no BOS, no appended EOS).
    Accepts a transformers tokenizer or a bare ``tokenizers.Tokenizer``.
    """
    text = corpus.text()
    special = add_bos is None
    if _is_backend_tokenizer(tokenizer):
        ids = list(tokenizer.encode(text, add_special_tokens=special).ids)
        bos_id = _bos_of_backend(tokenizer)
    else:
        # verbose=False: the whole corpus is far longer than model_max_length on purpose (it is
        # cut into windows afterwards), so the "sequence too long" warning would only mislead.
        ids = list(tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"])
        bos_id = getattr(tokenizer, "bos_token_id", None)
    if add_bos:
        if bos_id is None:
            raise LLMProbeError("add_bos was requested but the tokenizer has no BOS token")
        if not ids or ids[0] != bos_id:
            ids.insert(0, bos_id)
    if not ids:
        raise LLMProbeError(f"{corpus.name} tokenizes to no tokens")
    return torch.tensor(ids, dtype=torch.long)


def _is_backend_tokenizer(tokenizer) -> bool:
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return False
    return isinstance(tokenizer, Tokenizer)


def _bos_of_backend(tokenizer):
    for token in ("<s>", "<|begin_of_text|>", "<bos>", "<|endoftext|>"):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    return None


# --------------------------------------------------------------------------------------------
# Windows


@dataclass(eq=False)
class Window:
    """One evaluation window.

    ``input_ids`` is a 1-D view into the corpus ids starting at ``start``. The last
    ``n_scored`` tokens of the window are the prediction targets (each predicted from the
    tokens before it in the window); the earlier tokens are context only. ``n_scored`` is
    always at most ``len(input_ids) - 1`` because the first token has nothing to predict it.
    """

    input_ids: torch.Tensor
    n_scored: int
    start: int

    @property
    def end(self) -> int:
        """Offset in the corpus ids just past the window."""
        return self.start + int(self.input_ids.numel())

    def labels(self, ignore_index: int = -100) -> torch.Tensor:
        """Labels for a Hugging Face causal LM (which shifts them itself): ``ignore_index`` on
        every position that is not a target, the token id on the last ``n_scored``."""
        labels = self.input_ids.clone()
        labels[: labels.numel() - self.n_scored] = ignore_index
        return labels


def _int_option(value, flag: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise LLMProbeError(f"{flag} must be an integer, got {value!r}")
    check_range(flag, value, low=minimum)
    return int(value)


def _flat_ids(ids) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        raise LLMProbeError(f"token ids must be a torch tensor, got {type(ids).__name__}")
    if ids.dim() == 2 and ids.shape[0] == 1:  # tokenizer(..., return_tensors="pt") shape
        ids = ids[0]
    if ids.dim() != 1:
        raise LLMProbeError(f"token ids must be 1-D, got shape {tuple(ids.shape)}")
    return ids.long()


def eval_windows(
    ids: torch.Tensor, seqlen: int, stride: int | None = None, max_windows: int | None = None
) -> list[Window]:
    """Perplexity windows over the 1-D token ids ``ids`` (length N).

    Default (``stride=None``), the GPTQ/Wanda protocol: ``N // seqlen`` non-overlapping windows,
    window i = ``ids[i*seqlen:(i+1)*seqlen]``, the tail shorter than ``seqlen`` dropped; every
    target in a window is scored (``n_scored = seqlen - 1``: all tokens but the window's first).

    With ``stride=S`` (1 <= S <= seqlen), the sliding-window protocol of the Hugging Face
    perplexity guide: window k starts at ``k*S`` and ends at ``e_k = min(k*S + seqlen, N)``;
    the last window is the first one that reaches N (so it may be shorter than ``seqlen``).
    Window 0 scores all its targets (tokens 1 .. e_0-1); window k > 0 scores the new tokens
    ``[e_{k-1}, e_k)`` only, with the earlier part of the window as context. For S < seqlen the
    scored targets cover every token after the first exactly once and nothing is dropped. For
    S == seqlen the windows do not overlap and a window's first token has no context, so it
    is not scored (``n_scored`` is capped at ``len - 1``): the default protocol with the tail
    kept as a last shorter window.

    ``max_windows`` keeps only the first that many windows (quick runs).
    Errors: seqlen < 2, stride outside 1..seqlen, max_windows < 1, fewer than seqlen tokens.
    """
    ids = _flat_ids(ids)
    seqlen = _int_option(seqlen, "--seqlen", 2)
    if stride is not None:
        stride = _int_option(stride, "--stride", 1)
        if stride > seqlen:
            raise LLMProbeError(f"--stride {stride} is larger than --seqlen {seqlen}; use a stride <= seqlen")
    if max_windows is not None:
        max_windows = _int_option(max_windows, "--max-windows", 1)
    n_tokens = int(ids.numel())
    if n_tokens < seqlen:
        raise LLMProbeError(
            f"the evaluation text has only {n_tokens} tokens, fewer than --seqlen {seqlen}; "
            "use a smaller --seqlen or a longer text"
        )
    limit = max_windows if max_windows is not None else n_tokens  # at most N windows either way

    if stride is None:
        count = min(n_tokens // seqlen, limit)
        return [Window(ids[i * seqlen : (i + 1) * seqlen], seqlen - 1, i * seqlen) for i in range(count)]

    windows: list[Window] = []
    begin, prev_end = 0, 0
    while len(windows) < limit:
        end = min(begin + seqlen, n_tokens)
        chunk = ids[begin:end]
        # New tokens since the previous window; the first token of a window can never be a target.
        n_scored = min(end - prev_end, end - begin - 1)
        windows.append(Window(chunk, n_scored, begin))
        if end == n_tokens:
            break
        prev_end = end
        begin += stride
    return windows


def calibration_offsets(n_tokens: int, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """Start offsets of the calibration windows: ``nsamples`` draws, uniform over every start
    that keeps a full window (0 .. n_tokens - seqlen).

    The draws come from NumPy's PCG64 bit generator seeded with ``seed`` (through SeedSequence),
    reduced modulo the number of starts. Only the raw bit stream is used, which NumPy keeps
    identical across versions and platforms (unlike the ``Generator`` sampling methods, whose
    algorithms may change), so the same seed gives the same windows on every machine. The
    modulo bias is below n_starts / 2**64, i.e. nil.
    """
    n_starts = n_tokens - seqlen + 1
    raw = np.random.PCG64(seed).random_raw(nsamples)
    return torch.from_numpy((raw % np.uint64(n_starts)).astype(np.int64))


def calibration_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``[nsamples, seqlen]`` LongTensor of calibration windows at seeded random offsets.

    Every window is a full ``seqlen`` slice of ``ids`` (no padding, ever). Offsets are drawn
    independently (see :func:`calibration_offsets`), so windows may overlap or repeat, as in
    GPTQ's sampler; the corpus needs at least ``seqlen + 1`` tokens so there is more than one
    possible window. The same ids, nsamples, seqlen and seed give the same tensor everywhere.
    """
    ids = _flat_ids(ids)
    nsamples = _int_option(nsamples, "--nsamples", 1)
    seqlen = _int_option(seqlen, "--seqlen", 1)
    seed = _int_option(seed, "--seed", 0)
    n_tokens = int(ids.numel())
    if n_tokens < seqlen + 1:
        raise LLMProbeError(
            f"the calibration text has only {n_tokens} tokens, fewer than --seqlen {seqlen} + 1; "
            "use a smaller --seqlen or a longer text"
        )
    offsets = calibration_offsets(n_tokens, nsamples, seqlen, seed)
    index = offsets[:, None] + torch.arange(seqlen, dtype=torch.long)[None, :]
    return ids[index]


def load_calibration(
    dataset: str, tokenizer, nsamples: int, seqlen: int, seed: int = 0, *, add_bos: bool | None = None
) -> tuple[torch.Tensor, Corpus]:
    """Calibration windows ``[nsamples, seqlen]`` from ``dataset`` (its calibration split) and the
    corpus they came from (for the manifest)."""
    # Check the options before the (slow) load and tokenization, so a typo fails at once.
    _int_option(nsamples, "--nsamples", 1)
    _int_option(seqlen, "--seqlen", 1)
    _int_option(seed, "--seed", 0)
    corpus = load_corpus(dataset, purpose="calibration")
    ids = tokenize_corpus(corpus, tokenizer, add_bos=add_bos)
    return calibration_windows(ids, nsamples, seqlen, seed), corpus


# --------------------------------------------------------------------------------------------
# Reproducibility: what the manifest records about the data


def ids_sha256(ids: torch.Tensor) -> str:
    """SHA-256 of token ids as little-endian int64 bytes (any shape, row-major)."""
    array = np.ascontiguousarray(ids.detach().to("cpu", torch.long).numpy().astype("<i8"))
    return hashlib.sha256(array.tobytes()).hexdigest()


def corpus_manifest(corpus: Corpus) -> dict:
    """Manifest entry for a corpus: where it came from and the two hashes a rerun checks.

    ``file_sha256``: the data file's bytes (local files; None for hub corpora, whose ``source``
    names repo / config / data_files / split instead). ``text_sha256``: the text actually
    tokenized (rows joined with a blank line), which also covers how the file was parsed.
    """
    return {"name": corpus.name, "split": corpus.split, "rows": len(corpus.rows),
            "file_sha256": corpus.file_sha256, "text_sha256": corpus.text_sha256, "source": corpus.source}


def windows_manifest(ids: torch.Tensor, starts, seqlen: int, windows: torch.Tensor | None = None, *,
                     joiner: str = DEFAULT_JOINER) -> dict:
    """Manifest entry for the windows a run used.

    ``corpus_tokens`` and ``token_ids_sha256`` identify the tokenized corpus (ids as int64 LE);
    ``window_starts`` are the offsets of the windows in those ids (eval windows' ``start`` or
    the calibration offsets) and ``window_length`` the tokens per window, which is enough to
    rebuild every window; ``window_ids_sha256`` hashes the ids actually fed (given ``windows``:
    a 2-D tensor, or a list of :class:`Window`).
    """
    flat = _flat_ids(ids)
    starts_list = [int(x) for x in (starts.tolist() if isinstance(starts, torch.Tensor) else starts)]
    info = {"corpus_tokens": int(flat.numel()), "token_ids_sha256": ids_sha256(flat),
            "window_length": int(seqlen), "window_count": len(starts_list), "window_starts": starts_list,
            "joiner": joiner}
    if windows is not None:
        if isinstance(windows, torch.Tensor):
            fed = windows
        else:
            fed = torch.cat([w.input_ids for w in windows]) if windows else torch.zeros(0, dtype=torch.long)
        info["window_ids_sha256"] = ids_sha256(fed)
    return info


def eval_windows_manifest(ids: torch.Tensor, windows: list[Window], seqlen: int) -> dict:
    """:func:`windows_manifest` for :func:`eval_windows` output (starts and scored counts)."""
    info = windows_manifest(ids, [w.start for w in windows], seqlen, windows)
    info["window_scored"] = [int(w.n_scored) for w in windows]
    return info
