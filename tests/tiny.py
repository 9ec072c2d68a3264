"""Tiny random models and a tiny tokenizer, built offline, for every test in the project.

Everything here is deterministic and small enough to build in milliseconds on a shared 2-core
machine. Nothing is ever downloaded: configs are written in code and the tokenizer is trained on
the first lines of the WikiText-2 test file that ships in the shared data folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

ARCHS = (
    "llama",
    "mistral",
    "qwen2",
    "gemma",
    "phi3",
    "gpt2",
    "gpt_neox",
    "gptj",
    "opt",
    "bloom",
    "falcon",
    "bert",
)

HIDDEN = 32
HEADS = 4
KV_HEADS = 2
INTERMEDIATE = 64
VOCAB = 512
MAX_POSITIONS = 256
NUM_LAYERS = 2

WIKITEXT_TEST = Path(__file__).resolve().parents[1].parent / "shared/data/wikitext-2-raw/wiki.test.raw"

# Special token ids are pinned inside the tiny vocab: several configs default them to ids of the
# real tokenizer (50256, 32000, ...) which would point past the 512-row embedding.
BOS_ID, EOS_ID, PAD_ID, UNK_ID = 0, 1, 2, 3
SPECIAL_TOKENS = ("<s>", "</s>", "<pad>", "<unk>")

# Name of the "number of layers" field per architecture, so callers can say num_layers=N
# without knowing each config's spelling.
_LAYER_FIELD = {"gpt2": "n_layer", "gptj": "n_layer", "bloom": "n_layer"}

_TOKEN_IDS = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}


def _arch_fields(arch: str) -> dict:
    """Config fields for one architecture at the tiny size (hidden 32, 4 heads, ffn 64)."""
    llama_like = dict(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        **_TOKEN_IDS,
    )
    if arch in ("llama", "mistral", "qwen2", "phi3"):
        return llama_like
    if arch == "gemma":
        # Gemma's default head_dim is 256, independent of hidden size; pin it to hidden/heads.
        return dict(llama_like, head_dim=HIDDEN // HEADS)
    if arch == "gpt2":
        return {
            "n_embd": HIDDEN,
            "n_layer": NUM_LAYERS,
            "n_head": HEADS,
            "n_inner": INTERMEDIATE,
            "n_positions": MAX_POSITIONS,
            "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID,
        }
    if arch == "gpt_neox":
        return dict(
            hidden_size=HIDDEN,
            num_hidden_layers=NUM_LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=INTERMEDIATE,
            max_position_embeddings=MAX_POSITIONS,
            **_TOKEN_IDS,
        )
    if arch == "gptj":
        # rotary_dim must not exceed the head dim (32/4 = 8).
        return {
            "n_embd": HIDDEN,
            "n_layer": NUM_LAYERS,
            "n_head": HEADS,
            "n_inner": INTERMEDIATE,
            "n_positions": MAX_POSITIONS,
            "rotary_dim": 4,
            "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID,
        }
    if arch == "opt":
        return dict(
            hidden_size=HIDDEN,
            num_hidden_layers=NUM_LAYERS,
            num_attention_heads=HEADS,
            ffn_dim=INTERMEDIATE,
            word_embed_proj_dim=HIDDEN,
            max_position_embeddings=MAX_POSITIONS,
            **_TOKEN_IDS,
        )
    if arch == "bloom":
        # BLOOM has no ffn-size field: its MLP is always 4 * hidden.
        return dict(hidden_size=HIDDEN, n_layer=NUM_LAYERS, n_head=HEADS, **_TOKEN_IDS)
    if arch == "falcon":
        return dict(
            hidden_size=HIDDEN,
            num_hidden_layers=NUM_LAYERS,
            num_attention_heads=HEADS,
            ffn_hidden_size=INTERMEDIATE,
            max_position_embeddings=MAX_POSITIONS,
            **_TOKEN_IDS,
        )
    if arch == "bert":
        return {
            "hidden_size": HIDDEN,
            "num_hidden_layers": NUM_LAYERS,
            "num_attention_heads": HEADS,
            "intermediate_size": INTERMEDIATE,
            "max_position_embeddings": MAX_POSITIONS,
            "pad_token_id": PAD_ID,
        }
    raise ValueError(f"unknown tiny arch {arch!r}; choose one of {', '.join(ARCHS)}")


def tiny_config(arch: str, **overrides):
    """A transformers config for `arch` at the tiny size. `num_layers=N` works for every arch;
    any other keyword overrides the config field of that name."""
    fields = _arch_fields(arch)
    if "num_layers" in overrides:
        fields[_LAYER_FIELD.get(arch, "num_hidden_layers")] = overrides.pop("num_layers")
    fields["vocab_size"] = VOCAB
    fields.update(overrides)
    return AutoConfig.for_model(arch, **fields)


def tiny_model(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A randomly initialised fp32 model in eval mode; the same seed gives the same weights."""
    config = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    factory = AutoModel if arch == "bert" else AutoModelForCausalLM
    model = factory.from_config(config, dtype=torch.float32)
    return model.eval()


_TOKENIZER = None


def tiny_tokenizer():
    """A byte-level BPE tokenizer with 512 entries, trained once per process on ~200 WikiText lines."""
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = _build_tokenizer()
    return _TOKENIZER


def _build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    with open(WIKITEXT_TEST, encoding="utf-8") as handle:
        lines = [line for _, line in zip(range(200), handle)]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=list(SPECIAL_TOKENS),
        # Seed with the whole byte alphabet so any text encodes without <unk>.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(lines, trainer=trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def _state_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(total bytes, largest single tensor bytes) of the state dict, counting tied tensors once."""
    seen, total, largest = set(), 0, 0
    for tensor in model.state_dict().values():
        key = (tensor.data_ptr(), tensor.shape)
        if key in seen:
            continue
        seen.add(key)
        size = tensor.numel() * tensor.element_size()
        total += size
        largest = max(largest, size)
    return total, largest


def save_tiny_model_dir(arch: str, path, shards: int = 1, **overrides) -> Path:
    """Save a tiny model (safetensors), its config and the tiny tokenizer into `path`.

    With shards > 1 the shard size is set to total/shards so the greedy packer writes at least
    that many files plus a `model.safetensors.index.json`.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    seed = overrides.pop("seed", 0)
    model = tiny_model(arch, seed=seed, **overrides)
    if shards > 1:
        total, _ = _state_bytes(model)
        max_shard_size = max(1, total // shards)
    else:
        max_shard_size = "50GB"
    model.save_pretrained(path, max_shard_size=max_shard_size)
    tiny_tokenizer().save_pretrained(path)
    if shards > 1 and not (path / "model.safetensors.index.json").is_file():
        raise RuntimeError(f"expected a sharded checkpoint in {path}")
    return path


def shard_files(path) -> list[str]:
    """Safetensors shard file names listed in a sharded checkpoint's index."""
    index = json.loads((Path(path) / "model.safetensors.index.json").read_text())
    return sorted(set(index["weight_map"].values()))
