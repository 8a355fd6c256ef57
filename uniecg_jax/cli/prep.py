"""`uniecg prep`: convert a dataset (mimic, ptbxl, cinc, grounding, synthetic) into ArrayRecord
shards split by patient, resumable, with summary.json and skipped.jsonl. See data_prep/prep.py.

  uniecg prep --source cinc --root bundled --out /tmp/cinc_shards --workers 2 --shard-size 16
  uniecg prep --source mimic --root /data/mimic-iv-ecg --out gs://.../mimic --shard-size 2000
"""
from __future__ import annotations

from data_prep.arguments import add_arguments


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "prep", help="dataset -> ArrayRecord shards (train/validation/test by patient)",
        description=__doc__)
    add_arguments(parser)
    parser.set_defaults(handler=handle)


def handle(args) -> int:
    from data_prep.prep import handle as prep  # the work: readers, text encoders (heavy imports)

    return prep(args)
