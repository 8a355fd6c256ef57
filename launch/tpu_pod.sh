#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: every worker (host) runs the same `uniecg train` command.
#
#   TPU=my-v4-64 ZONE=us-central2-b CONFIG=configs/llm.py:llama2_7b \
#   WORKDIR=gs://my-bucket/runs/llama2 launch/tpu_pod.sh [--config.mesh.fsdp=-1 ...]
#
# Steps (each idempotent, so re-running after a preemption resumes from WORKDIR's newest checkpoint):
#   1. (optional, CREATE=1) create the TPU VM slice with `gcloud compute tpus tpu-vm create`.
#   2. copy this repository to every worker (`gcloud compute tpus tpu-vm scp --worker=all`).
#   3. install it on every worker: `pip install -e .` plus `jax[tpu]`.
#   4. start training on all workers at once over `gcloud compute tpus tpu-vm ssh --worker=all`,
#      with --config.distributed=True so each host calls `jax.distributed.initialize()` (the TPU
#      runtime supplies the coordinator address, process count and index) before building the mesh.
# WORKDIR must be storage every host can reach (a gs:// bucket): Orbax writes each host's shards of
# the train state there, and grain one data-iterator file per host.
# Preemption: the TPU VM sends SIGTERM; `uniecg train` writes a final checkpoint and exits 0.
set -euo pipefail

: "${TPU:?set TPU=<tpu-vm name>}"
: "${ZONE:?set ZONE=<zone>, e.g. us-central2-b}"
: "${CONFIG:=configs/llm.py:llama2_7b}"
: "${WORKDIR:?set WORKDIR=gs://bucket/path (shared by all hosts)}"
: "${ACCELERATOR:=v4-64}"             # only used with CREATE=1
: "${RUNTIME:=tpu-ubuntu2204-base}"   # only used with CREATE=1
: "${REPO_DIR:=uniecg_jax}"           # checkout location on the workers (relative to $HOME)
: "${PROJECT_FLAG:=}"                 # e.g. --project=my-project

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [[ "${CREATE:-0}" == "1" ]]; then
  gcloud compute tpus tpu-vm create "$TPU" --zone "$ZONE" --accelerator-type "$ACCELERATOR" \
    --version "$RUNTIME" $PROJECT_FLAG
fi

# Ship the code (excluding git history and local run outputs) to every worker.
tar -C "$REPO_ROOT" --exclude=.git --exclude='*.egg-info' --exclude=__pycache__ -czf /tmp/uniecg_src.tgz .
gcloud compute tpus tpu-vm scp /tmp/uniecg_src.tgz "$TPU":/tmp/uniecg_src.tgz --zone "$ZONE" \
  --worker=all $PROJECT_FLAG

gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all $PROJECT_FLAG --command "
  set -e
  mkdir -p ~/$REPO_DIR && tar -xzf /tmp/uniecg_src.tgz -C ~/$REPO_DIR
  cd ~/$REPO_DIR
  python3 -m pip install -q -U 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
  python3 -m pip install -q -e .
"

# All workers start together; each prints to its own console, host 0 logs progress.
ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all $PROJECT_FLAG --command "
  cd ~/$REPO_DIR && uniecg train --config $CONFIG --workdir $WORKDIR --config.distributed=True $ARGS
"
