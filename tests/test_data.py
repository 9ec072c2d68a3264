"""Tests for llmprobe.core.data: corpus loading, tokenization, evaluation and calibration windows.

Everything runs offline on small files written into tmp_path plus the shared WikiText-2 test
file; window tests use synthetic ids (torch.arange) so they need no tokenizer.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from llmprobe.core import data
from llmprobe.core.data import (
    Corpus,
    Window,
    bits_per_byte,
    bytes_in_text,
    calibration_windows,
    eval_windows,
    load_calibration,
    load_corpus,
    tokenize_corpus,
)
from llmprobe.core.errors import LLMProbeError

WIKI_TEST = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw/wiki.test.raw"
needs_wiki = pytest.mark.skipif(not WIKI_TEST.is_file(), reason="shared WikiText-2 test file not present")


# ------------------------------------------------------------------------------------------
# helpers


def _word_tokenizer(with_bos_template: bool = False):
    """A whitespace word-level tokenizer over a fixed vocab; optionally adds <s> like Llama."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<s>", "</s>", "<unk>", "the", "cat", "sat", "on", "mat", "."]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if with_bos_template:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def wiki_corpus():
    return load_corpus(str(WIKI_TEST))


@pytest.fixture(scope="module")
def wiki_ids(wiki_corpus):
    # Tokenizing 1.3 MB once per module keeps the suite quick on a shared 2-core box.
    from tiny import tiny_tokenizer

    return tokenize_corpus(wiki_corpus, tiny_tokenizer())


# ------------------------------------------------------------------------------------------
# file formats


def test_txt_is_one_row_with_newlines_normalised(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"\xef\xbb\xbfline one\r\nline two\n")
    corpus = load_corpus(str(path))
    assert corpus.rows == ["line one\nline two\n"]
    assert corpus.name == str(path)
    assert corpus.split == "file"
    assert corpus.text() == "line one\nline two\n"


def test_jsonl_text_field(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "first", "id": 1}\n\n{"text": "second"}\n{"text": null}\n', encoding="utf-8")
    corpus = load_corpus(str(path))
    assert corpus.rows == ["first", "second"]
    assert corpus.text() == "first\n\nsecond"


def test_jsonl_gz(tmp_path):
    path = tmp_path / "c4-validation.00000-of-00008.json.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for i in range(3):
            handle.write(json.dumps({"text": f"doc {i}", "url": "u"}) + "\n")
    assert load_corpus(str(path)).rows == ["doc 0", "doc 1", "doc 2"]


@pytest.mark.parametrize(
    "payload, rows",
    [
        ([{"text": "a"}, {"text": "b"}], ["a", "b"]),
        ({"text": ["a", "b"]}, ["a", "b"]),
        ({"text": "only"}, ["only"]),
    ],
)
def test_json_layouts(tmp_path, payload, rows):
    path = tmp_path / "a.json"
    path.write_text(json.dumps(payload), encoding="utf-8")
    assert load_corpus(str(path)).rows == rows


def test_json_holding_json_lines(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('{"text": "a"}\n{"text": "b"}\n', encoding="utf-8")
    assert load_corpus(str(path)).rows == ["a", "b"]


def test_parquet_text_column(tmp_path):
    path = tmp_path / "a.parquet"
    pd.DataFrame({"text": ["x", "", "y"], "other": [1, 2, 3]}).to_parquet(path)
    corpus = load_corpus(str(path))
    # Rows are kept verbatim (empty ones too) so a local copy of the hub parquet file gives
    # exactly the hub text.
    assert corpus.rows == ["x", "", "y"]
    assert corpus.text() == "x\n\n\n\ny"


def test_wiki_raw_rows(tmp_path):
    path = tmp_path / "wiki.x.raw"
    path.write_bytes(b" = T = \r\n\r\n body line . \r\n   \r\n last\r\n")
    corpus = load_corpus(str(path))
    assert corpus.rows == [" = T = \n", " body line . \n", " last\n"]
    assert corpus.split == "file"


@needs_wiki
def test_wikitext_file_rebuilds_hub_rows(wiki_corpus):
    assert len(wiki_corpus.rows) == 2891
    text = wiki_corpus.text()
    assert text.startswith(" = Robert Boulter = \n\n\n Robert Boulter is an English film")
    assert all(row.endswith("\n") and row.strip() for row in wiki_corpus.rows)
    assert "\r" not in text
    # The file is the hub rows plus "\r\n"; undoing that recovers the file bytes exactly.
    rebuilt = "".join(row[:-1] + "\r\n" for row in wiki_corpus.rows).encode("utf-8")
    assert (
        hashlib.sha256(rebuilt).hexdigest()
        == "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"
    )


@needs_wiki
def test_hash_is_of_joined_text_and_stable(wiki_corpus):
    assert wiki_corpus.sha256 == hashlib.sha256(wiki_corpus.text().encode("utf-8")).hexdigest()
    assert load_corpus(str(WIKI_TEST)).sha256 == wiki_corpus.sha256
    # Pinned so an accidental change to row rebuilding shows up as a changed manifest hash.
    assert wiki_corpus.sha256 == "c5b5caea5bd655cb221545a484f2f0f59d35092a17a66840d7b9513d0b99687d"


def test_hash_depends_on_rows():
    a = Corpus("x", "file", ["a", "b"])
    assert a.sha256 == Corpus("y", "test", ["a", "b"]).sha256
    assert a.sha256 != Corpus("x", "file", ["a", "c"]).sha256
    assert a.sha256 != Corpus("x", "file", ["ab"]).sha256


def test_bytes_and_bits_per_byte():
    corpus = Corpus("x", "file", ["é", "a"])  # é is two bytes in UTF-8
    assert bytes_in_text(corpus) == 2 + 2 + 1
    assert bits_per_byte(5 * math.log(2), 5) == pytest.approx(1.0)
    with pytest.raises(LLMProbeError):
        bits_per_byte(1.0, 0)


# ------------------------------------------------------------------------------------------
# loading errors


def test_unknown_name_lists_accepted():
    with pytest.raises(LLMProbeError, match="wikitext2.*c4"):
        load_corpus("pile")


def test_missing_path():
    with pytest.raises(LLMProbeError, match="not found"):
        load_corpus("no/such/file.txt")


def test_bad_purpose():
    with pytest.raises(LLMProbeError, match="purpose"):
        load_corpus("wikitext2", purpose="training")


@pytest.mark.parametrize("content", [b"", b"  \n\t\r\n  "])
@pytest.mark.parametrize("name", ["a.txt", "wiki.test.raw", "a.jsonl", "a.json"])
def test_empty_or_whitespace_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(LLMProbeError, match="contains no text"):
        load_corpus(str(path))


@pytest.mark.parametrize(
    "name, content",
    [
        ("a.json", '[{"body": "x"}]'),
        ("a.json", '{"body": ["x"]}'),
        ("a.jsonl", '{"body": "x"}\n'),
        ("a.jsonl", '{"text": "   "}\n'),
    ],
)
def test_json_without_text(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(LLMProbeError, match="contains no text"):
        load_corpus(str(path))


def test_parquet_without_text_column(tmp_path):
    path = tmp_path / "a.parquet"
    pd.DataFrame({"body": ["x"]}).to_parquet(path)
    with pytest.raises(LLMProbeError, match="contains no text"):
        load_corpus(str(path))


def test_corrupt_files(tmp_path):
    parquet = tmp_path / "bad.parquet"
    parquet.write_bytes(b"PAR1 this is not parquet")
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"text": "ok"}\n{"text": \n', encoding="utf-8")
    js = tmp_path / "bad.json"
    js.write_text('[{"text": "a"', encoding="utf-8")
    gz = tmp_path / "bad.jsonl.gz"
    gz.write_bytes(b"\x1f\x8b not really gzip")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    for path in (parquet, jsonl, js, gz, latin):
        with pytest.raises(LLMProbeError) as info:
            load_corpus(str(path))
        assert "\n" not in str(info.value)


def test_unsupported_suffix_and_directory(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("text\nx\n")
    with pytest.raises(LLMProbeError, match="unsupported"):
        load_corpus(str(path))
    with pytest.raises(LLMProbeError, match="directory"):
        load_corpus(str(tmp_path))


def test_json_text_of_wrong_type(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": 3}\n', encoding="utf-8")
    with pytest.raises(LLMProbeError, match="not a string"):
        load_corpus(str(path))


# ------------------------------------------------------------------------------------------
# hub paths (offline)


def _offline_load_dataset(*args, **kwargs):
    # What datasets raises offline with nothing cached.
    raise ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub (LocalEntryNotFoundError)")


@pytest.mark.parametrize("name, hint", [("wikitext2", "wiki.test.raw"), ("c4", "c4-validation")])
def test_hub_offline_is_one_clear_line(monkeypatch, name, hint):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", _offline_load_dataset)
    with pytest.raises(LLMProbeError) as info:
        load_corpus(name)
    message = str(info.value)
    assert "\n" not in message
    assert "--dataset" in message and hint in message and "online" in message


def test_hub_offline_real_datasets_path(monkeypatch, tmp_path):
    # The real datasets.load_dataset in offline mode with empty caches: no network is touched.
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(datasets.config, "HF_MODULES_CACHE", tmp_path / "modules")
    with pytest.raises(LLMProbeError, match="local file"):
        load_corpus("wikitext2", purpose="calibration")


class _FakeDataset:
    """The part of a datasets.Dataset the corpus reader uses."""

    def __init__(self, rows):
        self.rows = list(rows)
        self.column_names = ["text", "url"]

    def __len__(self):
        return len(self.rows)

    def select(self, indices):
        return _FakeDataset([self.rows[i] for i in indices])

    def __getitem__(self, column):
        assert column == "text"
        return self.rows


def test_hub_datasets_requested(monkeypatch):
    # What the hub readers ask datasets.load_dataset for, and how they read it.
    calls = []

    def fake_load_dataset(path, name=None, data_files=None, split=None):
        calls.append((path, name, data_files, split))
        if path == "Salesforce/wikitext":
            return _FakeDataset(["", " = A = \n", " body \n"])
        return _FakeDataset([f"doc {i}" for i in range(data.C4_MAX_ROWS["eval"] + 5)])

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    wiki = load_corpus("wikitext2")
    assert (wiki.name, wiki.split, wiki.rows) == ("wikitext2", "test", ["", " = A = \n", " body \n"])
    assert wiki.file_sha256 is None and wiki.source["config"] == "wikitext-2-raw-v1"
    assert load_corpus("wikitext2", purpose="calibration").split == "train"
    c4_eval = load_corpus("c4")
    assert (c4_eval.name, c4_eval.split) == ("c4", "validation")
    assert c4_eval.rows == [f"doc {i}" for i in range(data.C4_MAX_ROWS["eval"])]
    assert load_corpus("c4", purpose="calibration").split == "train"
    assert calls == [
        ("Salesforce/wikitext", "wikitext-2-raw-v1", None, "test"),
        ("Salesforce/wikitext", "wikitext-2-raw-v1", None, "train"),
        ("allenai/c4", None, {"validation": "en/c4-validation.00000-of-00008.json.gz"}, "validation"),
        ("allenai/c4", None, {"train": "en/c4-train.00000-of-01024.json.gz"}, "train"),
    ]


def test_hub_dataset_without_text_column(monkeypatch):
    import datasets

    fake = _FakeDataset(["x"])
    fake.column_names = ["content"]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: fake)
    with pytest.raises(LLMProbeError, match="no 'text' column"):
        load_corpus("c4")


# ------------------------------------------------------------------------------------------
# tokenization


def test_tokenize_joins_rows_once():
    tok = _word_tokenizer()
    corpus = Corpus("x", "file", ["the cat", "sat on the mat ."])
    ids = tokenize_corpus(corpus, tok)
    assert ids.dtype == torch.long and ids.dim() == 1
    assert ids.tolist() == [3, 4, 5, 6, 3, 7, 8]


def test_tokenize_bos_modes():
    corpus = Corpus("x", "file", ["the cat"])
    llama_like = _word_tokenizer(with_bos_template=True)
    assert tokenize_corpus(corpus, llama_like).tolist() == [0, 3, 4]  # tokenizer default
    assert tokenize_corpus(corpus, llama_like, add_bos=False).tolist() == [3, 4]
    assert tokenize_corpus(corpus, llama_like, add_bos=True).tolist() == [0, 3, 4]  # one BOS only
    plain = _word_tokenizer()
    assert tokenize_corpus(corpus, plain).tolist() == [3, 4]
    assert tokenize_corpus(corpus, plain, add_bos=True).tolist() == [0, 3, 4]
    # A bare tokenizers.Tokenizer works too.
    assert tokenize_corpus(corpus, plain.backend_tokenizer, add_bos=True).tolist() == [0, 3, 4]


@needs_wiki
def test_tokenize_real_file_once(wiki_corpus, wiki_ids):
    from tiny import tiny_tokenizer

    assert wiki_ids.dim() == 1 and wiki_ids.numel() > 100_000
    # One call over the joined text equals the tokenizer applied to the joined text.
    head = Corpus("h", "file", wiki_corpus.rows[:20])
    expected = tiny_tokenizer()(head.text())["input_ids"]
    assert tokenize_corpus(head, tiny_tokenizer()).tolist() == expected


# ------------------------------------------------------------------------------------------
# evaluation windows


def _scored_targets(windows: list[Window]) -> list[int]:
    """Absolute positions of every scored target, in order, with a plain loop."""
    targets = []
    for w in windows:
        length = w.input_ids.numel()
        for j in range(length - w.n_scored, length):
            assert j >= 1  # a target always has at least one context token in its window
            targets.append(w.start + j)
    return targets


@pytest.mark.parametrize("n, seqlen", [(100, 10), (105, 10), (109, 10), (10, 10), (37, 8)])
def test_non_overlapping_windows(n, seqlen):
    ids = torch.arange(n)
    windows = eval_windows(ids, seqlen)
    assert len(windows) == n // seqlen
    for i, w in enumerate(windows):
        assert w.start == i * seqlen
        assert w.input_ids.tolist() == list(range(i * seqlen, (i + 1) * seqlen))
        assert w.n_scored == seqlen - 1
        assert w.end == (i + 1) * seqlen
    # Tail dropped: nothing after the last full window is in any window.
    assert windows[-1].end == (n // seqlen) * seqlen


@pytest.mark.parametrize("n", [10, 11, 50, 53, 64, 100, 101])
@pytest.mark.parametrize("seqlen, stride", [(10, 1), (10, 3), (10, 5), (10, 9), (8, 4), (2, 1)])
def test_sliding_windows_cover_every_target_once(n, seqlen, stride):
    ids = torch.arange(n)
    windows = eval_windows(ids, seqlen, stride=stride)
    assert _scored_targets(windows) == list(range(1, n))
    for k, w in enumerate(windows):
        assert w.start == k * stride
        assert 0 < w.input_ids.numel() <= seqlen
        assert w.input_ids.tolist() == list(range(w.start, w.end))
        if k > 0:
            assert w.n_scored <= stride
    assert windows[-1].end == n
    assert windows[0].n_scored == seqlen - 1


def test_sliding_matches_hf_guide_loop():
    # The loop of the Hugging Face perplexity guide, written out: trg_len per window.
    n, seqlen, stride = 47, 10, 4
    guide = []
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + seqlen, n)
        guide.append((begin, end, end - prev_end))
        prev_end = end
        if end == n:
            break
    windows = eval_windows(torch.arange(n), seqlen, stride=stride)
    assert [(w.start, w.end) for w in windows] == [(b, e) for b, e, _ in guide]
    # The guide's first trg_len counts token 0, which the shifted loss never scores.
    assert [w.n_scored for w in windows] == [guide[0][2] - 1] + [t for _, _, t in guide[1:]]


def test_stride_equal_seqlen_keeps_tail():
    windows = eval_windows(torch.arange(25), 10, stride=10)
    assert [(w.start, w.end, w.n_scored) for w in windows] == [(0, 10, 9), (10, 20, 9), (20, 25, 4)]


def test_window_labels():
    w = eval_windows(torch.arange(20), 10, stride=4)[1]
    labels = w.labels()
    assert labels.tolist() == [-100] * 6 + [10, 11, 12, 13]
    assert w.input_ids.tolist()[0] == 4  # labels are a copy; ids untouched


@pytest.mark.parametrize("stride", [None, 3])
def test_max_windows(stride):
    full = eval_windows(torch.arange(100), 10, stride=stride)
    first = eval_windows(torch.arange(100), 10, stride=stride, max_windows=2)
    assert len(first) == 2
    assert [(w.start, w.n_scored) for w in first] == [(w.start, w.n_scored) for w in full[:2]]
    assert len(eval_windows(torch.arange(100), 10, stride=stride, max_windows=10_000)) == len(full)


def test_eval_windows_accept_batch_of_one():
    assert len(eval_windows(torch.arange(30)[None, :], 10)) == 3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"seqlen": 0}, "--seqlen"),
        ({"seqlen": -5}, "--seqlen"),
        ({"seqlen": 1}, "--seqlen"),
        ({"seqlen": 10, "stride": 0}, "--stride"),
        ({"seqlen": 10, "stride": 11}, "larger than --seqlen"),
        ({"seqlen": 10, "max_windows": 0}, "--max-windows"),
        ({"seqlen": 10.5}, "integer"),
        ({"seqlen": 200}, "only 100 tokens, fewer than --seqlen 200"),
        ({"seqlen": 200, "stride": 10}, "only 100 tokens, fewer than --seqlen"),
    ],
)
def test_eval_window_errors(kwargs, match):
    with pytest.raises(LLMProbeError, match=match):
        eval_windows(torch.arange(100), **kwargs)


@needs_wiki
def test_eval_windows_on_real_ids(wiki_ids):
    n = wiki_ids.numel()
    windows = eval_windows(wiki_ids, 2048)
    assert len(windows) == n // 2048
    assert torch.equal(torch.cat([w.input_ids for w in windows]), wiki_ids[: len(windows) * 2048])


# ------------------------------------------------------------------------------------------
# calibration windows


def _check_windows(ids, windows, nsamples, seqlen):
    assert windows.shape == (nsamples, seqlen) and windows.dtype == torch.long
    for row in windows:
        start = int(row[0])  # ids = arange, so the first id is the offset
        assert 0 <= start <= ids.numel() - seqlen
        assert row.tolist() == list(range(start, start + seqlen))


def test_calibration_reproducible_and_full_length():
    ids = torch.arange(5000)
    a = calibration_windows(ids, 16, 64, seed=0)
    b = calibration_windows(ids, 16, 64, seed=0)
    assert torch.equal(a, b)
    _check_windows(ids, a, 16, 64)
    c = calibration_windows(ids, 16, 64, seed=1)
    assert not torch.equal(a, c)
    _check_windows(ids, c, 16, 64)


def test_calibration_pinned_offsets():
    # Pinned values: the same seed must give the same windows on every machine and version.
    offsets = data.calibration_offsets(1000, 5, 10, seed=0)
    assert offsets.tolist() == data.calibration_offsets(1000, 5, 10, seed=0).tolist()
    assert offsets.tolist() == [240, 127, 283, 75, 709]


def test_calibration_covers_both_ends_and_overlaps():
    # A corpus of seqlen + 1 tokens has exactly two possible windows; many draws hit both.
    ids = torch.arange(11)
    windows = calibration_windows(ids, 64, 10, seed=3)
    starts = set(windows[:, 0].tolist())
    assert starts == {0, 1}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"nsamples": 0, "seqlen": 10}, "--nsamples"),
        ({"nsamples": -1, "seqlen": 10}, "--nsamples"),
        ({"nsamples": 4, "seqlen": 0}, "--seqlen"),
        ({"nsamples": 4, "seqlen": 100}, "only 100 tokens"),
        ({"nsamples": 4, "seqlen": 500}, "only 100 tokens"),
        ({"nsamples": 4, "seqlen": 10, "seed": -1}, "--seed"),
    ],
)
def test_calibration_errors(kwargs, match):
    with pytest.raises(LLMProbeError, match=match):
        calibration_windows(torch.arange(100), **kwargs)


def test_load_calibration_from_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(" ".join(["the cat sat on the mat ."] * 20), encoding="utf-8")
    tok = _word_tokenizer()
    windows, corpus = load_calibration(str(path), tok, nsamples=8, seqlen=16, seed=0)
    assert windows.shape == (8, 16)
    assert corpus.name == str(path) and corpus.split == "file"
    again, _ = load_calibration(str(path), tok, nsamples=8, seqlen=16, seed=0)
    assert torch.equal(windows, again)
    with pytest.raises(LLMProbeError, match="--nsamples"):
        load_calibration(str(path), tok, nsamples=0, seqlen=16, seed=0)


@needs_wiki
def test_calibration_on_real_ids(wiki_ids):
    windows = calibration_windows(wiki_ids, 128, 512, seed=0)
    assert windows.shape == (128, 512)
    assert torch.equal(windows, calibration_windows(wiki_ids, 128, 512, seed=0))
