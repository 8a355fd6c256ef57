"""Every config file and variant loads and builds abstract params; bad overrides fail clearly."""
import dataclasses
import importlib.util
import json
import math
import pathlib
import re

import jax
import pytest

from uniecg_jax.cli import main
from uniecg_jax.config import ConfigError, config_from_json, load_config, replace_values
from uniecg_jax.diffusion.schedule import DiffusionConfig
from uniecg_jax.models.alignment import AlignmentConfig
from uniecg_jax.models.ecg_encoder import ECGEncoderConfig, ProjectorConfig
from uniecg_jax.models.llm import LLMConfig
from uniecg_jax.models.stage1 import UniECGConfig
from uniecg_jax.models.stage2 import Stage2Config
from uniecg_jax.models.unet import UNetConfig
from uniecg_jax.models.vae import VAEConfig
from uniecg_jax.train import TRAINERS, build_task
from uniecg_jax.train.schema import (TRAIN_SCHEMAS, Stage1TrainConfig, TrainConfig,
                                     load_train_config)

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"


def _variants(path: pathlib.Path) -> list[str]:
    """A file's variants: its `VARIANTS` tuple, else the docstring's `Variants:` line, else the
    default (`get_config(None)`)."""
    spec = importlib.util.spec_from_file_location(f"_variants_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if hasattr(module, "VARIANTS"):
        return list(module.VARIANTS)
    match = re.search(r"^Variants:(.*?)(?:\n\s*\n|\Z)", module.__doc__ or "", re.MULTILINE | re.DOTALL)
    if match:
        text = match.group(1)
        while re.search(r"\([^()]*\)", text):  # drop (possibly nested) explanations
            text = re.sub(r"\([^()]*\)", "", text)
        variants = [v.strip().rstrip(".").strip() for v in text.split(",")]
        return [v for v in variants if re.fullmatch(r"\w+", v)]
    return [""]


CASES = [(path.name, variant) for path in sorted(CONFIG_DIR.glob("*.py"))
         for variant in _variants(path)]


def test_config_files_are_found():
    assert ("llm.py", "tiny") in CASES and ("llm.py", "llama2_7b") in CASES


@pytest.mark.parametrize("file_name,variant", CASES)
def test_config_loads_and_builds_abstract_params(file_name, variant):
    config = load_config(f"configs/{file_name}" + (f":{variant}" if variant else ""))
    assert config.is_locked
    objective = config.get("objective", None)
    if objective is None:
        pytest.skip(f"{file_name} sets no config.objective, so `uniecg train` cannot dispatch it yet")
    assert objective in TRAINERS, f"{file_name}: objective {objective!r} not in {sorted(TRAINERS)}"
    try:
        task = build_task(config)
    except ValueError as e:
        if "not available in this version" in str(e):
            pytest.skip(str(e))
        raise
    boxed = jax.eval_shape(task.init_params, jax.random.PRNGKey(0))
    leaves = jax.tree.leaves(boxed)
    assert leaves
    count = sum(math.prod(leaf.value.shape if hasattr(leaf, "value") else leaf.shape)
                for leaf in jax.tree.leaves(boxed, is_leaf=lambda x: hasattr(x, "names")))
    # The declared count feeds FLOPs/MFU; the LM's is exact, other objectives may estimate towers.
    if objective == "lm":
        assert count == task.num_params
    else:
        assert abs(count - task.num_params) <= 0.01 * count, (count, task.num_params)
    assert task.flops_per_step > 6 * task.num_params  # at least 6N per step (one token)


def test_llama2_7b_has_its_published_parameter_count():
    task = build_task(load_config("configs/llm.py:llama2_7b"))
    assert task.num_params == 6_738_415_616


@pytest.mark.parametrize("override,message", [
    ("--config.model.num_layer=4", "unknown config key --config.model.num_layer; did you mean "
                                   "model.num_layers"),
    ("--config.model.num_layers=four", "--config.model.num_layers: expected an integer, got 'four'"),
    ("--config.train.grad_clip=big", "--config.train.grad_clip: expected a number, got 'big'"),
    ("--config.distributed=maybe", "--config.distributed: expected a boolean"),
])
def test_bad_override_fails_clearly_through_the_cli(override, message, tmp_path, capsys):
    status = main(["train", "--config", "configs/llm.py:tiny", "--workdir", str(tmp_path), override])
    assert status == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert not (tmp_path / "checkpoints").exists()


def test_unknown_variant_and_missing_file_fail_clearly():
    with pytest.raises(ConfigError, match="unknown preset 'llama9_70b'"):
        load_config("configs/llm.py:llama9_70b")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("configs/no_such_file.py")


# ------------------------------------------------------------------------------- one schema

GROUP_SCHEMAS = [
    # (config spec, dotted group, schema class)
    ("configs/llm.py:tiny", "model", LLMConfig),
    ("configs/stage1.py:tiny", "model.llm", LLMConfig),
    ("configs/stage1.py:tiny", "model.ecg_encoder", ECGEncoderConfig),
    ("configs/stage1.py:tiny", "model.projector", ProjectorConfig),
    ("configs/stage2.py:tiny", "model.alignment", AlignmentConfig),
    ("configs/diffusion.py:tiny", "model.vae", VAEConfig),
    ("configs/diffusion.py:tiny", "model.unet", UNetConfig),
    ("configs/diffusion.py:tiny", "diffusion", DiffusionConfig),
]


def _group(config, dotted):
    for part in dotted.split("."):
        config = config[part]
    return config


@pytest.mark.parametrize("spec,group,schema", GROUP_SCHEMAS)
def test_every_model_group_is_its_dataclass_and_a_typo_fails_naming_the_group(spec, group, schema):
    values = _group(load_config(spec), group).to_dict()
    # The ConfigDict group is derived from the dataclass: the same keys, and a lossless round trip.
    configurable = {f.name for f in dataclasses.fields(schema)
                    if "uniecg_derived" not in f.metadata}
    assert set(values) == configurable
    assert schema.from_config(values, group=group).to_dict() == values
    # A typo fails in every group alike (it used to be dropped silently in model.unet, .vae, ...).
    first = sorted(configurable)[0]
    typo = dict(values, **{first + "s": values[first]})
    with pytest.raises(ConfigError, match=rf"unknown key\(s\) in config group {group}: "
                                          rf"{group}\.{first}s \(did you mean {group}\.{first}"):
        schema.from_config(typo, group=group)
    # Missing keys take the dataclass default.
    assert schema.from_config({}, group=group) == schema()


def test_strict_loader_checks_types_and_nested_groups():
    with pytest.raises(ConfigError, match="model.llm.num_layers: expected an integer, got '2'"):
        LLMConfig.from_config({"num_layers": "2"}, group="model.llm")
    with pytest.raises(ConfigError, match=r"model\.llm\.rope_scaling\.kinds \(did you mean "
                                          r"model\.llm\.rope_scaling\.kind\?\)"):
        LLMConfig.from_config({"rope_scaling": {"kinds": "linear"}}, group="model.llm")
    # JSON forms are accepted: ints for floats, lists for tuples, dtype names.
    unet = UNetConfig.from_config({"scalar_condition_scale": [1, 0.01, 0.01], "dtype": "bfloat16"},
                                  num_train_steps=50)
    assert unet.scalar_condition_scale == (1.0, 0.01, 0.01) and unet.num_train_steps == 50
    assert unet.dtype == jax.numpy.bfloat16
    with pytest.raises(ConfigError, match="model.unet.widths"):
        UNetConfig.from_config({"widths": [1, 2]})
    # Composite groups: the stage-1/2 `model` keys are checked too.
    stage2 = load_config("configs/stage2.py:tiny").model.to_dict()
    with pytest.raises(ConfigError, match=r"model\.alignmnet \(did you mean model\.alignment\?\)"):
        Stage2Config.from_config(dict(stage2, alignmnet={}))
    stage1 = load_config("configs/stage1.py:tiny").model.to_dict()
    with pytest.raises(ConfigError, match=r"model\.ecg_encoder\.widht \(did you mean "
                                          r"model\.ecg_encoder\.width\?\)"):
        UniECGConfig.from_config(dict(stage1, ecg_encoder=dict(stage1["ecg_encoder"], widht=3)))


@pytest.mark.parametrize("file_name,variant", CASES)
def test_every_train_group_is_the_shared_schema_of_its_objective(file_name, variant):
    config = load_config(f"configs/{file_name}" + (f":{variant}" if variant else ""))
    schema = TRAIN_SCHEMAS[config.objective]
    assert set(config.train.to_dict()) == {f.name for f in dataclasses.fields(schema)}
    loaded = load_train_config(config)
    assert isinstance(loaded, schema) and loaded.to_dict() == config.train.to_dict()
    # Every objective shares the loop's fields (one home), and the dead stage-1/2 z-loss is gone.
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= set(config.train.to_dict())
    assert ("z_loss" in config.train) == (config.objective == "lm")
    with pytest.raises(ConfigError, match=r"train\.lerning_rate \(did you mean "
                                          r"train\.learning_rate"):
        schema.from_config(dict(config.train.to_dict(), lerning_rate=1.0))


def test_finalisation_returns_a_new_config_and_leaves_the_loaded_one_alone():
    config = load_config("configs/stage2.py:tiny", ["model.llm.num_layers=1",
                                                    "model.ecg_encoder.layers=1"])
    before = config.to_dict()
    task = build_task(config)
    assert config.to_dict() == before and config.is_locked
    assert list(config.model.ecg_token_ids) == [-1]
    assert task.config is not config and task.config.is_locked
    assert len(task.config.model.ecg_token_ids) == config.model.num_ecg_tokens
    assert task.config.model.llm.vocab_size > config.model.llm.vocab_size
    assert task.tokenizer is not None and task.export is not None
    # replace_values refuses keys that do not exist (no silent new fields).
    with pytest.raises(ConfigError, match="unknown config key model.llm.num_layer"):
        replace_values(config, {"model.llm.num_layer": 3})


def test_old_checkpoint_configs_are_migrated():
    """config.json written before the redesign: stage 1/2 stored a `train.z_loss` nothing read, and
    early diffusion configs lack `objective` / `data.*` keys. `config_from_json` upgrades both."""
    stage1 = load_config("configs/stage1.py:tiny").to_dict()
    stage1["train"]["z_loss"] = 0.0
    with pytest.raises(ConfigError, match=r"train\.z_loss"):
        Stage1TrainConfig.from_config(stage1["train"])   # what the migration saves us from
    upgraded = config_from_json(json.dumps(stage1))
    assert "z_loss" not in upgraded.train
    assert load_train_config(upgraded) == load_train_config(load_config("configs/stage1.py:tiny"))
    lm = load_config("configs/llm.py:tiny").to_dict()   # the LM's z_loss is real: kept
    assert config_from_json(json.dumps(lm)).train.z_loss == 0.0

    diffusion = load_config("configs/diffusion.py:tiny").to_dict()
    del diffusion["objective"]
    for key in ("source", "num_synthetic", "cache_dir", "worker_count"):
        del diffusion["data"][key]
    upgraded = config_from_json(json.dumps(diffusion))
    assert upgraded.objective == "diffusion" and upgraded.data.source == "bundled"
    assert upgraded.data.num_synthetic == 16 and upgraded.data.worker_count == 0
