"""The one patient-level split rule of the package: `uniecg prep` shards and the bundled data.

A patient's split is a pure function of its id: sha256(id) read as a number in [0, 1) is compared
with cumulative fractions. sha256 (not Python's salted `hash`) gives the same answer in every
process and on every host, so workers and hosts agree without sharing state; a position in [0, 1)
(not `crc32 % k`) makes any fractions expressible (train/validation/test, 0.8/0.1/0.1 by default).

This was prep's rule; the bundled data used crc32(id) % k == 0 and now uses the same rule with
test fraction 1/k (`holdout_fractions`). Prepared folders keep their splits; the bundled held-out
set changed (12 of the 50 bundled records at k = 5, before 8 others).
"""
from __future__ import annotations

import hashlib
import math
from typing import Sequence

from uniecg_jax.errors import UniECGError

SPLITS = ("train", "validation", "test")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


def split_position(patient_id: str) -> float:
    """The patient's place in [0, 1): the first 8 bytes of sha256(id) over 2**64."""
    digest = hashlib.sha256(str(patient_id).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """(train, validation, test) fractions as floats; raises UniECGError unless they are three
    non-negative numbers summing to 1."""
    try:
        values = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        raise UniECGError(f"split fractions {fractions!r} are not numbers") from None
    if len(values) != 3 or min(values) < 0 or not math.isclose(sum(values), 1.0, abs_tol=1e-6):
        raise UniECGError(f"split fractions {fractions!r}: need three non-negative fractions "
                          "(train, validation, test) summing to 1")
    return values


def patient_split(patient_id: str, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> str:
    """"train", "validation" or "test" for a patient id, by `split_position` and `fractions`."""
    train, validation, _ = check_fractions(fractions)
    position = split_position(patient_id)
    if position < train:
        return "train"
    return "validation" if position < train + validation else "test"


def holdout_fractions(holdout_every: int) -> tuple[float, float, float]:
    """Fractions that hold out about one patient in `holdout_every` for test (none when <= 0)."""
    if holdout_every <= 0:
        return (1.0, 0.0, 0.0)
    return (1.0 - 1.0 / holdout_every, 0.0, 1.0 / holdout_every)
