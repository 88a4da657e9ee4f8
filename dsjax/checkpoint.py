"""Checkpoints: async, atomic, keep-last-K saves of the train state on orbax; SIGTERM as a flag.

What. A run's workdir holds ``checkpoints/<step>/`` with two orbax items: ``state`` (the train state
pytree of jax.Arrays, optax namedtuples included, through ``StandardSave``) and ``extra`` (a JSON dict:
data iterator state, resolved config, last metrics, through ``JsonSave``). ``Checkpointer`` wraps one
``ocp.CheckpointManager``:

    ckpt = Checkpointer(workdir / "checkpoints", keep=c.train.keep_checkpoints,
                        every=c.train.checkpoint_every)
    step0 = 0
    if ckpt.latest_step() is not None:                        # a restart with the same workdir
        state, extra = ckpt.restore(abstract_state=abstract)   # ShapeDtypeStructs with target shardings
        step0 = extra["step"]; data_iter.set_state(extra["data"][jax.process_index()])
    with catch_sigterm():
        for step in range(step0 + 1, horizon + 1):
            state, metrics = train_step(state, next(data_iter))
            stop = step == horizon or preempted()
            if ckpt.due(step, force=stop):                      # every process's data state, gathered
                ckpt.save(step, state, {"step": step, "data": allgather_json(data_iter.get_state())}, force=stop)
            if stop:
                break
    ckpt.close()                                               # waits for the last async save

Why. Saves are async: ``save`` blocks only while arrays are copied off the device (so the loop
may donate them right after; tested), and files are written on a background thread while training
goes on. Atomic: orbax writes ``<step>.orbax-checkpoint-tmp*/`` and renames it to ``<step>/`` only
after every file is written (the commit), so a crash or SIGKILL mid-save, or a save that fails,
leaves the previous step as ``latest_step()``; tmp dirs are never listed and are deleted when the
next manager opens the directory. A failed async save raises at the next ``save``/``wait``/``close``
(the run should stop: disk full, lost bucket) and is forgotten, so keep-last-K still counts only
committed steps. Restoring takes the *target* shardings (and dtypes: orbax casts) from
``abstract_state``, so a checkpoint written on one mesh restores onto any other mesh shape (orbax
reads each shard's slice of the saved global array). SIGTERM only sets a flag (saving inside a
signal handler could deadlock against the save thread); the loop polls ``preempted()``.

Choices. ``every`` is the cadence (``step % every == 0``, or ``force=True``) decided here rather
than by orbax's save-decision policies, whose initial-save and preemption policies save at steps
the config did not ask for. Saving a step that already exists returns False (the end-of-run save
may land on a cadence step). State leaves must be arrays (no Python scalars), so the state
restores to the same types. ``DSJAX_TEST_SAVE_DELAY_S`` is a test-only knob, read when a
``Checkpointer`` is built: each async commit is held open that long after the state's files are
written and before orbax finalizes and renames the step, and ``SAVE_DELAY_MARKER`` is touched in
the tmp step dir as the delay starts, so a test can SIGKILL provably inside a commit.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

TEST_DELAY_ENV = "DSJAX_TEST_SAVE_DELAY_S"  # test-only: seconds to hold every async commit open
SAVE_DELAY_MARKER = "save_delay_entered"  # touched in the tmp step dir when the delay starts

_STATE, _EXTRA = "state", "extra"


def _test_commit_delay(step_dir: Path, seconds: float) -> None:
    """Test-only: holds the commit open; a module function so a test can make the commit fail."""
    (step_dir / SAVE_DELAY_MARKER).touch()
    time.sleep(seconds)


class _DelayedCommit:
    """An orbax commit future that first waits for the state's writes, then runs the test delay."""

    def __init__(self, futures, item_dir, seconds: float):
        self._futures, self._item_dir, self._seconds = list(futures), item_dir, seconds
        self._lock, self._done = threading.Lock(), False

    def result(self, timeout: float | None = None) -> None:
        for f in self._futures:
            f.result(timeout=timeout)
        with self._lock:
            if not self._done:
                item_dir = Path(getattr(self._item_dir, "path", self._item_dir))
                _test_commit_delay(item_dir.parent, self._seconds)
                self._done = True


def _state_handler() -> ocp.StandardCheckpointHandler:
    """orbax's own handler (so checkpoints stay standard), plus the test-only delay when asked."""
    handler = ocp.StandardCheckpointHandler()
    seconds = float(os.environ.get(TEST_DELAY_ENV) or 0)
    if seconds > 0:
        save = handler.async_save

        async def async_save(directory, *args, **kwargs):
            futures = await save(directory, *args, **kwargs) or []
            return [*futures, _DelayedCommit(futures, directory, seconds)]

        handler.async_save = async_save  # on the instance: orbax matches StandardSave by exact type
    return handler


def _check_state(state: Any) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        if not isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
            raise TypeError(
                f"checkpoint state leaf {jax.tree_util.keystr(path)} is a {type(leaf).__name__}; "
                "expected a jax.Array or numpy array (wrap Python scalars with jnp.asarray)")


def _check_abstract(abstract_state: Any) -> Any:
    """Arrays become their ShapeDtypeStruct; every leaf must name its target sharding."""
    def one(path, leaf):
        if isinstance(leaf, jax.Array):
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
        if not isinstance(leaf, jax.ShapeDtypeStruct) or leaf.sharding is None:
            raise TypeError(
                f"abstract_state leaf {jax.tree_util.keystr(path)} is {leaf!r}; expected a "
                "jax.ShapeDtypeStruct with .sharding set to the target sharding")
        return leaf
    return jax.tree_util.tree_map_with_path(one, abstract_state)


class Checkpointer:
    """Async, atomic checkpoints of (state, extra) in ``directory``, keeping the last ``keep`` steps."""

    def __init__(self, directory: str | os.PathLike, *, keep: int, every: int = 1,
                 async_save: bool = True):
        if keep < 1 or every < 1:
            raise ValueError(f"Checkpointer needs keep >= 1 and every >= 1, got keep={keep}, every={every}")
        self.directory = Path(directory).absolute()
        self.every = every
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True, create=True),
            item_handlers={_STATE: _state_handler(), _EXTRA: ocp.JsonCheckpointHandler()},
        )

    def due(self, step: int, *, force: bool = False) -> bool:
        """Whether `save(step, ..., force=force)` would save (cadence or force, and not saved yet)."""
        return (force or step % self.every == 0) and step not in self._manager.all_steps()

    def save(self, step: int, state: Any, extra: dict, *, force: bool = False) -> bool:
        """Starts saving ``step`` if it is a cadence step or ``force``; returns whether it did.

        Returns once the arrays are off the device (they may be donated right after); the files are
        committed in the background. Raises on a bad state/extra and surfaces a failed earlier save.
        """
        if not self.due(step, force=force):
            return False
        _check_state(state)
        try:
            json.dumps(extra)
        except (TypeError, ValueError) as e:
            raise TypeError(f"checkpoint extra for step {step} is not JSON-serializable: {e}") from e
        with self._forget_failed_saves():  # raises here if the previous async save failed
            return self._manager.save(
                step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state),
                                                 _EXTRA: ocp.args.JsonSave(extra)}), force=True)

    @contextlib.contextmanager
    def _forget_failed_saves(self):
        """orbax keeps a failed save's step in its step list (and would later try to delete it)."""
        try:
            yield
        except BaseException:
            with contextlib.suppress(Exception):  # orbax raises a failed save's error only once
                self._manager.wait_until_finished()
            self._manager.reload()
            raise

    def steps(self) -> list[int]:
        """Committed steps, oldest first (tmp dirs of unfinished saves are never listed)."""
        return sorted(ocp.utils.checkpoint_steps(self.directory))  # from disk; no in-flight steps

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def restore(self, step: int | None = None, *, abstract_state: Any) -> tuple[Any, dict]:
        """Loads (state, extra) of ``step`` (default: the latest) onto ``abstract_state``'s shardings.

        ``abstract_state``: the state's tree of ``jax.ShapeDtypeStruct`` with ``.sharding`` (or of
        arrays, whose shardings are taken), e.g. ``jax.eval_shape`` of the init with the new mesh's
        NamedShardings attached.
        """
        abstract_state = _check_abstract(abstract_state)
        steps = self.steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no committed checkpoint in {self.directory}")
            step = steps[-1]
        if step not in steps:
            raise FileNotFoundError(
                f"no committed checkpoint for step {step} in {self.directory}; committed steps: {steps}")
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(**{
                _STATE: ocp.args.StandardRestore(abstract_state), _EXTRA: ocp.args.JsonRestore()}))
        except Exception as e:
            raise RuntimeError(
                f"checkpoint step {step} in {self.directory / str(step)} could not be restored onto "
                f"abstract_state: {type(e).__name__}: {e}") from e
        return out[_STATE], out[_EXTRA]

    def restore_parts(self, step: int | None = None, *, abstract_parts: dict) -> tuple[dict, dict]:
        """Loads only some top-level fields of the saved state (e.g. ``{"params": ..., "router": ...}``
        as ShapeDtypeStructs with shardings) plus ``extra``. Nothing else is read, so inference can
        load any run's weights whatever optimizer (pretraining, GRPO) wrote its state."""
        steps = self.steps()
        step = steps[-1] if step is None and steps else step
        if step is None or step not in steps:
            raise FileNotFoundError(f"no committed checkpoint for step {step} in {self.directory}; "
                                    f"committed steps: {steps}")
        abstract_parts = _check_abstract(abstract_parts)
        restore_args = jax.tree_util.tree_map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), abstract_parts)
        try:
            parts = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(
                self.directory / str(step) / _STATE,
                args=ocp.args.PyTreeRestore(item=abstract_parts, restore_args=restore_args, partial_restore=True))
            extra = self._manager.restore(step, args=ocp.args.Composite(**{_EXTRA: ocp.args.JsonRestore()}))[_EXTRA]
        except Exception as e:
            raise RuntimeError(f"checkpoint step {step} in {self.directory / str(step)} could not be restored "
                               f"onto fields {sorted(abstract_parts)}: {type(e).__name__}: {e}") from e
        return parts, extra

    def wait(self) -> None:
        """Blocks until the pending async save is committed; raises if it failed."""
        with self._forget_failed_saves():
            self._manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_sigterm_received = False


def _on_sigterm(signum, frame) -> None:
    global _sigterm_received
    _sigterm_received = True


def preempted() -> bool:
    """True once SIGTERM arrived inside ``catch_sigterm``; with several processes, once any got one.

    With several processes this is a tiny all-gather: every process must call it at the same step.
    """
    if jax.process_count() == 1:
        return _sigterm_received
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.asarray(_sigterm_received))))


@contextlib.contextmanager
def catch_sigterm():
    """Within the block, SIGTERM sets ``preempted()`` instead of ending the process (main thread only)."""
    global _sigterm_received
    _sigterm_received = False
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
