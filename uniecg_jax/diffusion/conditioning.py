"""Condition vectors for the UNet: text embedding ++ (sex, age, heart rate), validated.

DiffuSETS feeds raw values: sex M=1 / F=0, age in years, heart rate in beats per minute, appended to
the text embedding in that order (`[B, D + 3]`). Its prompt template is
`uniecg_jax.data.prompts.diffusets_prompt`.
"""
from __future__ import annotations

import numpy as np

from uniecg_jax.errors import UniECGError


class ConditionError(UniECGError, ValueError):
    """A generation condition (text embedding, sex, age, heart rate) is missing or invalid."""


def _sex_codes(sex, batch: int) -> np.ndarray:
    values = np.atleast_1d(np.asarray(sex, dtype=object))
    codes = []
    for value in values:
        if isinstance(value, str):
            key = value.strip().upper()
            if key not in ("M", "F", "MALE", "FEMALE"):
                raise ConditionError(f"sex must be M or F (or 1/0), got {value!r}")
            codes.append(1.0 if key in ("M", "MALE") else 0.0)
        elif value in (0, 1) and not (isinstance(value, float) and np.isnan(value)):
            codes.append(float(value))
        else:
            raise ConditionError(f"sex must be M or F (or 1/0), got {value!r}")
    return _broadcast(np.asarray(codes, np.float32), batch, "sex")


def _broadcast(values: np.ndarray, batch: int, name: str) -> np.ndarray:
    if values.ndim == 0 or values.shape == (1,):
        return np.full((batch,), float(values.reshape(-1)[0]), np.float32)
    if values.shape != (batch,):
        raise ConditionError(f"{name}: expected a scalar or {batch} values, got shape {values.shape}")
    return values.astype(np.float32)


def build_condition(text_embedding, sex, age, heart_rate, embed_dim: int | None = None
                    ) -> np.ndarray:
    """`[B, D + 3]` float32 condition vectors.

    Args:
      text_embedding: `[D]` or `[B, D]` (required; finite).
      sex: "M"/"F" or 1/0, scalar or `[B]`; age: years in [0, 120]; heart_rate: bpm in (0, 400].
      embed_dim: the width the UNet was built for (checked when given).
    Raises ConditionError naming the bad input.
    """
    if text_embedding is None:
        raise ConditionError("text embedding is missing: give a report text or a precomputed "
                             "embedding")
    text = np.asarray(text_embedding, dtype=np.float32)
    if text.ndim == 1:
        text = text[None]
    if text.ndim != 2 or text.shape[1] == 0:
        raise ConditionError(f"text embedding must be [D] or [B, D], got shape {text.shape}")
    if embed_dim is not None and text.shape[1] != embed_dim:
        raise ConditionError(f"text embedding width {text.shape[1]} does not match the model's "
                             f"text_embed_dim {embed_dim}")
    if not np.all(np.isfinite(text)):
        raise ConditionError("text embedding contains NaN or Inf")
    batch = text.shape[0]
    scalars = [_sex_codes(sex, batch)]
    for name, value, low, high in (("age", age, 0.0, 120.0), ("heart rate", heart_rate, 1e-3, 400.0)):
        if value is None:
            raise ConditionError(f"{name} is missing")
        values = _broadcast(np.asarray(value, dtype=np.float32), batch, name)
        bad = ~np.isfinite(values) | (values < low) | (values > high)
        if bad.any():
            raise ConditionError(f"{name} must be in [{low:g}, {high:g}], got {values[bad][0]}")
        scalars.append(values)
    return np.concatenate([text, np.stack(scalars, axis=-1)], axis=-1)


def repeat_conditions(condition: np.ndarray, num_samples: int) -> np.ndarray:
    """`[B, W]` -> `[B * num_samples, W]` (each condition's samples adjacent)."""
    return np.repeat(condition, num_samples, axis=0)

