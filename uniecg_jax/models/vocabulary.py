"""Growing the decoder's vocabulary-sized tensors (the embedding rows and an untied lm_head's
columns) when tokens are added to its tokenizer: `<ecg>` to an HF tokenizer in stage 1 (only with
`model.input.placeholder = "token"`: GEM's sentinel placeholder adds no row, so a GEM model keeps
its 32000), the `[ECG]` generation tokens in stage 2. The tokenizer side is `data.tokenizer.add_tokens`; the two
together are `convert.hf_llm.add_tokens`.
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np


def grow_vocab_rows(llm_params: dict, vocab_size: int, new_token_ids: Sequence[int] = ()) -> dict:
    """Decoder params with `embedding` [V, D] (and `lm_head/kernel` [D, V] when untied) grown to
    `vocab_size` rows; every new row, and the rows of `new_token_ids` (tokens just added whose
    ids fall inside the old table, e.g. a vocabulary padded to a multiple of 64), is set to the
    mean of the other old rows, as LLaVA initialises added tokens (llava/model/llava_arch.py
    initialize_vision_tokenizer: `embeddings[-num_new_tokens:] = embeddings[:-num_new_tokens]
    .mean(0)` for input and output embeddings). Rows of tokens that already existed are kept.
    Returns a new dict of host (numpy) arrays for the grown tensors; the input is not modified.
    """
    def grow(array, axis: int) -> np.ndarray:
        host = np.asarray(jax.device_get(array))
        old_vocab = host.shape[axis]
        fresh = np.union1d(np.asarray(new_token_ids, np.int64),
                           np.arange(old_vocab, max(old_vocab, vocab_size)))
        if not len(fresh):
            return host
        keep = np.setdiff1d(np.arange(old_vocab), fresh)
        mean = np.take(host, keep, axis=axis).astype(np.float32).mean(axis=axis, keepdims=True)
        pad_width = [(0, 0)] * host.ndim
        pad_width[axis] = (0, max(0, vocab_size - old_vocab))
        host = np.pad(host, pad_width)
        index = [slice(None)] * host.ndim
        index[axis] = fresh
        host[tuple(index)] = mean.astype(host.dtype)
        return host

    llm_params = dict(llm_params)
    llm_params["embedding"] = grow(llm_params["embedding"], 0)
    if "lm_head" in llm_params:
        llm_params["lm_head"] = {"kernel": grow(llm_params["lm_head"]["kernel"], 1)}
    return llm_params
