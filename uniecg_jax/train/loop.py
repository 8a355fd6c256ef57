"""The one train-loop skeleton every objective shares (LM, stage 1, stage 2, diffusion).

An objective describes itself as a `TrainTask` (how to init params, its loss, its data, its FLOPs,
its finalised config, how to export the trained model, and, for a multi-phase objective such as
diffusion's VAE-then-UNet, its `phases`); `run(config, workdir, task)` trains every phase with
`train` and exports, the same way for all of them. `train(config, workdir, task)` is one phase:

  mesh from config -> optimizer (AdamW + schedule + clipping + freezing) -> abstract sharded train
  state -> restore the newest checkpoint in WORKDIR (state + data position) or initialise sharded ->
  AOT-compile the step -> loop: global batch from each host's rows, step(state, batch,
  fold_in(seed, step)), log loss / lr / tokens/s / MFU to stdout and WORKDIR/metrics.jsonl,
  periodic async checkpoints, a final one at the end or on SIGTERM.

`dry_run(config, task)` compiles the same step against abstract inputs and reports per-device memory.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections

from uniecg_jax import caches, sharding as sharding_lib
from uniecg_jax.caches import enable_compilation_cache
from uniecg_jax.config import ConfigError
from uniecg_jax.train import checkpointing, optim, state as state_lib, step as step_lib

log = logging.getLogger("uniecg.train")


@dataclasses.dataclass(frozen=True)
class Phase:
    """One phase of a multi-phase objective, trained by `train` in WORKDIR/<name>.

    Attributes:
      name: the phase's subdirectory of the workdir (its checkpoints and metrics.jsonl).
      build: `(workdir, previous) -> TrainTask`, where `previous` is the previous phase's final
        params on the host (None for the first phase); the task's `config` is the phase's config.
    """
    name: str
    build: Callable[[str, Any], "TrainTask"]


@dataclasses.dataclass
class TrainTask:
    """What an objective contributes to the shared loop.

    Attributes:
      name: objective name for logs ("lm", "stage1", ...).
      init_params: `rng -> boxed params` (flax `init(...)["params"]`, logical partitioning kept).
      loss_fn: `(params, batch, rng) -> (loss, aux)`; aux may hold `num_tokens` (loss denominator).
      make_data: `(process_index, process_count, local_batch_size) -> iterator` of numpy batches
        (dicts of [local_batch, ...] arrays); a grain DatasetIterator so its position checkpoints.
      abstract_batch: `global_batch_size -> pytree of jax.ShapeDtypeStruct` (for the dry run).
      flops_per_step: model FLOPs of one optimizer step (forward + backward) on the global batch.
      tokens_per_step: input positions per step on the global batch (throughput unit).
      num_params: parameter count (for logs).
      data_description: one line saying where the data comes from (printed at start), or a
        callable returning it (so building a task for a dry run reads no data).
      initial_params: optional `(mesh, abstract_params) -> params` used instead of random init when
        no checkpoint exists (e.g. an imported Hugging Face checkpoint), already sharded.
      config: the config this task was built for after finalisation (vocabulary sizes and token ids
        filled in, a phase's steps): what `train` reads and checkpoints. None = the config given.
      tokenizer: the tokenizer the data is encoded with (objectives over text), else None.
      export: optional `(workdir, params) -> model directory`: writes the servable model after the
        last step (`run` calls it).
      phases: for a multi-phase objective, the phases `run` trains in order (the task's own fields
        then describe the step `dry_run` compiles); empty for a one-phase objective.
    """
    name: str
    init_params: Callable[[jax.Array], Any]
    loss_fn: Callable[[Any, Any, jax.Array], tuple[jax.Array, dict]]
    make_data: Callable[[int, int, int], Iterator[Any]]
    abstract_batch: Callable[[int], Any]
    flops_per_step: float
    tokens_per_step: int
    num_params: int
    data_description: str | Callable[[], str] = ""
    initial_params: Callable[[Any, Any], Any] | None = None
    config: ml_collections.ConfigDict | None = None
    tokenizer: Any = None
    export: Callable[[str, Any], str] | None = None
    phases: tuple[Phase, ...] = ()


@dataclasses.dataclass
class TrainResult:
    state: Any
    history: list[dict]
    stopped_by_signal: str | None
    steps_run: int


@dataclasses.dataclass
class RunResult:
    """What `run` did: each phase's TrainResult by phase name (a one-phase task's under its task
    name), the exported model directory (None when stopped early or nothing is exported), and the
    signal that stopped it (None when it finished)."""
    phases: dict[str, TrainResult]
    model_dir: str | None
    stopped_by_signal: str | None

    @property
    def last(self) -> TrainResult:
        return list(self.phases.values())[-1]


def _echo(message: str) -> None:
    """Progress lines go to stdout on host 0 only (every host runs the loop)."""
    if jax.process_index() == 0:
        print(message, flush=True)


def build_optimizer_and_state(config: ml_collections.ConfigDict, task: TrainTask, mesh
                              ) -> tuple[Any, Any, Any, Any, Any]:
    """(tx, schedule, labels, abstract_state, state_shardings) for `task` on `mesh`."""
    abstract_params, _ = sharding_lib.abstract_sharded_init(task.init_params, mesh,
                                                            jax.random.PRNGKey(0))
    tx, schedule, labels = optim.make_optimizer(config.train, abstract_params)
    abstract_state, shardings = state_lib.abstract_train_state(task.init_params, tx, mesh)
    return tx, schedule, labels, abstract_state, shardings


# Where the measured CPU peak is kept, per host (CPU model and core count).
PEAK_CACHE_FILE = "peak_flops.json"
# The CPU peak is the best of this many timed runs of the matmul (the host may be busy during one).
PEAK_TRIALS = 7


def host_key() -> str:
    """The CPU model and core count (a measured peak is valid for that host kind)."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.lower().startswith("model name")), "")
    except OSError:
        pass
    return f"{model or platform.processor() or platform.machine()} x{os.cpu_count()}"


def measure_cpu_peak_flops(trials: int = PEAK_TRIALS, size: int = 1024, dtype: str = "bf16") -> float:
    """FLOP/s of this host's fastest [size, size] matmul in `dtype`: the best of `trials` timed runs
    of 5 matmuls, so one run slowed by other work does not set the peak.

    "bf16" takes the faster of bf16 -> bf16 and bf16 -> f32 accumulation (XLA's CPU backend runs the
    two through different kernels; on an AVX-512-BF16 host the model's bf16 dots beat the f32-acc
    one, and an MFU above 100% followed), "f32" the f32 matmul.
    """
    if dtype == "f32":
        variants = [(jnp.float32, jnp.float32)]
    elif dtype == "bf16":
        variants = [(jnp.bfloat16, jnp.bfloat16), (jnp.bfloat16, jnp.float32)]
    else:
        raise ValueError(f"measure_cpu_peak_flops: dtype {dtype!r} is not 'bf16' or 'f32'")
    best = math.inf
    for inputs, accumulate in variants:
        a = jnp.ones((size, size), inputs)
        matmul = jax.jit(lambda x, y, acc=accumulate: jnp.matmul(x, y, preferred_element_type=acc))
        matmul(a, a).block_until_ready()
        repeats = 5
        for _ in range(trials):
            start = time.perf_counter()
            for _ in range(repeats):
                out = matmul(a, a)
            out.block_until_ready()
            best = min(best, (time.perf_counter() - start) / repeats)
    return 2 * size ** 3 / best


def peak_flops_per_device() -> tuple[float, str]:
    """Peak FLOP/s of one device and where the number comes from.

    TPU/GPU: the vendor's dense bf16 figure by device kind. CPU: `measure_cpu_peak_flops`, measured
    once per host kind and cached in `caches.cache_home()/peak_flops.json` (a later, busier start-up
    would otherwise measure a lower peak and report an MFU above 100%).
    """
    device = jax.devices()[0]
    kind = device.device_kind.lower()
    table = {"tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12,
             "tpu v5": 459e12, "tpu v6 lite": 918e12, "tpu v6e": 918e12, "tpu7x": 2307e12,
             "h100": 989e12, "h200": 989e12, "a100": 312e12, "b200": 2250e12}
    for name, flops in table.items():
        if name in kind:
            return flops, f"{device.device_kind} spec sheet (bf16 dense)"
    key = host_key()
    host_peak = caches.read_host_value(PEAK_CACHE_FILE, key)
    source = "cached"
    if not isinstance(host_peak, (int, float)) or not host_peak > 0:
        host_peak, source = measure_cpu_peak_flops(), "measured"
        caches.write_host_value(PEAK_CACHE_FILE, key, host_peak)
    # Simulated CPU devices share the same cores, so the host's peak is split between them.
    per_device = host_peak / max(1, jax.local_device_count())
    return per_device, (f"{source} bf16 matmul peak of this host ({key}, best of "
                        f"{PEAK_TRIALS}) / local devices")


def format_mfu(mfu: float) -> str:
    """`mfu 12.3%`; above 100% the peak estimate itself is wrong, which is what is printed."""
    if mfu > 1.0:
        return "mfu n/a (above 100%: the peak FLOP/s estimate is unreliable)"
    return f"mfu {mfu:.1%}"


def _global_batch_size(config: ml_collections.ConfigDict, mesh) -> int:
    batch_size = int(config.train.batch_size)
    accum = int(config.train.grad_accum_steps)
    divisor = sharding_lib.batch_divisor(mesh) * accum
    if batch_size % divisor or batch_size % jax.process_count():
        raise ConfigError(
            f"train.batch_size={batch_size} must be divisible by data*fsdp "
            f"({sharding_lib.batch_divisor(mesh)}) x grad_accum_steps ({accum}) and by the host "
            f"count ({jax.process_count()})")
    return batch_size


def _truncate_metrics(path: str, last_step: int) -> None:
    """Drops metrics lines logged after the checkpoint being resumed (they will be redone)."""
    if not os.path.exists(path) or jax.process_index() != 0:
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= last_step]
    with open(path, "w") as f:
        f.writelines(kept)


def run(config: ml_collections.ConfigDict, workdir: str, task: TrainTask) -> RunResult:
    """Trains (or resumes) every phase of `task` in `workdir`, then exports the model.

    A one-phase task trains in `workdir`; a multi-phase one trains phase i in `workdir/<name>`, each
    phase built from the previous one's final params, so rerunning after a kill resumes whichever
    phase was interrupted (a finished phase restores its final checkpoint and runs no step). The
    export (the last phase's `export`) runs only when every phase finished.
    """
    results: dict[str, TrainResult] = {}
    if not task.phases:
        last_task = task
        results[task.name] = result = train(config, workdir, task)
    else:
        previous = None
        for phase in task.phases:
            last_task = phase.build(workdir, previous)
            result = train(config, os.path.join(workdir, phase.name), last_task)
            results[phase.name] = result
            if result.stopped_by_signal:
                break
            # On the host: the next phase's first step donates its state, and device_put onto an
            # equal sharding would alias (and so delete) this result's arrays.
            previous = jax.device_get(result.state.params)
            result.state = result.state.replace(params=previous)
    model_dir = None
    if result.stopped_by_signal is None and last_task.export is not None:
        model_dir = last_task.export(workdir, optim.export_params(result.state))
        _echo(f"[{task.name}] exported model to {model_dir}")
    return RunResult(results, model_dir, result.stopped_by_signal)


def train(config: ml_collections.ConfigDict, workdir: str, task: TrainTask) -> TrainResult:
    """Runs (or resumes) training of `task` in `workdir` until `train.steps` of `task.config` (or of
    `config` for a task without one)."""
    # First, so a preemption notice during start-up (restore, compile) is not lost either.
    preemption = checkpointing.PreemptionFlag()
    try:
        return _train(task.config if task.config is not None else config, workdir, task,
                      preemption)
    finally:
        preemption.restore()


def _train(config: ml_collections.ConfigDict, workdir: str, task: TrainTask,
           preemption: checkpointing.PreemptionFlag) -> TrainResult:
    sharding_lib.maybe_initialize_distributed(bool(config.distributed))
    train_cfg = config.train
    if train_cfg.compilation_cache_dir:
        enable_compilation_cache(str(train_cfg.compilation_cache_dir))
    total_steps = int(train_cfg.steps)
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding_lib.make_mesh(config.mesh)
    global_batch = _global_batch_size(config, mesh)
    tx, schedule, labels, abstract_state, shardings = build_optimizer_and_state(config, task, mesh)
    frozen = sum(label == optim.FROZEN for label in jax.tree.leaves(labels))
    param_count = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_state.params))
    _echo(f"[{task.name}] mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform}"
          f" devices, {jax.process_count()} host(s); {param_count / 1e6:.2f}M params"
          f"{f', {frozen} frozen tensors' if frozen else ''}; global batch {global_batch}"
          f" x grad_accum {int(train_cfg.grad_accum_steps)}")
    description = (task.data_description() if callable(task.data_description)
                   else task.data_description)
    if description:
        _echo(f"[{task.name}] data: {description}")

    local_batch = global_batch // jax.process_count()
    data_iterator = task.make_data(jax.process_index(), jax.process_count(), local_batch)
    checkpointer = checkpointing.RunCheckpointer(
        workdir, keep=int(train_cfg.keep_checkpoints), async_save=bool(train_cfg.async_checkpoint))
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    latest = checkpointer.latest_step()
    if latest is not None:
        state = checkpointer.restore(latest, abstract_state, data_iterator)
        _truncate_metrics(metrics_path, latest)
        _echo(f"[{task.name}] resumed from {checkpointer.directory}/{latest}")
    else:
        given = (task.initial_params(mesh, abstract_state.params)
                 if task.initial_params is not None else None)
        state = state_lib.init_train_state(task.init_params, tx, mesh,
                                           jax.random.PRNGKey(int(config.seed)), shardings, given)
    start_step = int(jax.device_get(state.step))

    train_step = step_lib.jit_train_step(
        step_lib.make_train_step(task.loss_fn, tx, schedule, labels,
                                 int(train_cfg.grad_accum_steps)), shardings, mesh)
    peak_flops, peak_source = peak_flops_per_device()
    log_every = max(1, int(train_cfg.log_every))
    checkpoint_every = int(train_cfg.checkpoint_every)
    history: list[dict] = []
    stopped_by: str | None = None
    step = start_step
    window_start, window_steps = time.perf_counter(), 0
    pending: list[tuple[int, dict]] = []
    saved_step = latest

    def flush_metrics(window_start: float, window_steps: int) -> tuple[float, int]:
        """Fetches the pending steps' metrics, appends them to metrics.jsonl, prints one line for
        the newest; returns a fresh throughput window."""
        jax.block_until_ready(pending[-1][1])
        elapsed = time.perf_counter() - window_start
        records = [dict(step=s, **{k: float(v) for k, v in jax.device_get(m).items()})
                   for s, m in pending]
        pending.clear()
        record = records[-1]
        if window_steps and elapsed > 0:
            record["tokens_per_s"] = task.tokens_per_step * window_steps / elapsed
            record["step_time_s"] = elapsed / window_steps
            record["mfu"] = (task.flops_per_step * window_steps / elapsed
                             / (peak_flops * jax.device_count()))
        history.extend(records)
        if jax.process_index() == 0:
            with open(metrics_path, "a") as f:
                for r in records:
                    f.write(json.dumps(r) + "\n")
        throughput = (f" {record['tokens_per_s']:,.0f} tok/s {format_mfu(record['mfu'])}"
                      if "mfu" in record else "")
        _echo(f"[{task.name}] step {record['step']}/{total_steps} "
              f"({100 * record['step'] / total_steps:.0f}%) loss {record['loss']:.4f} "
              f"lr {record['learning_rate']:.2e} grad_norm {record['grad_norm']:.3f}{throughput}")
        return time.perf_counter(), 0

    try:
        while step < total_steps:
            batch = sharding_lib.global_batch_from_host(next(data_iterator), mesh)
            state, metrics = train_step(state, batch, step_lib.step_rng(int(config.seed), step))
            step += 1
            window_steps += 1
            pending.append((step, metrics))
            if step == start_step + 1:
                # The first step includes compilation; keep it out of the throughput window.
                jax.block_until_ready(metrics)
                window_start, window_steps = time.perf_counter(), 0
            if step % log_every == 0 or step == total_steps:
                window_start, window_steps = flush_metrics(window_start, window_steps)
            if checkpoint_every > 0 and step % checkpoint_every == 0 and step < total_steps:
                checkpointer.save(step, state, data_iterator, config)
                saved_step = step
            # On pods the check is a collective (all hosts must save together), so only at log steps.
            if (jax.process_count() == 1 or step % log_every == 0) and preemption.any_host():
                stopped_by = preemption.signal_name or "signal"
                break
        if pending:  # steps since the last log line (a preemption between log steps)
            flush_metrics(window_start, window_steps)
        if saved_step != step:
            checkpointer.save(step, state, data_iterator, config, force=True)
        checkpointer.wait()
        if stopped_by:
            _echo(f"[{task.name}] {stopped_by}: saved step {step} to {checkpointer.directory}, exiting")
        else:
            _echo(f"[{task.name}] done: step {step}, checkpoint in {checkpointer.directory}; "
                  f"MFU against {peak_source}")
    finally:
        checkpointer.close()
    return TrainResult(state=state, history=history, stopped_by_signal=stopped_by,
                       steps_run=step - start_step)


def dry_run(config: ml_collections.ConfigDict, task: TrainTask, devices: Any = None) -> dict:
    """Lowers and compiles the train step for the configured mesh without allocating anything.

    `devices`: the mesh's devices (default: all local ones), e.g. compile-only TPU devices of a
    slice (`uniecg_jax.aot.topology_devices`). Returns a dict of per-device memory (bytes:
    arguments, outputs, temporaries, generated code, aliased = donated and reused), parameter
    count, and model and compiler FLOPs per step.
    """
    config = task.config if task.config is not None else config
    mesh = sharding_lib.make_mesh(config.mesh, devices)
    global_batch = _global_batch_size(config, mesh)
    tx, schedule, labels, abstract_state, shardings = build_optimizer_and_state(config, task, mesh)
    train_step = step_lib.jit_train_step(
        step_lib.make_train_step(task.loss_fn, tx, schedule, labels,
                                 int(config.train.grad_accum_steps)), shardings, mesh)
    batch_sharding = sharding_lib.batch_sharding(mesh)
    abstract_batch = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding),
        task.abstract_batch(global_batch))
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding_lib.replicated(mesh))
    t0 = time.perf_counter()
    lowered = train_step.lower(abstract_state, abstract_batch, rng)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    state_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(abstract_state))
    param_count = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_state.params))
    report = dict(
        mesh=dict(mesh.shape), devices=mesh.devices.size, platform=mesh.devices.flat[0].platform,
        device_kind=mesh.devices.flat[0].device_kind,
        global_batch=global_batch, grad_accum_steps=int(config.train.grad_accum_steps),
        num_params=param_count, train_state_bytes_total=state_bytes,
        model_flops_per_step=task.flops_per_step,
        compiler_flops_per_device=float((cost or {}).get("flops", float("nan"))),
        lower_s=t1 - t0, compile_s=t2 - t1)
    if memory is not None:
        report.update(
            argument_bytes=int(memory.argument_size_in_bytes),
            output_bytes=int(memory.output_size_in_bytes),
            alias_bytes=int(memory.alias_size_in_bytes),
            temp_bytes=int(memory.temp_size_in_bytes),
            generated_code_bytes=int(memory.generated_code_size_in_bytes))
        report["peak_estimate_bytes"] = (report["argument_bytes"] + report["output_bytes"]
                                         - report["alias_bytes"] + report["temp_bytes"]
                                         + report["generated_code_bytes"])
    return report
