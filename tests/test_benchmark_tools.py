"""dsjax.profiling on the CPU backend (the trace is read back into per-op device time), and the
benchmark plots that go with it."""

import jax
import jax.numpy as jnp

from dsjax import profiling


def test_profile_totals_ops_of_a_jitted_function():
    f = jax.jit(lambda x: jnp.tanh(x @ x).sum())
    p = profiling.profile(f, jnp.ones((256, 256)), repeat=2)
    assert p.ops and p.kernels >= 1 and 0 < p.busy_s <= p.wall_s * 1.5
    assert abs(sum(s for _, s in p.kinds()) - sum(op.seconds for op in p.ops)) < 1e-9
    assert all(op.calls > 0 and op.seconds >= 0 for op in p.ops)
    assert "by kind" in p.table(top=3) and set(p.as_dict()) == {"wall_s", "busy_s", "kernels", "kinds", "ops"}


def test_plot_overlay_draws_runs_on_shared_steps(tmp_path):
    """scripts/compare_fp8.py's plot: curves of several runs and each one's % difference to the first."""
    from dsjax.plotting import plot_overlay

    rows = lambda scale: [{"step": s, "loss": scale * (5.0 - 0.1 * s)} for s in range(0, 40, 10)]  # noqa: E731
    out = plot_overlay({"fp8=none": rows(1.0), "fp8=block": rows(1.002)}, "loss", str(tmp_path / "c.png"))
    assert out and (tmp_path / "c.png").stat().st_size > 1000
    assert plot_overlay({"a": [{"step": 1}]}, "loss", str(tmp_path / "none.png")) is None


def test_interleaved_times_each_fn_in_turn_per_round():
    """scripts/check_common.interleaved, what the FP8 check and A/B scripts time with: every fn runs
    `calls` times per round, in the given order each round, and gets one time per round."""
    from check_common import gpu_state, interleaved  # scripts/ is on the path (conftest.py)

    order = []

    def fn(name):
        def call(x):
            order.append(name)
            return x + 1
        return call

    x = jnp.zeros(())
    times = interleaved({"a": (fn("a"), (x,)), "b": (fn("b"), (x,))}, rounds=3, calls=2, load_s=0.0)
    assert set(times) == {"a", "b"} and all(len(t) == 3 and min(t) > 0 for t in times.values())
    assert order == ["a", "a", "b", "b"] * 3
    # no GPU here: the machine line says why instead of raising (on a GPU machine, nvidia-smi's CSV)
    assert isinstance(gpu_state(), str) and gpu_state()
