"""The `train` config group: one schema shared by every objective, extended by each objective.

`TrainConfig` holds what the shared loop, optimizer and checkpointer read; an objective's subclass
adds only its own fields (`LMTrainConfig.seq_len`, `DiffusionTrainConfig.kl_weight`, ...). Config
files build their group from the dataclass and name only the values that differ from its defaults:

    config.train = train_group(Stage1TrainConfig(steps=300, learning_rate=2e-3))

so a field added here reaches every config file, and no trainer reads `config.train.get(key,
default)`. `build_task` of each objective loads `config.train` strictly with its class
(`TRAIN_SCHEMAS[objective]`), so an unknown train key fails for every objective alike.
"""
from __future__ import annotations

import dataclasses

import ml_collections

from uniecg_jax.models.schema import ConfigSchema


@dataclasses.dataclass(frozen=True)
class TrainConfig(ConfigSchema):
    """Fields of `config.train` that the shared loop (`train.loop`) and optimizer (`optim`) read."""
    config_group = "train"
    batch_size: int = 8              # global batch (divisible by data*fsdp x grad_accum_steps)
    steps: int = 100
    learning_rate: float = 3e-4
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1        # cosine decay floor, as a fraction of learning_rate
    weight_decay: float = 0.0        # AdamW's decoupled decay
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-8
    grad_clip: float = 1.0           # global-norm clip (0 = off)
    grad_accum_steps: int = 1
    log_every: int = 10
    checkpoint_every: int = 100      # 0 = only the final checkpoint
    keep_checkpoints: int = 2
    async_checkpoint: bool = True
    freeze: str = ""                 # regex over param paths (a/b/kernel) kept fixed
    ema_decay: float = 0.0           # > 0: export an EMA of the weights (optim.with_params_ema)
    compilation_cache_dir: str = ""  # persist compiled steps here: restarts skip compilation


@dataclasses.dataclass(frozen=True)
class LMTrainConfig(TrainConfig):
    """`lm` objective (configs/llm.py)."""
    seq_len: int = 128
    z_loss: float = 0.0              # weight of the log(Z)^2 term (PaLM; 0 = off)
    data: str = "auto"               # auto | reports | synthetic (see uniecg_jax/train/lm.py)


@dataclasses.dataclass(frozen=True)
class Stage1TrainConfig(TrainConfig):
    """`stage1` objective (configs/stage1.py)."""
    augment_roll: bool = False       # rotate ECGs in time by a random offset (small-data runs)
    # Modality dropout (models with an image tower): the probability of hiding each input from
    # an example that carries both (train.stage1.drop_modalities); never both at once.
    ecg_dropout: float = 0.0
    image_dropout: float = 0.0


@dataclasses.dataclass(frozen=True)
class Stage2TrainConfig(TrainConfig):
    """`stage2` objective (configs/stage2.py): the weights of the loss terms."""
    token_loss_weight: float = 1.0   # CE on the answer tokens ([ECG] tokens, or words)
    decision_weight: float = 1.0     # BCE of answering with [ECG0] (generation) or not (words)
    mse_weight: float = 1.0          # alignment output vs the text embedding
    cosine_weight: float = 1.0
    # Stage-1 CE on interpretation answers (grads reach only the new rows): keeps the [ECG]
    # tokens out of interpretations. 0 = off (then no ECG data is read).
    preservation_weight: float = 1.0
    # Attribute head (model.attributes) vs the record's own values: squared error of the
    # standardised heart rate / age, cross-entropy of sex. 0 leaves that output untrained.
    heart_rate_weight: float = 1.0
    age_weight: float = 1.0
    sex_weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class VisionTrainConfig(TrainConfig):
    """`vision` objective (configs/vision.py): image-tower pretraining on rendered pages."""
    statement_weight: float = 1.0    # BCE of the record's diagnosis statements
    heart_rate_weight: float = 1.0   # squared error of the standardised heart rate


@dataclasses.dataclass(frozen=True)
class DiffusionTrainConfig(TrainConfig):
    """`diffusion` objective (configs/diffusion.py): two phases, each of the shared loop, whose
    `steps` are `vae_steps` and `unet_steps` (`train.steps` itself is not read)."""
    kl_weight: float = 1.0           # VAE loss: reconstruction + kl_weight x KL
    # UNet phase: rotate each ECG and its beat phase in time by one random offset (small-data
    # runs: beat positions then cannot be read from the record, only from the rhythm condition)
    augment_roll: bool = False
    vae_steps: int = 50000
    unet_steps: int = 100000


TRAIN_SCHEMAS: dict[str, type[TrainConfig]] = {
    "lm": LMTrainConfig, "stage1": Stage1TrainConfig, "stage2": Stage2TrainConfig,
    "diffusion": DiffusionTrainConfig, "vision": VisionTrainConfig,
}


def train_group(train_config: TrainConfig) -> ml_collections.ConfigDict:
    """The `config.train` ConfigDict of a (sub)class instance: every field, so overrides of any
    field work from the command line."""
    return ml_collections.ConfigDict(train_config.to_dict())


def load_train_config(config: ml_collections.ConfigDict) -> TrainConfig:
    """`config.train` loaded strictly with the schema of `config.objective` (the base schema for an
    objective without one)."""
    schema = TRAIN_SCHEMAS.get(config.get("objective", None), TrainConfig)
    return schema.from_config(config.train)
