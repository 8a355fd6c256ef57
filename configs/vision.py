"""Image-tower pretraining on printed ECG pages (the `vision` objective, `train.vision`).

  uniecg train --config configs/vision.py:demo --workdir /tmp/tower        # CPU, a few minutes
  uniecg train --config configs/stage1.py:demo_image --workdir /tmp/stage1 \\
      --config.init.clip_dir=/tmp/tower/clip_vision --config.model.vision_tower.frozen=True \\
      --config.train.freeze=^vision_tower/

Variants: tiny (tiny_image's tower, tests), demo (demo_image's tower; what `uniecg demo` trains
before its image stage 1). The tower's shape, the data (records, held-out split, synthetic
records and their stretched copies, print distortions) and the seed are those of the stage-1
variant of the same name, read from configs/stage1.py, so the pretrained tower fits that model and
never sees its held-out records. GEM's towers are pretrained CLIPs: a 7B run loads
openai/clip-vit-large-patch14-336 by `init.clip_dir` and needs no run of this.
"""
import os

import ml_collections

from uniecg_jax.config import load_config_file
from uniecg_jax.train.schema import VisionTrainConfig, train_group

STAGE1_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stage1.py")

# variant: the configs/stage1.py variant whose tower, data and seed it pretrains for
VARIANTS = {"tiny": "tiny_image", "demo": "demo_image"}


def get_config(arg=None):
    variant = arg or "tiny"
    if variant not in VARIANTS:
        raise KeyError(f"{variant!r}; choose from {sorted(VARIANTS)}")
    stage1 = load_config_file(f"{STAGE1_FILE}:{VARIANTS[variant]}")
    config = ml_collections.ConfigDict()
    config.objective = "vision"
    config.seed = stage1.seed
    config.distributed = False
    config.mesh = stage1.mesh
    config.model = ml_collections.ConfigDict({"vision_tower": stage1.model.vision_tower})
    config.data = ml_collections.ConfigDict(dict(
        source=stage1.data.source, num_synthetic=stage1.data.num_synthetic,
        synthetic_stretches=stage1.data.synthetic_stretches,
        holdout_every=stage1.data.holdout_every, worker_count=stage1.data.worker_count,
        image_distortions=stage1.data.image_distortions,
        ecg_lead_order=stage1.model.input.ecg_lead_order))
    config.train = train_group(VisionTrainConfig(batch_size=32, steps=20, learning_rate=1e-3,
                                                 warmup_steps=5, log_every=5))
    if variant == "demo":
        config.train.update(steps=1500, warmup_steps=50, log_every=100, checkpoint_every=500,
                            weight_decay=0.05)
    return config
