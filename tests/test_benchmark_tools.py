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
