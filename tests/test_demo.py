"""`uniecg demo --quick`: the README's main job end to end (tiny steps) through the CLI."""
import json
import os

from uniecg_jax.cli import main


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
