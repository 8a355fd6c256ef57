"""The data the package trains and evaluates on without a `uniecg prep` folder: the 50 bundled real
records plus synthetic ECGs of known heart rate (shared by the trainers, `uniecg eval`, the CLI and
the demos, so that none of them imports `train/` for data)."""
from __future__ import annotations

import functools

from uniecg_jax.data import load_bundled_records
from uniecg_jax.data.measure import with_measured_rhythms
from uniecg_jax.data.splits import holdout_fractions, patient_split
from uniecg_jax.data.synthetic import cached_synthetic


@functools.lru_cache(maxsize=4)
def bundled_split(holdout_every: int, num_synthetic: int, seed: int) -> dict[str, list]:
    """{"train": [...], "test": [...]} ECGRecords: the bundled records split by patient
    (`data.splits.patient_split`, about one patient in `holdout_every` held out for test) plus
    `num_synthetic` synthetic ones from seed + 1 (train gets the first 3/4, test the rest)."""
    fractions = holdout_fractions(holdout_every)
    split = {"train": [], "test": []}
    for record in load_bundled_records():
        split.setdefault(patient_split(record.patient_id, fractions), []).append(record)
    train, test = split["train"], split["test"]
    if num_synthetic:
        generated = cached_synthetic(num_synthetic, seed + 1)
        cut = (3 * num_synthetic) // 4
        train += generated[:cut]
        test += generated[cut:]
    return {"train": train, "test": test}


def diffusion_records(config) -> list:
    """The diffusion model's bundled data: every bundled record plus `config.data.num_synthetic`
    synthetic ECGs at `config.data.synthetic_heart_rates` (cycled, seed `config.seed` + 1, cached in
    `config.data.cache_dir` or the default cache), all with R peaks and heart rate measured."""
    synthetic = cached_synthetic(int(config.data.num_synthetic), int(config.seed) + 1,
                                 tuple(config.data.synthetic_heart_rates),
                                 str(config.data.cache_dir) or None)
    return with_measured_rhythms(load_bundled_records()) + with_measured_rhythms(synthetic)
