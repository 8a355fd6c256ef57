"""Tokenizers: the tiny offline byte-level BPE (vocab 512, for `presets.llm("tiny")`), the chat
format, and the stage-2 `[ECG0]..[ECG{N-1}]` generation tokens.

Real models use their checkpoint's tokenizer (`AutoTokenizer.from_pretrained(path)`); everything here
takes any HF tokenizer. Chat format (Vicuna-style):
    "<s>" + [system + " "] + "USER: <ecg>\\n{q} ASSISTANT: {a}</s>USER: {q2} ASSISTANT: {a2}</s>"
"""
from __future__ import annotations

import os
import pathlib
from typing import Sequence

import numpy as np

PAD, BOS, EOS, UNK, ECG_PLACEHOLDER = "<pad>", "<s>", "</s>", "<unk>", "<ecg>"
# Order fixes the ids: pad 0, bos 1, eos 2 match presets.llm("tiny").
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, ECG_PLACEHOLDER)
TINY_VOCAB_SIZE = 512
USER_PREFIX, ASSISTANT_PREFIX = "USER: ", " ASSISTANT: "


def tiny_tokenizer_dir() -> pathlib.Path:
    return pathlib.Path(__file__).resolve().parents[1] / "assets" / "tokenizer_tiny"


def load_tiny():
    """The committed tiny tokenizer as a `transformers.PreTrainedTokenizerFast`."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(tiny_tokenizer_dir()))


def load_tokenizer(path: str | None = None):
    """`path` None -> the tiny tokenizer; otherwise `AutoTokenizer.from_pretrained(path)` (offline),
    with the `<ecg>` placeholder added if the checkpoint lacks it."""
    if path is None:
        return load_tiny()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if ECG_PLACEHOLDER not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [ECG_PLACEHOLDER]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def add_ecg_generation_tokens(tokenizer, num_tokens: int) -> list[int]:
    """Adds `[ECG0]..[ECG{num_tokens-1}]` as special tokens (stage 2) and returns their ids, in
    order. Idempotent. The model's embedding table must grow to `len(tokenizer)`."""
    names = [f"[ECG{i}]" for i in range(num_tokens)]
    missing = [n for n in names if n not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing},
                                     replace_extra_special_tokens=False)
    return [tokenizer.convert_tokens_to_ids(n) for n in names]


def placeholder_id(tokenizer) -> int:
    token_id = tokenizer.convert_tokens_to_ids(ECG_PLACEHOLDER)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer has no {ECG_PLACEHOLDER} token; load it with load_tokenizer()")
    return token_id


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False) if text else []


def encode_chat(tokenizer, turns: Sequence[tuple[str, str | None]], *, system: str | None = None,
                with_ecg: bool = True) -> tuple[list[int], list[int]]:
    """Tokenizes a conversation in the chat format above.

    turns: [(role, text)] alternating "user"/"assistant", starting with "user". A final
      ("assistant", None) leaves the prompt open for generation (no answer, no `</s>`).
    with_ecg: put exactly one `<ecg>` placeholder (and a newline) before the first user text; any
      `<image>`/`<ecg>` markers in the text are removed.
    Returns (token ids [L], loss mask [L]: 1 on assistant answer tokens and their `</s>`).
    """
    ids, mask = [tokenizer.bos_token_id], [0]

    def add(token_ids, trainable):
        ids.extend(token_ids)
        mask.extend([int(trainable)] * len(token_ids))

    for index, (role, text) in enumerate(turns):
        if role == "user":
            text = (text or "").replace("<image>", "").replace(ECG_PLACEHOLDER, "").strip()
            prefix = (system + " " if system and index == 0 else "") + USER_PREFIX
            add(_ids(tokenizer, prefix), False)
            if index == 0 and with_ecg:
                add([placeholder_id(tokenizer)], False)
                text = "\n" + text
            add(_ids(tokenizer, text), False)
        elif role == "assistant":
            add(_ids(tokenizer, ASSISTANT_PREFIX.rstrip() if text is None else ASSISTANT_PREFIX),
                False)
            if text is not None:
                add(_ids(tokenizer, text.strip()) + [tokenizer.eos_token_id], True)
        else:
            raise ValueError(f"unknown role {role!r} in turn {index}")
    return ids, mask


def training_corpus() -> list[str]:
    """Texts the tiny BPE is trained on: bundled diagnosis names, SCP descriptions, PTB-XL reports,
    synthetic reports, conversation templates and answers."""
    import pandas as pd

    from uniecg_jax.data import bundled_samples_dir, conversations, synthetic

    root = bundled_samples_dir()
    texts = []
    for name in ("dx_mapping_scored.csv", "dx_mapping_unscored.csv"):
        texts += pd.read_csv(root / name)["Dx"].astype(str).tolist()
    texts += pd.read_csv(root / "scp_statements.csv")["description"].astype(str).tolist()
    texts += pd.read_csv(root / "ptbxl_database_ecg6000-6009.csv")["report"].astype(str).tolist()
    texts += [synthetic.synthetic_report(hr) for hr in range(30, 200)]
    texts += list(conversations.QUESTIONS) + list(conversations.FOLLOW_UP)
    texts += [f"{USER_PREFIX}question{ASSISTANT_PREFIX}answer"]
    from uniecg_jax.data import load_bundled_records

    for record in load_bundled_records():
        texts += [turn for _, turn in conversations.build_conversation(record, True)]
    texts += ["Generate a 12-lead ECG that matches this report: " + t for t in texts[:50]]
    return texts


def train_tiny(out_dir: str | os.PathLike | None = None, vocab_size: int = TINY_VOCAB_SIZE):
    """Trains the byte-level BPE on `training_corpus()` and saves a PreTrainedTokenizerFast there
    (default: the package's assets/tokenizer_tiny). Returns the tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
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
    return np.array([len(_ids(tokenizer, t)) for t in texts])


if __name__ == "__main__":
    train_tiny()
    print(f"saved {tiny_tokenizer_dir()}")
