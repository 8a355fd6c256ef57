"""`uniecg demo --quick`: the README's main job end to end (tiny steps) through the CLI.

Slow (several minutes on 2 cores: it compiles stage 1, the VAE, the UNet and stage 2); run with
`python -m pytest -m slow`. Each part also has fast tests of its own in the default run.
"""
import json
import os

import numpy as np
import pytest

from uniecg_jax.cli import main


@pytest.mark.slow
def test_demo_quick_trains_interprets_and_reports_against_baselines(tmp_path, capsys):
    workdir = tmp_path / "demo"
    assert main(["demo", "--quick", "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert "== stage 1" in out and "held-out records" in out
    assert "model: diagnosis F1" in out and "baseline: diagnosis F1" in out
    assert "== diffusion" in out and "baseline: unconditional" in out
    assert "== stage 2" in out
    metrics_path = workdir / "eval_interpret" / "results.jsonl.metrics.json"
    metrics = json.loads(metrics_path.read_text())
    assert metrics["model"]["num_records"] == metrics["baseline"]["num_records"] > 0
    with open(workdir / "eval_interpret" / "results.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == metrics["model"]["num_records"]
    assert len({row["record_id"] for row in rows}) == len(rows)
    assert os.path.isfile(workdir / "stage1" / "model" / "config.json")
    # The demo's models serve the evaluation jobs: generation through the LLM's [ECG] tokens.
    out_json = tmp_path / "eval_llm.json"
    assert main(["eval", "generate", "--via", "llm", "--stage2-ckpt", str(workdir / "stage2"),
                 "--ckpt", str(workdir / "diffusion"), "--out", str(out_json),
                 "--max-records", "2", "--n", "1", "--steps", "3"]) == 0
    result = json.loads(out_json.read_text())
    assert result["num_records"] == 2 and {"via_llm", "true_embedding"} <= set(result)
    # The reported cosines are those of the stage-2 model's own answers: recomputed here one
    # request at a time through UnifiedModel.respond against the text encoder's embeddings.
    from uniecg_jax.data.chat_format import GENERATION_REQUEST
    from uniecg_jax.data.text_encoder import get_text_encoder
    from uniecg_jax.eval.llm_generate_eval import cosine_similarity
    from uniecg_jax.inference.chat import UnifiedModel
    from uniecg_jax.data.bundled import bundled_split

    unified = UnifiedModel.load(str(workdir / "stage2"))
    config = unified.config
    records = bundled_split(int(config.data.holdout_every), int(config.data.num_synthetic),
                            int(config.seed))["test"][:2]
    true = get_text_encoder(str(config.text.encoder)).encode([r.report for r in records])
    budget = unified.model.config.num_ecg_tokens + 2
    predicted = np.concatenate([unified.respond([GENERATION_REQUEST + r.report],
                                                max_new_tokens=budget)[1] for r in records])
    cosine = cosine_similarity(predicted, true)
    np.testing.assert_allclose(result["embedding_cosine"]["per_record"], cosine, atol=1e-4)
    assert abs(result["embedding_cosine"]["mean"] - cosine.mean()) < 1e-4
