"""dsjax.profiling on the CPU backend: the trace is read back into per-op device time."""

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
