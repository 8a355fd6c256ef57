"""Tokenizers: the tiny offline byte-level BPE (vocab 512, for `presets.llm("tiny")`), loading any
HF tokenizer (with the `<ecg>` placeholder, or as it is for a sentinel placeholder), and growing a
tokenizer by new tokens (the stage-2 `[ECG0]..[ECG{N-1}]`).

Real models use their checkpoint's tokenizer (`AutoTokenizer.from_pretrained(path)`); everything here
takes any HF tokenizer. The chat format and the ids built from it live in `data.chat_format`.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from uniecg_jax.data import bundled_samples_dir, conversations, load_bundled_records, synthetic
from uniecg_jax.data.chat_format import ECG_PLACEHOLDER, GENERATION_REQUEST, VICUNA, \
    ecg_token_names

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
# Order fixes the ids: pad 0, bos 1, eos 2 match presets.llm("tiny").
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, ECG_PLACEHOLDER)
TINY_VOCAB_SIZE = 512
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")


def copy_tokenizer_files(src_dir: str | None, out_dir: str) -> list[str]:
    """Copies the known tokenizer files from src_dir to out_dir; returns the copied names. (Here
    rather than in `convert/`, so that `checkpoint.py` saves a tokenizer without importing it.)"""
    copied = []
    if not src_dir or not os.path.isdir(src_dir):
        return copied
    os.makedirs(out_dir, exist_ok=True)
    for name in TOKENIZER_FILES:
        path = os.path.join(src_dir, name)
        if os.path.isfile(path):
            shutil.copy2(path, os.path.join(out_dir, name))
            copied.append(name)
    return copied


def tiny_tokenizer_dir() -> pathlib.Path:
    return pathlib.Path(__file__).resolve().parents[1] / "assets" / "tokenizer_tiny"


def load_tiny():
    """The committed tiny tokenizer as a `transformers.PreTrainedTokenizerFast`."""
    # transformers: heavy import (several s), deferred until a tokenizer is actually loaded
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(tiny_tokenizer_dir()))


def load_tokenizer(path: str | None = None, placeholder: str = "token"):
    """`path` None -> the tiny tokenizer; otherwise `AutoTokenizer.from_pretrained(path)` (offline),
    with the `<ecg>` placeholder added if the checkpoint lacks it and `placeholder` is "token" (a
    "sentinel" placeholder, as GEM's, needs no token: the vocabulary stays as released)."""
    if path is None:
        return load_tiny()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if placeholder == "token":
        # Grown like every other added token (`add_tokens`): `add_special_tokens` with
        # additional_special_tokens would also replace a checkpoint's own special-token list.
        add_tokens(tokenizer, [ECG_PLACEHOLDER])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


# tokenizer_config.json classes that are a plain `tokenizer.json` with no Python-side behaviour, so
# `tokenizers` alone reproduces them (what `save_pretrained` of the tiny tokenizer writes).
_PLAIN_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


class PlainTokenizer:
    """A `tokenizer.json` tokenizer through `tokenizers` alone, with the part of the HF tokenizer
    API that serving uses (encode, decode, token <-> id, special-token ids, vocab). Loading it
    skips importing `transformers` (~10 s of a short `uniecg interpret` call). Ids and decoded text
    equal `transformers`' for the same files (tests/test_bad_input.py checks it)."""

    def __init__(self, directory: str, config: dict):
        self.core = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
        self.name_or_path = directory
        for role in ("bos", "eos", "pad", "unk"):
            token = config.get(f"{role}_token")
            token = token.get("content") if isinstance(token, dict) else token
            setattr(self, f"{role}_token", token)
            setattr(self, f"{role}_token_id", None if token is None else self.core.token_to_id(token))

    def convert_tokens_to_ids(self, token: str) -> int | None:
        token_id = self.core.token_to_id(token)
        return self.unk_token_id if token_id is None else token_id

    def convert_ids_to_tokens(self, token_id: int) -> str | None:
        return self.core.id_to_token(int(token_id))

    def get_vocab(self) -> dict[str, int]:
        return self.core.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        return self.core.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.core.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.core.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __call__(self, text: str, add_special_tokens: bool = True,
                 return_offsets_mapping: bool = False) -> dict:
        """`{"input_ids", "offset_mapping"?}` of one string, as the HF fast tokenizer's call
        (offsets come from the same `tokenizers` encoding)."""
        encoding = self.core.encode(text, add_special_tokens=add_special_tokens)
        out = {"input_ids": encoding.ids}
        if return_offsets_mapping:
            out["offset_mapping"] = [tuple(span) for span in encoding.offsets]
        return out


def load_serving_tokenizer(path: str | None = None, placeholder: str = "token"):
    """The tokenizer `load_tokenizer(path, placeholder)` returns, as a `PlainTokenizer` when the
    files allow it (a plain tokenizer.json with a pad token that already holds `<ecg>` where the
    placeholder is a token: the tiny one and what training saves), else through `transformers`.
    For inference, which never grows the vocabulary."""
    directory = str(tiny_tokenizer_dir()) if path is None else path
    try:
        with open(os.path.join(directory, "tokenizer_config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        config = {}
    if (config.get("tokenizer_class") in _PLAIN_TOKENIZER_CLASSES
            and os.path.isfile(os.path.join(directory, "tokenizer.json"))
            and not config.get("clean_up_tokenization_spaces")):
        tokenizer = PlainTokenizer(directory, config)
        if tokenizer.pad_token_id is not None and (placeholder != "token"
                                                   or ECG_PLACEHOLDER in tokenizer.get_vocab()):
            return tokenizer
    return load_tokenizer(path, placeholder=placeholder)


def add_tokens(tokenizer, names: Sequence[str]) -> tuple[list[int], list[int]]:
    """Adds `names` to `tokenizer` (in place) as special tokens, as LLaVA adds its image tokens
    (`tokenizer.add_tokens(..., special_tokens=True)`, llava/model/llava_arch.py
    initialize_vision_tokenizer). Names already present keep their ids.
    Returns (ids of `names` in order, ids of the names that were new)."""
    vocab = tokenizer.get_vocab()
    new = [name for name in names if name not in vocab]
    if new:
        tokenizer.add_tokens(new, special_tokens=True)
    ids = [int(tokenizer.convert_tokens_to_ids(name)) for name in names]
    return ids, [ids[list(names).index(name)] for name in new]


def add_ecg_tokens(tokenizer, count: int) -> list[int]:
    """Grows `tokenizer` (in place, once) by `[ECG0]..[ECG{count-1}]`; returns their ids, in order.
    The model's embedding grows with `convert.hf_llm.add_tokens` (same tokenizer call)."""
    return add_tokens(tokenizer, ecg_token_names(count))[0]


# A numeral token: ASCII digits, after at most one word-start marker (byte-level BPE's "Ġ",
# SentencePiece's "▁", or a plain space).
_NUMERAL = re.compile(r"([ \u0120\u2581]?)([0-9]+)")


def numeral_pieces(tokenizer) -> tuple[tuple[int, str], ...]:
    """(id, text) of every token of `tokenizer` that is a run of digits, the word-start marker
    written as a space: `(282, " 1"), (20, "0")`. The table the attribute head reads numbers
    written in digits with (`models.alignment.number_features`; kept in the model's config as
    `model.attributes.numerals`, set by `train.stage2.finalize_stage2_config`)."""
    pieces = []
    for token_id in range(len(tokenizer)):
        match = _NUMERAL.fullmatch(tokenizer.convert_ids_to_tokens(token_id) or "")
        if match:
            pieces.append((token_id, (" " if match.group(1) else "") + match.group(2)))
    return tuple(pieces)


def training_corpus() -> list[str]:
    """Texts the tiny BPE is trained on: bundled diagnosis names, SCP descriptions, PTB-XL reports,
    synthetic reports, conversation templates and answers."""
    import pandas as pd  # ~1 s to import; only training the tiny BPE reads these tables

    root = bundled_samples_dir()
    texts = []
    for name in ("dx_mapping_scored.csv", "dx_mapping_unscored.csv"):
        texts += pd.read_csv(root / name)["Dx"].astype(str).tolist()
    texts += pd.read_csv(root / "scp_statements.csv")["description"].astype(str).tolist()
    texts += pd.read_csv(root / "ptbxl_database_ecg6000-6009.csv")["report"].astype(str).tolist()
    texts += [synthetic.synthetic_report(hr) for hr in range(30, 200)]
    texts += list(conversations.QUESTIONS) + list(conversations.FOLLOW_UP)
    texts += [f"{VICUNA.user_prefix}question{VICUNA.assistant_prefix}answer"]
    for record in load_bundled_records():
        texts += [turn for _, turn in conversations.build_conversation(record, True)]
    texts += [GENERATION_REQUEST + t for t in texts[:50]]
    return texts


def train_tiny(out_dir: str | os.PathLike | None = None, vocab_size: int = TINY_VOCAB_SIZE):
    """Trains the byte-level BPE on `training_corpus()` and saves a PreTrainedTokenizerFast there
    (default: the package's assets/tokenizer_tiny). Returns the tokenizer."""
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    core.train_from_iterator(training_corpus(), trainer=trainer)
    if core.get_vocab_size() != vocab_size:
        raise RuntimeError(f"BPE vocab is {core.get_vocab_size()}, wanted {vocab_size}")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        additional_special_tokens=[ECG_PLACEHOLDER], model_max_length=1024)
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }}"
        "{% else %} ASSISTANT: {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %} ASSISTANT:{% endif %}")
    tokenizer.save_pretrained(str(out_dir or tiny_tokenizer_dir()))
    return tokenizer


def lengths(tokenizer, texts: Sequence[str]) -> np.ndarray:
    """[N] token counts (for choosing a fixed sequence length)."""
    return np.array([len(tokenizer.encode(t, add_special_tokens=False)) if t else 0
                     for t in texts])


if __name__ == "__main__":
    train_tiny()
    print(f"saved {tiny_tokenizer_dir()}")
