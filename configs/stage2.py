"""Stage 2, Text-to-ECG by latent alignment: N `[ECG]` tokens + an alignment head on a stage-1 model.

  uniecg train --config configs/stage2.py:tiny --workdir /tmp/stage2 \\
      --config.init.stage1_ckpt=/tmp/stage1                                     # CPU, a minute
  uniecg train --config configs/stage2.py:vicuna_7b --workdir gs://b/stage2 \\
      --config.init.stage1_ckpt=gs://b/stage1 --config.data.source=/data/mimic_prep \\
      --config.mesh.fsdp=-1 --config.distributed=True                          # TPU pod
  uniecg chat --ckpt /tmp/stage2 --diffusion /tmp/diffusion \\
      --prompt "Show me sinus tachycardia at 130 bpm in a 70-year-old woman"

Only the N new embedding / lm_head rows and the alignment, attribute and decision heads train: `train.freeze` freezes the ECG
tower and every LLM tensor but `embedding` / `lm_head`, and the stage-2 loss masks the gradient of
the old rows of those two, so the stage-1 model is unchanged bit for bit (interpretation preserved).
The model shapes come from the stage-1 checkpoint's config when `init.stage1_ckpt` is set.

Variants: tiny (CPU tests), demo (after `configs/stage1.py:demo`), vicuna_7b, qwen2_5_7b.
"""
import os

import ml_collections

from uniecg_jax.config import load_config_file
from uniecg_jax.models.alignment import AlignmentConfig, AttributeConfig, DecisionConfig
from uniecg_jax.train.schema import Stage2TrainConfig, train_group

STAGE1_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stage1.py")

VARIANTS = ("tiny", "demo", "vicuna_7b", "qwen2_5_7b")
# Everything but the LLM's embedding / lm_head (whose old rows are masked in the loss instead).
FREEZE_ALL_BUT_NEW_ROWS = r"^(ecg_tower/|llm/(?!embedding$|lm_head/))"


def get_config(arg=None):
    variant = arg or "tiny"
    if variant not in VARIANTS:
        raise KeyError(f"{variant!r}; choose from {sorted(VARIANTS)}")
    stage1 = load_config_file(f"{STAGE1_FILE}:{variant}")
    config = ml_collections.ConfigDict()
    config.objective = "stage2"
    config.seed = 0
    config.distributed = False
    config.mesh = stage1.mesh
    # Stage 2 reads ECG signals only: stage 1's image tower (`vision_tower`) is not carried, so
    # its params, the preservation examples and `uniecg chat` stay signal-only.
    config.model = ml_collections.ConfigDict(
        {k: v for k, v in stage1.model.items() if k != "vision_tower"})
    config.model.num_ecg_tokens = 8
    config.model.ecg_token_ids = [-1]   # filled by the trainer from the tokenizer (list of N ids)
    # kind: mlp | transformer (GILL-style learned queries)
    config.model.alignment = ml_collections.ConfigDict(AlignmentConfig(hidden_dim=256).to_dict())
    config.text = ml_collections.ConfigDict(dict(
        encoder="minilm",      # the diffusion model's frozen text encoder (uniecg_jax.data.text_encoder)
        embed_dim=384))
    config.model.alignment.output_dim = config.text.get_ref("embed_dim")
    # Heart rate / age / sex read from the [ECG] hidden states (the diffusion model's scalar
    # conditions); their loss weights are train.heart_rate_weight / age_weight / sex_weight.
    config.model.attributes = ml_collections.ConfigDict(AttributeConfig().to_dict())
    # The [ECG] decision read from the whole request (learned queries over every request token's
    # state and input embedding, `models.alignment.DecisionHead`), not from the LLM's last state
    # alone; trained by the decision BCE (train.decision_weight). Unset (a checkpoint written
    # before it): the [ECG0] row's own logit decides.
    config.model.decision = ml_collections.ConfigDict(DecisionConfig().to_dict())
    config.data = ml_collections.ConfigDict(dict(
        source="bundled",      # "bundled" (bundled + synthetic reports) or a `uniecg prep` folder
        num_synthetic=48, holdout_every=5, tokenizer="", max_length=128, worker_count=0,
        interpret_max_length=stage1.data.max_length,    # interpretation (preservation) examples
        # Requests (data.conversations.stage2_request): the share answered in words (general
        # questions, questions about a report), of generation requests that follow a turn about
        # the report, and the chance each known attribute is stated in the request.
        negative_fraction=0.3, follow_up_fraction=0.15, state_fraction=0.5,
        # The bundled split's synthetic records are drawn from data.seed + 1 (-1: config.seed),
        # so runs of several training seeds (`seed`) can share one data set (`uniecg demo`).
        seed=-1))
    config.init = ml_collections.ConfigDict(dict(
        stage1_ckpt=""))       # stage-1 train workdir or model checkpoint; "" = random (tests)
    # weight_decay stays 0 (the default): decoupled decay would move the frozen vocabulary rows.
    config.train = train_group(Stage2TrainConfig(steps=200, learning_rate=3e-3, log_every=25,
                                                 freeze=FREEZE_ALL_BUT_NEW_ROWS))
    config.eval = ml_collections.ConfigDict(dict(max_new_tokens=stage1.eval.max_new_tokens,
                                                 batch_size=8, generation_tokens=12))
    if variant == "demo":
        # Measured on the demo's stage 1 (held-out records, `request_metrics`): at 150 steps the
        # [ECG] decision is not learned (73% of trained general questions answered with [ECG],
        # seeds 0 and 1); at 400 steps none are (seed 0), but held-out ones still are (58%; 42%
        # on another stage-1 run, 0% with the wider set of trained general questions). The
        # unnormalised attribute read-out collapsed (attention one-hot on ":" / "<s>", logits'
        # std ~25-45); the normalised one keeps them ~3 (max weight ~0.45), but at 400 steps it
        # still reads stated rates poorly (MAE ~13 bpm against 0.3 for the regex): the report
        # implies half of them, and the small LLM's states barely hold a number (a ridge probe
        # on the last digit's state: r 0.55).
        # Now (the head also reads the request's token embeddings, one token ahead; the decision
        # BCE weighs both classes alike; 40% word answers; 400 steps of batch 16), seeds 0 / 1,
        # held-out records, trained / held-out phrasings: stated-rate MAE 9.6 / 12.6 and
        # 7.5 / 11.3 bpm (regex 0.26 and 9.5, best constant 19.9 and 15.2); questions about a
        # report answered with [ECG] 41 / 45% and 79 / 72% (general: <= 12%, 0%); decision
        # precision 0.81 / 0.75 and 0.62 / 0.66, recall 0.90 / 0.79 and 0.79 / 0.83;
        # interpretation unchanged (6 / 6 each). The one held-out report question ("... What
        # should I make of it?") is not separable by a linear read of the LLM's last state
        # (a logistic probe trained on 6 or 16 report-question phrasings: 100% [ECG]).
        # With the decision read-out (`model.decision`: learned queries over every request
        # token), 200 steps (train.steps=200, 2 shared cores), one stage-1 demo run, seeds 0 / 1
        # (without it, same recipe): decision precision / recall trained 1.00 / 1.00 both
        # (0.75 / 0.92, 0.74 / 0.88), held-out 1.00 / 0.92 and 0.68 / 0.85 (0.63 / 0.81,
        # 0.51 / 0.73); report questions answered with [ECG] trained 0 / 0% (59 / 59%), held-out
        # 0 / 66% (79 / 79%); general 0% (8 / 8%, 0 / 58%); interpretation token-identical (6 / 6).
        config.model.alignment.hidden_dim = 256
        config.data.negative_fraction = 0.4
        config.train.update(steps=400, batch_size=16, learning_rate=5e-3, log_every=50,
                            checkpoint_every=0)
    if variant in ("vicuna_7b", "qwen2_5_7b"):
        config.model.alignment.update(kind="transformer", hidden_dim=1024, layers=2, heads=8,
                                      num_queries=8, dtype="bfloat16")
        config.data.max_length = 256
        config.train.update(batch_size=128, steps=5000, learning_rate=1e-3, warmup_steps=200,
                            log_every=50, checkpoint_every=1000)
    return config
