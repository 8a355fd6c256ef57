#!/usr/bin/env bash
# Train on one machine (a laptop CPU, one GPU box, or a single TPU VM host).
#
#   launch/single_host.sh configs/llm.py:tiny /tmp/lm [--config.train.steps=200 ...]
#   DRY_RUN=1 launch/single_host.sh configs/llm.py:llama2_7b - --config.mesh.fsdp=8
#
# Uses every local device (the mesh's -1 axis takes them all). Re-running the same command resumes
# from the newest checkpoint in WORKDIR; SIGTERM (`kill PID`) writes a final checkpoint first.
# DRY_RUN=1 compiles the train step and prints per-device memory instead of training
# (SIM_DEVICES=N simulates N CPU devices for it).
set -euo pipefail

CONFIG="${1:?usage: launch/single_host.sh CONFIG WORKDIR [--config.key=value ...]}"
WORKDIR="${2:?usage: launch/single_host.sh CONFIG WORKDIR [--config.key=value ...]}"
shift 2

if [[ "${DRY_RUN:-0}" == "1" ]]; then
  exec uniecg dry-run --config "$CONFIG" ${SIM_DEVICES:+--devices "$SIM_DEVICES"} "$@"
fi
exec uniecg train --config "$CONFIG" --workdir "$WORKDIR" "$@"
