"""`uniecg prep`: convert a dataset (mimic, ptbxl, cinc, grounding, synthetic) into ArrayRecord
shards split by patient, resumable, with summary.json and skipped.jsonl. See data_prep/prep.py.

  uniecg prep --source cinc --root bundled --out /tmp/cinc_shards --workers 2 --shard-size 16
  uniecg prep --source mimic --root /data/mimic-iv-ecg --out gs://.../mimic --shard-size 2000
"""
from __future__ import annotations

SOURCES = ("mimic", "ptbxl", "cinc", "grounding", "synthetic")


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
    parser.add_argument("--prompt-template", default="plain", choices=("plain", "diffusets"),
                        help="text fed to the encoder: the report, or DiffuSETS' diagnosis prompt")
    parser.add_argument("--missing-leads", default="error", choices=("error", "zero"))
    parser.add_argument("--num-records", type=int, default=100, help="synthetic: how many")
    parser.add_argument("--seed", type=int, default=0, help="synthetic: generator seed")
    parser.add_argument("--ecg-root", default=None, help="grounding: base of relative ecg paths")
    parser.add_argument("--no-conversations", action="store_true",
                        help="do not build grounded conversations for records that have none")
    parser.add_argument("--split", default="0.8,0.1,0.1", help="train,validation,test fractions")
    parser.add_argument("--no-progress", action="store_true")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "prep", help="dataset -> ArrayRecord shards (train/validation/test by patient)",
        description=__doc__)
    add_arguments(parser)
    parser.set_defaults(handler=_handle)


def _handle(args) -> int:
    from data_prep.prep import handle

    return handle(args)
