"""Every config file and variant loads and builds abstract params; bad overrides fail clearly."""
import importlib.util
import math
import pathlib
import re

import jax
import pytest

from uniecg_jax.cli import main
from uniecg_jax.config import ConfigError, load_config
from uniecg_jax.train import TRAINERS, build_task

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
