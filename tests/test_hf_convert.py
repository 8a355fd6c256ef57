"""HF <-> ours conversion round trips (Levanter-style), added tokens, shape errors, the CLI."""
import dataclasses
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from uniecg_jax import checkpoint, cli  # noqa: E402
from uniecg_jax.convert import hf_llm, hf_testing  # noqa: E402
from uniecg_jax.errors import CheckpointError  # noqa: E402
from uniecg_jax.models.llm import Decoder, LLMConfig  # noqa: E402

IDS = np.random.RandomState(0).randint(3, 96, (2, 11))


def torch_logits(model, ids=IDS):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def import_dir(directory):
    model_config = hf_llm.model_config_from_hf(str(directory))
    config = LLMConfig.from_config(model_config)
    return model_config, config, hf_llm.load_hf_params(str(directory), config)


@pytest.mark.parametrize("family,sharded", [("llama", False), ("qwen2", True)])
def test_round_trip_hf_ours_hf(family, sharded, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    hf_model = hf_testing.tiny_hf_model(family, src, max_shard_size="20KB" if sharded else None)
    assert os.path.isfile(src / hf_llm.INDEX_FILE) == sharded
    _, config, params = import_dir(src)
    ours = np.asarray(Decoder(config).apply({"params": params}, jnp.asarray(IDS)))
    np.testing.assert_allclose(ours, torch_logits(hf_model), atol=1e-4)
    # Export sharded when the import was single-file, and the other way round.
    hf_llm.save_hf(params, config, str(dst), max_shard_bytes=20_000 if not sharded else 1 << 30)
    assert os.path.isfile(dst / hf_llm.INDEX_FILE) != sharded
    assert os.path.isfile(dst / "generation_config.json")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(dst)).float().eval()
    assert type(reloaded) is type(hf_model)
    assert set(reloaded.state_dict()) == set(hf_model.state_dict())
    for name, tensor in hf_model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    np.testing.assert_array_equal(torch_logits(reloaded), torch_logits(hf_model))


def test_rope_scaling_and_tying_survive_export(tmp_path):
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    hf_model = hf_testing.tiny_hf_model("llama", tmp_path / "src", rope_scaling=llama3,
                                        tie_word_embeddings=True, head_dim=12)
    _, config, params = import_dir(tmp_path / "src")
    assert config.tie_word_embeddings and "lm_head" not in params
    hf_llm.save_hf(params, config, str(tmp_path / "dst"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "dst")).eval()
    assert reloaded.config.rope_parameters["rope_type"] == "llama3"
    assert reloaded.config.tie_word_embeddings
    np.testing.assert_array_equal(torch_logits(reloaded.float()), torch_logits(hf_model))


def test_added_ecg_tokens_survive_round_trip(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    hf_testing.tiny_hf_model("llama", src)
    hf_testing.tiny_tokenizer(src, vocab_size=96)
    model_config, config, params = import_dir(src)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(src))
    old_embedding = np.asarray(params["embedding"])
    params, model_config, token_ids = hf_llm.add_tokens(params, model_config, tokenizer,
                                                        ["[ECG0]", "[ECG1]"])
    assert token_ids == [96, 97] and model_config.vocab_size == 98
    np.testing.assert_allclose(np.asarray(params["embedding"])[96], old_embedding.mean(0),
                               rtol=1e-5, atol=1e-6)
    # Give the new rows distinct values (as training would) and check they come back.
    params["embedding"] = params["embedding"].at[97].set(jnp.arange(config.hidden_size) / 7.0)
    config = LLMConfig.from_config(model_config)
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    hf_llm.save_hf(params, config, str(dst), tokenizer_dir=str(tmp_path / "tok"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(dst)).eval()
    reloaded_tokenizer = transformers.AutoTokenizer.from_pretrained(str(dst))
    assert reloaded_tokenizer.convert_tokens_to_ids("[ECG1]") == 97
    assert reloaded_tokenizer("w5 [ECG1]")["input_ids"][-1] == 97
    np.testing.assert_array_equal(reloaded.model.embed_tokens.weight[97].detach().numpy(),
                                  np.asarray(params["embedding"])[97])
    assert reloaded.lm_head.weight.shape[0] == 98
    ids = np.array([[5, 96, 97, 9]])
    ours = np.asarray(Decoder(config).apply({"params": params}, jnp.asarray(ids)))
    np.testing.assert_allclose(ours, torch_logits(reloaded, ids), atol=1e-4)
    # And back in: the grown vocabulary imports cleanly.
    _, _, again = import_dir(dst)
    np.testing.assert_array_equal(np.asarray(again["embedding"]), np.asarray(params["embedding"]))


def test_wrong_shape_errors_name_the_tensor(tmp_path):
    hf_testing.tiny_hf_model("qwen2", tmp_path / "src")
    _, config, params = import_dir(tmp_path / "src")
    wrong = dataclasses.replace(config, intermediate_size=config.intermediate_size + 8)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.\w+_proj\.weight.*72"):
        hf_llm.load_hf_params(str(tmp_path / "src"), wrong)
    untied = dataclasses.replace(config, attention_bias=False, family="llama")
    with pytest.raises(CheckpointError, match="q_proj.bias"):
        hf_llm.load_hf_params(str(tmp_path / "src"), untied)
    # A model checkpoint restored against the wrong abstract tree.
    from uniecg_jax.config import load_config
    full = load_config("configs/llm.py:tiny")
    checkpoint.save_model(str(tmp_path / "ckpt"), params, full)
    abstract = hf_llm.abstract_params_for(dataclasses.replace(config, vocab_size=100))
    with pytest.raises(CheckpointError, match=r"embedding.*\(96, 40\).*\(100, 40\)"):
        checkpoint.restore_model(str(tmp_path / "ckpt"), abstract)
    # The right abstract tree restores onto its shardings.
    abstract = hf_llm.abstract_params_for(config)
    restored, _ = checkpoint.restore_model(str(tmp_path / "ckpt"), abstract)
    kernel = restored["layers_0"]["mlp"]["up"]["kernel"]
    assert kernel.sharding == abstract["layers_0"]["mlp"]["up"]["kernel"].sharding
    np.testing.assert_array_equal(np.asarray(kernel), np.asarray(params["layers_0"]["mlp"]["up"]["kernel"]))


def test_cli_convert_both_ways(tmp_path, capsys):
    src, ckpt, dst = tmp_path / "src", tmp_path / "ckpt", tmp_path / "dst"
    hf_model = hf_testing.tiny_hf_model("llama", src, head_dim=12)
    hf_testing.tiny_tokenizer(src)
    assert cli.main(["convert", "from-hf", "--hf-dir", str(src), "--out", str(ckpt)]) == 0
    stored = json.loads((ckpt / "config.json").read_text())
    assert stored["model"]["head_dim"] == 12 and stored["model"]["num_layers"] == 2
    assert (ckpt / "tokenizer" / "tokenizer.json").is_file()
    params, config = checkpoint.restore_model(str(ckpt))
    ours = Decoder(LLMConfig.from_config(config.model)).apply({"params": params}, jnp.asarray(IDS))
    np.testing.assert_allclose(np.asarray(ours), torch_logits(hf_model), atol=1e-4)
    assert cli.main(["convert", "to-hf", "--ckpt", str(ckpt), "--out", str(dst),
                     "--max-shard-size", "20KB"]) == 0
    index = json.loads((dst / hf_llm.INDEX_FILE).read_text())   # HF units: 20KB = 20,000 bytes
    assert len(set(index["weight_map"].values())) > 1
    for file in set(index["weight_map"].values()):
        assert (dst / file).stat().st_size < 20_000 + 4_000   # data + header
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(dst)).eval()
    np.testing.assert_array_equal(torch_logits(reloaded), torch_logits(hf_model))
    assert transformers.AutoTokenizer.from_pretrained(str(dst)).eos_token == "</s>"
    assert cli.main(["convert", "to-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "z"),
                     "--max-shard-size", "5 gigs"]) == 1
    assert "expected a number of bytes" in capsys.readouterr().err
    # A bad input directory is a clean error (exit 1), not a traceback.
    assert cli.main(["convert", "from-hf", "--hf-dir", str(tmp_path / "nope"),
                     "--out", str(tmp_path / "x")]) == 1
    assert "config.json" in capsys.readouterr().err
    # An explicit config with the wrong shapes names the tensor.
    assert cli.main(["convert", "from-hf", "--hf-dir", str(src), "--out", str(tmp_path / "y"),
                     "--config", "configs/llm.py:tiny"]) == 1
    assert "model.embed_tokens.weight" in capsys.readouterr().err


def test_import_places_tensors_on_a_tensor_parallel_mesh(tmp_path):
    from uniecg_jax import sharding
    hf_model = hf_testing.tiny_hf_model("qwen2", tmp_path, num_key_value_heads=4)
    config = LLMConfig.from_config(hf_llm.model_config_from_hf(str(tmp_path)))
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    abstract = hf_llm.abstract_params_for(config, mesh)
    params = hf_llm.load_hf_params(str(tmp_path), config, abstract_params=abstract)
    query = params["layers_1"]["attention"]["query"]["kernel"]           # [D, H, Dh]
    assert query.sharding == abstract["layers_1"]["attention"]["query"]["kernel"].sharding
    assert query.sharding.spec[:2] == ("fsdp", "tensor")
    assert len(query.addressable_shards) == 8
    assert query.addressable_shards[0].data.shape == (20, 1, 10)
    with sharding.logical_rules_context(mesh):
        logits = jax.jit(Decoder(config).apply)({"params": params}, jnp.asarray(IDS))
    np.testing.assert_allclose(np.asarray(logits), torch_logits(hf_model), atol=1e-4)
