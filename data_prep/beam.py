"""`uniecg prep --runner direct|dataflow|flink|spark`: the same shards on Apache Beam.

The pipeline is one parallel step over the pending shard names: each worker plans the shards itself
from the same options (`prep.plan`: deterministic, so every worker agrees on which records a shard
holds; the pipeline graph carries only names, never the item list of a 800k-record dataset), loads
its text encoder once (`DoFn.setup`) and calls `prep.write_shard`, the function the local pool
calls, so both runners write the same bytes. The launching process writes `summary.json` and
`skipped.jsonl` from the shards' meta files once the pipeline has finished.

On a distributed runner (Dataflow, Flink, Spark) the workers read `--root` and write `--out`
directly, so both must be paths the workers see (a shared file system or a bucket mounted on every
worker), and the workers need this package: pass e.g. `--setup_file=./setup.py` or
`--requirements_file` in `--beam-options`.

Needs the optional `beam` extra: `pip install 'uniecg_jax[beam]'`.
"""
from __future__ import annotations

import logging

import apache_beam as beam
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions

from data_prep import prep

BEAM_RUNNERS = {"direct": "DirectRunner", "dataflow": "DataflowRunner", "flink": "FlinkRunner",
                "spark": "SparkRunner"}

log = logging.getLogger(__name__)


class WriteShards(beam.DoFn):
    """Shard file name -> that shard written to `options.out_dir`; yields its meta dict."""

    def __init__(self, options: prep.PrepOptions):
        self._options = options
        self._plans: dict[str, prep.ShardPlan] = {}

    def setup(self):
        plans, _ = prep.plan(self._options)
        self._plans = {plan.file: plan for plan in plans}
        prep._encoder(self._options.text_encoder)  # once per worker process, not per shard

    def process(self, shard_file: str):
        meta = prep.write_shard(self._options, self._plans[shard_file])
        log.info("prep: wrote %s (%d records, %d skipped)", shard_file, meta["num_records"],
                 len(meta["skipped"]))
        yield meta


def pipeline_options(options: prep.PrepOptions) -> PipelineOptions:
    """`--runner` from `options.runner`, then `options.beam_args` unchanged. For the DirectRunner,
    `--workers N` (N > 1) becomes N worker processes unless the Beam options choose otherwise."""
    args = [f"--runner={BEAM_RUNNERS[options.runner]}", *options.beam_args]
    if options.runner == "direct" and options.workers > 1 and not any(
            a.startswith(("--direct_num_workers", "--direct_running_mode")) for a in args):
        args += [f"--direct_num_workers={options.workers}",
                 "--direct_running_mode=multi_processing"]
    return PipelineOptions(args)


def run_beam(options: prep.PrepOptions, shard_files: list[str]) -> None:
    """Writes the named shards with a Beam pipeline on `options.runner`; returns when it is done."""
    beam_options = pipeline_options(options)
    log.info("prep: %d shards on %s (%s)", len(shard_files), BEAM_RUNNERS[options.runner],
             beam_options.view_as(DirectOptions).direct_running_mode
             if options.runner == "direct" else "distributed")
    with beam.Pipeline(options=beam_options) as pipeline:
        _ = (pipeline
             | "shards" >> beam.Create(shard_files)
             | "spread" >> beam.Reshuffle()  # one shard per bundle, not all on the first worker
             | "write" >> beam.ParDo(WriteShards(options)))
