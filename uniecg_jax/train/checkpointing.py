"""Orbax checkpoints of a training run: train state, data-iterator state, config.

Layout: `WORKDIR/checkpoints/<step>/{state, data, config}`. `state` is the TrainState (params, opt
state, step) written asynchronously by every host for its own shards; `data` is the grain iterator's
position (one file per host, grain's own Orbax handler); `config` is the run's config as JSON, so a
checkpoint says what produced it. Restores go straight onto the shardings of an abstract train state,
so a resumed 7B run never materialises anything unsharded.

A SIGTERM (the preemption notice of a TPU VM or a scheduler) sets a flag; the train loop checks it
after every step, writes a final checkpoint and exits.
"""
from __future__ import annotations

import json
import os
import signal
import threading
from typing import Any

import grain
import jax
from jax.experimental import multihost_utils
import ml_collections
import orbax.checkpoint as ocp

from uniecg_jax.config import config_to_json
from uniecg_jax.errors import CheckpointError
from uniecg_jax.layers.params import path_name

STATE, DATA, CONFIG = "state", "data", "config"


class RunCheckpointer:
    """Async CheckpointManager for one run's directory (`WORKDIR/checkpoints`)."""

    def __init__(self, workdir: str, keep: int = 2, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep if keep and keep > 0 else None, create=True,
            enable_async_checkpointing=async_save)
        handlers = {STATE: ocp.StandardCheckpointHandler(), CONFIG: ocp.JsonCheckpointHandler(),
                    DATA: grain.checkpoint.CheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        """Newest finalised step (incomplete, interrupted saves are ignored), or None."""
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any | None,
             config: ml_collections.ConfigDict, force: bool = False) -> bool:
        """Starts an async save of step `step`; device buffers are copied out before it returns, so
        the caller may donate `state` to the next step right away."""
        items = {STATE: ocp.args.StandardSave(state),
                 CONFIG: ocp.args.JsonSave(json.loads(config_to_json(config)))}
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state: Any, data_iterator: Any | None) -> Any:
        """Restores step `step` onto `abstract_state`'s shardings (ShapeDtypeStructs carrying
        `.sharding`) and, in place, the position of `data_iterator`. Returns the train state."""
        self._check_matches(step, abstract_state)
        items = {STATE: ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
            raise CheckpointError(
                f"{self.directory}/{step}: cannot restore onto this model/optimizer ({e}); was it "
                "written by a different config? Use a fresh --workdir or the original config."
            ) from None
        return restored[STATE]

    def _check_matches(self, step: int, abstract_state: Any) -> None:
        """Compares the stored tree (names, shapes, dtypes) with the one to restore, so a config
        change (model size, freeze regex, optimizer) is reported by tensor name before any read."""
        try:
            stored_tree = self.manager.item_metadata(step)[STATE]
        except Exception as e:  # unreadable metadata: let restore report what is wrong
            raise CheckpointError(f"{self.directory}/{step}/{STATE}: unreadable metadata ({e})") from None
        stored = {path_name(path, "."): (tuple(meta.shape), str(meta.dtype))
                  for path, meta in jax.tree_util.tree_leaves_with_path(stored_tree)}
        wanted = {path_name(path, "."): (tuple(x.shape), str(x.dtype))
                  for path, x in jax.tree_util.tree_leaves_with_path(abstract_state)}
        problems = [f"{name}: missing in checkpoint" for name in wanted if name not in stored]
        problems += [f"{name}: in checkpoint, not in this model/optimizer" for name in stored
                     if name not in wanted]
        problems += [f"{name}: checkpoint has {stored[name][0]} {stored[name][1]}, model needs "
                     f"{want[0]} {want[1]}" for name, want in wanted.items()
                     if name in stored and stored[name] != want]
        if problems:
            shown = "; ".join(problems[:5]) + (f"; ... {len(problems) - 5} more"
                                               if len(problems) > 5 else "")
            raise CheckpointError(
                f"{self.directory}/{step}: does not match this config ({shown}). Was it written with "
                "another model size, freeze regex or optimizer? Use the original config or a fresh "
                "--workdir.")

    def saved_config(self, step: int) -> dict:
        """The config stored with step `step`, as a plain dict."""
        return self.manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[
            CONFIG]

    def wait(self) -> None:
        """Blocks until pending async saves are finalised on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class PreemptionFlag:
    """Set by SIGTERM (and SIGINT if asked); the loop polls it between steps.

    Installed only in the main thread (signal handlers cannot be set elsewhere); the previous
    handlers are put back by `restore()`.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self._event = threading.Event()
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name
        self._event.set()

    def __bool__(self) -> bool:
        return self._event.is_set()

    def any_host(self) -> bool:
        """True when any host was signalled (all hosts must take the same branch: a save is a
        collective operation)."""
        local = self._event.is_set()
        if jax.process_count() == 1:
            return local
        return bool(multihost_utils.process_allgather(local).any())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
