"""`uniecg prep`: convert a dataset (mimic, ptbxl, cinc, grounding, synthetic) into ArrayRecord
shards split by patient, resumable, with summary.json and skipped.jsonl. See data_prep/prep.py.

  uniecg prep --source cinc --root bundled --out /tmp/cinc_shards --workers 2 --shard-size 16
  uniecg prep --source mimic --root /data/mimic-iv-ecg --out /data/mimic_prep --shard-size 2000
  uniecg prep --source mimic --root /mnt/mimic-iv-ecg --out /mnt/mimic_prep --runner dataflow \
      --beam-options "--project=P --region=R --temp_location=gs://B/tmp --setup_file=./setup.py"

Beam runners (pip install 'uniecg_jax[beam]') write the same shards as the local pool; their
workers must see --root and --out. A rerun into --out with other options stops unless --overwrite.
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
