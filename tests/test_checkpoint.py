"""Checkpoints: what is saved is what restores (other meshes too), and no failure loses the last good step."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from dsjax import checkpoint

AXES = ("data", "expert", "tensor")
CHILD_DELAY_S = 120  # the commit the child holds open; it is killed long before this ends
CHILD_MARKER_TIMEOUT_S = 60
REPO = Path(__file__).resolve().parents[1]


def make_mesh(shape, devices=None):
    devices = jax.devices()[: int(np.prod(shape))] if devices is None else devices
    return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


SPECS = {"embed": P("tensor", "data"), "experts": P("expert", None, "tensor"), "norm": P()}


def make_state(mesh, seed=0):
    """A train-state-like pytree: sharded params, an adamw state after one update, a step array."""
    keys = jax.random.split(jax.random.key(seed), 3)
    params = {
        "embed": jax.random.normal(keys[0], (16, 8)),
        "experts": jax.random.normal(keys[1], (4, 8, 6)),
        "norm": jax.random.normal(keys[2], (8,)),
    }
    params = {k: jax.device_put(v, NamedSharding(mesh, SPECS[k])) for k, v in params.items()}
    tx = optax.adamw(1e-2)
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: 0.1 * p + 1.0, params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return {"params": optax.apply_updates(params, updates), "opt_state": opt_state,
            "step": jnp.asarray(1, jnp.int32)}


def abstract_on(state, mesh):
    """The state's ShapeDtypeStructs with shardings of `mesh` (params' specs; replicated otherwise)."""
    def one(path, x):
        spec = SPECS.get(getattr(path[-1], "key", None), P())
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))
    return jax.tree_util.tree_map_with_path(one, state)


def host(tree):
    return jax.tree.map(np.asarray, tree)


def assert_same(restored, expected_host):
    assert jax.tree.structure(restored) == jax.tree.structure(expected_host)
    jax.tree.map(np.testing.assert_array_equal, host(restored), expected_host)


def test_round_trip_sharded_state_optax_and_extra(tmp_path):
    mesh = make_mesh((2, 2, 2))
    state = make_state(mesh)
    expected, abstract = host(state), abstract_on(state, mesh)
    extra = {"step": 1, "data": {"epoch": 0, "index": 17}, "config": {"train": {"steps": 10}},
             "metrics": {"loss": 2.5}}
    with checkpoint.Checkpointer(tmp_path / "checkpoints", keep=3) as ckpt:
        assert ckpt.save(1, state, extra)
        jax.tree.map(lambda x: x.delete(), state)  # the loop donates the state right after save
        ckpt.wait()
        restored, restored_extra = ckpt.restore(abstract_state=abstract)
    assert restored_extra == extra
    assert_same(restored, expected)
    assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)
    for x, a in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract)):
        assert x.sharding == a.sharding and x.dtype == a.dtype


def test_cadence_keep_last_k_and_resume_latest(tmp_path):
    mesh = make_mesh((2, 2, 2))
    state = make_state(mesh)
    ckpt = checkpoint.Checkpointer(tmp_path, keep=2, every=3)
    saved = [ckpt.save(s, state, {"step": s}, force=s == 8) for s in range(1, 9)]
    assert saved == [False, False, True, False, False, True, False, True]
    assert not ckpt.save(8, state, {"step": 8}, force=True)  # end-of-run save of a saved step
    ckpt.close()
    reopened = checkpoint.Checkpointer(tmp_path, keep=2, every=3)  # a restart with the same workdir
    assert reopened.steps() == [6, 8] and reopened.latest_step() == 8
    _, extra = reopened.restore(abstract_state=abstract_on(state, mesh))
    assert extra == {"step": 8}
    reopened.close()


def test_restore_onto_other_meshes(tmp_path):
    state = make_state(make_mesh((2, 2, 2)))
    expected = host(state)
    with checkpoint.Checkpointer(tmp_path, keep=1) as ckpt:
        ckpt.save(1, state, {})
        ckpt.wait()
        for mesh in (make_mesh((1, 4, 2), jax.devices()[::-1]), make_mesh((1, 1, 1))):
            abstract = abstract_on(state, mesh)
            restored, _ = ckpt.restore(1, abstract_state=abstract)
            assert_same(restored, expected)
            for x, a in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract)):
                assert x.sharding == a.sharding


def test_sigkill_inside_async_commit_keeps_previous_step(tmp_path):
    directory = tmp_path / "checkpoints"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    child = subprocess.Popen([sys.executable, str(REPO / "tests" / "ckpt_child.py"), str(directory),
                              str(CHILD_DELAY_S)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + CHILD_MARKER_TIMEOUT_S
    while not (markers := list(directory.glob(f"*/{checkpoint.SAVE_DELAY_MARKER}"))):
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            out, err = child.communicate()
            pytest.fail(f"child never entered the commit delay (rc={child.returncode}):\n{err.decode()[-3000:]}")
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    out, _ = child.communicate()
    assert child.returncode == -signal.SIGKILL and b"committed 2" not in out

    step_dir = markers[0].parent  # the kill landed inside step 2's commit: files written, not renamed
    assert step_dir.name != "2" and step_dir.name.startswith("2.")
    assert any(p.is_file() for p in step_dir.glob("state*/ocdbt.process_0/d/*"))  # array data
    assert not (directory / "2").exists()

    mesh = make_mesh((2, 2, 2))
    w = jnp.arange(64, dtype=jnp.float32).reshape(8, 8)
    abstract = {"w": jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=NamedSharding(mesh, P("data", "tensor")))}
    ckpt = checkpoint.Checkpointer(directory, keep=3)
    assert ckpt.steps() == [1] and ckpt.latest_step() == 1
    restored, extra = ckpt.restore(abstract_state=abstract)
    assert extra == {"step": 1}
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(w + 1))
    assert ckpt.save(2, {"w": restored["w"] + 1}, {"step": 2})  # the rerun saves step 2 over the debris
    ckpt.wait()
    restored, extra = ckpt.restore(abstract_state=abstract)
    assert ckpt.steps() == [1, 2] and extra == {"step": 2}
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(w + 2))
    ckpt.close()


def test_failed_saves_keep_last_good_step(tmp_path, monkeypatch):
    mesh = make_mesh((2, 2, 2))
    state = make_state(mesh)
    expected, abstract = host(state), abstract_on(state, mesh)
    monkeypatch.setenv(checkpoint.TEST_DELAY_ENV, "0.01")
    ckpt = checkpoint.Checkpointer(tmp_path, keep=3)
    ckpt.save(1, state, {"step": 1})
    ckpt.wait()

    with pytest.raises(TypeError, match=r"\['step'\].*int"):  # rejected before anything is written
        ckpt.save(2, {**state, "step": 2}, {"step": 2})
    with pytest.raises(TypeError, match="JSON"):
        ckpt.save(2, state, {"step": object()})

    def disk_full(step_dir, seconds):
        raise OSError("disk full (simulated)")
    monkeypatch.setattr(checkpoint, "_test_commit_delay", disk_full)  # fails in the background commit
    assert ckpt.save(3, state, {"step": 3})
    with pytest.raises(OSError, match="disk full"):
        ckpt.wait()
    assert ckpt.steps() == [1]
    restored, extra = ckpt.restore(abstract_state=abstract)
    assert extra == {"step": 1}
    assert_same(restored, expected)

    monkeypatch.setattr(checkpoint, "_test_commit_delay", lambda step_dir, seconds: None)
    for step in (4, 5, 6):  # the checkpointer still works, and keep-last-K ignores the failed step
        assert ckpt.save(step, state, {"step": step})
    ckpt.close()
    assert checkpoint.Checkpointer(tmp_path, keep=3).steps() == [4, 5, 6]


# orbax leaves the reads of a corrupt step's other shards as un-awaited coroutines
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_restore_errors_name_directory_and_step(tmp_path):
    mesh = make_mesh((2, 2, 2))
    state = make_state(mesh)
    abstract = abstract_on(state, mesh)
    ckpt = checkpoint.Checkpointer(tmp_path, keep=3)
    with pytest.raises(FileNotFoundError, match=f"no committed checkpoint in {tmp_path}"):
        ckpt.restore(abstract_state=abstract)
    ckpt.save(1, state, {})
    ckpt.save(2, state, {})
    ckpt.wait()
    (tmp_path / "7.orbax-checkpoint-tmp-123" / "state").mkdir(parents=True)  # an unfinished save
    assert ckpt.latest_step() == 2
    with pytest.raises(FileNotFoundError, match=rf"step 7 in {tmp_path}.*\[1, 2\]"):
        ckpt.restore(7, abstract_state=abstract)
    with pytest.raises(TypeError, match=r"\['step'\].*sharding"):
        ckpt.restore(abstract_state={**abstract, "step": jax.ShapeDtypeStruct((), jnp.int32)})
    with pytest.raises(RuntimeError, match=rf"step 2 in {tmp_path / '2'}.*shape"):
        ckpt.restore(abstract_state={**abstract, "step": jax.ShapeDtypeStruct(
            (3,), jnp.int32, sharding=NamedSharding(mesh, P()))})
    for p in (tmp_path / "2" / "state").rglob("*"):  # corrupt step 2: its array data is gone
        if p.is_file() and p.parent.name == "d":
            p.unlink()
    with pytest.raises(RuntimeError, match=rf"step 2 in {tmp_path / '2'}"):
        ckpt.restore(2, abstract_state=abstract)
    restored, _ = ckpt.restore(1, abstract_state=abstract)
    assert_same(restored, host(state))
    ckpt.close()


def test_sigterm_sets_preempted_flag_only_inside_block():
    before = signal.getsignal(signal.SIGTERM)
    with checkpoint.catch_sigterm():
        assert not checkpoint.preempted()
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not checkpoint.preempted() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert checkpoint.preempted()
    assert signal.getsignal(signal.SIGTERM) is before
