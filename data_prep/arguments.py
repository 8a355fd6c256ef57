"""The `uniecg prep` / `python -m data_prep` command-line options, apart from the work in `prep.py`,
so that building the CLI parser (`uniecg --help`) imports no reader, wfdb, text encoder or jax."""
from __future__ import annotations

from uniecg_jax.data.prompts import PROMPT_TEMPLATES

SOURCES = ("mimic", "ptbxl", "cinc", "grounding", "synthetic")
RUNNERS = ("local", "direct", "dataflow", "flink", "spark")


def add_arguments(parser) -> None:
    """The options shared by `uniecg prep` and `python -m data_prep`."""
    parser.add_argument("--source", required=True, choices=SOURCES)
    parser.add_argument("--root", default="", help="dataset root (cinc: 'bundled' = shipped "
                        "samples; grounding: a .json/.jsonl file or folder of them)")
    parser.add_argument("--out", required=True, help="output folder for the shards")
    parser.add_argument("--workers", type=int, default=2, help="parallel processes")
    parser.add_argument("--shard-size", type=int, default=1000, help="records per shard")
    parser.add_argument("--text-encoder", default="minilm",
                        help="minilm | hash[:D] | precomputed:FILE.npz | none")
    parser.add_argument("--prompt-template", default="plain", choices=PROMPT_TEMPLATES,
                        help="text fed to the encoder: the report, or DiffuSETS' diagnosis prompt")
    parser.add_argument("--missing-leads", default="error", choices=("error", "zero"))
    parser.add_argument("--num-records", type=int, default=100, help="synthetic: how many")
    parser.add_argument("--seed", type=int, default=0, help="synthetic: generator seed")
    parser.add_argument("--ecg-root", default=None, help="grounding: base of relative ecg paths")
    parser.add_argument("--min-seconds", type=float, default=1.0,
                        help="skip records shorter than this; records under 10 s are kept "
                             "zero-padded and counted as num_short in summary.json")
    parser.add_argument("--no-conversations", action="store_true",
                        help="do not build grounded conversations for records that have none")
    parser.add_argument("--split", default="0.8,0.1,0.1", help="train,validation,test fractions")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--overwrite", action="store_true",
                        help="--out was prepared with other options: remove its prep outputs first")
    parser.add_argument("--runner", default="local", choices=RUNNERS,
                        help="local: a process pool here; direct|dataflow|flink|spark: Apache Beam "
                        "(pip install 'uniecg_jax[beam]'), same shards")
    parser.add_argument("--beam-options", default="",
                        help="Beam pipeline options, passed through, e.g. \"--project=P "
                        "--region=R --temp_location=gs://B/tmp --setup_file=./setup.py\"")
