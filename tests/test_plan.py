"""The analytic plan (dsjax/plan.py) against XLA's compiled step, and its invariants.

Pairs that must agree: the analytic per-device bytes of parameters, gradients and optimizer state
and the memory_analysis of the real step compiled on the 8 fake devices; the mean expert shards a
token reaches under node-limited routing and a Monte Carlo draw of the same routing.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

import presets
from dsjax import plan
from dsjax import sharding as shd
from dsjax.config import replace
from dsjax.model import Transformer
from train_setup import tiny_config

STATE_RTOL = 0.01  # analytic vs compiled state bytes (XLA adds an output tuple table of 8 B per leaf)
SHARDS_RTOL = 0.02  # closed-form mean shards per token vs 20,000 routed tokens


def _tiny(mesh, **overrides):
    base = {"data.seq_len": 32, "model.mtp.num_nextn_predict_layers": 0, "model.num_hidden_layers": 2}
    return tiny_config(mesh, **{**base, **overrides})


def test_analytic_state_bytes_match_the_compiled_step():
    config = _tiny((2, 2, 2), **{"mesh.fsdp": True, "train.bf16_moments": True, "train.microbatches": 2})
    analytic = plan.analytic(config)
    compiled = plan.compiled(config, shd.make_mesh(config.mesh), xla_layout=False)
    s = analytic.state
    pairs = {
        "params": (s.params, compiled.params),
        "gradients": (analytic.gradients, compiled.gradients),
        "opt_state": (s.opt_state, compiled.opt_state),
        "step arguments": (s.params + s.opt_state + s.router + s.scalars + analytic.batch, compiled.step_arguments),
    }
    for name, (a, c) in pairs.items():
        assert c == pytest.approx(a, rel=STATE_RTOL), name
    assert compiled.grads_temp > 0 and compiled.step_temp > 0


def _total_param_bytes(config):
    shapes = jax.eval_shape(Transformer(config.model).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(nn.unbox(shapes["params"])))


@pytest.mark.parametrize("mesh", [(1, 1, 1), (2, 2, 2), (4, 2, 1), (1, 8, 1), (2, 1, 4)])
def test_per_device_params_cover_every_parameter(mesh):
    config = _tiny(mesh)
    total = _total_param_bytes(config)
    params = plan.analytic(config).state.params
    assert params * math.prod(mesh) >= total
    if mesh == (1, 1, 1):
        assert params == total
    else:
        assert params < total


def test_fsdp_and_bf16_moments_shrink_what_they_should():
    config = _tiny((4, 1, 2))
    base = plan.analytic(config).state
    fsdp = plan.analytic(replace(config, **{"mesh.fsdp": True})).state
    bf16 = plan.analytic(replace(config, **{"train.bf16_moments": True})).state
    assert fsdp.params < base.params and fsdp.opt_state < base.opt_state
    # mu and nu in bf16 (V3 §3.3.3): half the moment bytes (counts aside)
    assert bf16.opt_state == pytest.approx(0.5 * base.opt_state, rel=STATE_RTOL)
    assert bf16.params == base.params


def test_shard_bytes_pads_uneven_shards():
    sizes = {"data": 2, "expert": 1, "tensor": 4}
    assert plan.shard_bytes((5, 4), jnp.float32, P("data", None), sizes) == 3 * 4 * 4
    assert plan.shard_bytes((5, 4), jnp.bfloat16, P(("data", "tensor"), None), sizes) == 1 * 4 * 2
    assert plan.shard_bytes((5, 9), jnp.float32, P(None, "tensor"), sizes) == 5 * 3 * 4
    assert plan.shard_bytes((7,), jnp.int32, P(), sizes) == 7 * 4


def _v3(expert):
    c = presets.load("deepseek_v3")
    return replace(c, **{"mesh.data": 1, "mesh.expert": expert, "mesh.tensor": 1})


@pytest.mark.parametrize("expert", [8, 16, 64])
def test_mean_shards_per_token_matches_routing_draws(expert):
    config = _v3(expert)
    moe = config.model.moe
    bound, mean = plan._shards_per_token(config)
    rng = np.random.default_rng(0)
    e_l, g = moe.n_routed_experts // expert, moe.n_routed_experts // moe.n_group
    counts = []
    for _ in range(20_000):
        groups = rng.choice(moe.n_group, moe.topk_group, replace=False)
        pool = (groups[:, None] * g + np.arange(g)).reshape(-1)
        experts = rng.choice(pool, moe.num_experts_per_tok, replace=False)
        counts.append(len(np.unique(experts // e_l)))
    assert max(counts) <= bound
    assert np.mean(counts) == pytest.approx(mean, rel=SHARDS_RTOL)
    if expert == moe.n_group:  # one group per shard: node-limited routing's M = topk_group
        assert bound == moe.topk_group


def test_all_to_all_bytes_order_and_vanish_without_expert_parallelism():
    a = plan.all_to_all_bytes(replace(_v3(16), **{"train.batch_size": 16}))
    assert a.fixed > a.ragged_worst >= a.ragged_uniform > 0
    assert a.off_device == pytest.approx(15 / 16)
    assert plan.all_to_all_bytes(replace(_v3(1), **{"train.batch_size": 16})).fixed == 0


def test_pair_capacity_bounds_only_the_expert_parallel_pair_buffer():
    def total(expert, capacity):
        config = replace(_v3(expert), **{"train.batch_size": 16, "model.moe.ep_pair_capacity": capacity})
        return sum(plan.activation_bytes(config).values())

    worst = total(16, 0.0)
    assert total(16, 1.25) < worst
    assert total(16, 16.0) == worst  # 16 x the balanced pairs exceeds the worst case: no bound
    assert total(1, 1.25) == total(1, 0.0)  # no expert parallelism: nothing to bound


def test_remat_policies_save_in_order():
    saved = {}
    for remat in ("full", "minimal", "dots", "none"):
        saved[remat] = plan.activation_bytes(_tiny((2, 2, 2), **{"model.remat": remat}))["saved in layers"]
    assert saved["full"] == 0 < saved["minimal"] < saved["dots"] < saved["none"]


def test_meshes_and_fit_on_2048_devices():
    config = presets.load("deepseek_v3")
    meshes = plan.meshes(config, 2048, 8)
    assert (16, 16, 8) in meshes and (16, 64, 2) in meshes
    for data, expert, tensor in meshes:
        assert data * expert * tensor == 2048 and 256 % expert == 0 and 128 % tensor == 0
    small = plan.on_mesh(_tiny((1, 1, 1)), (2, 2, 2), 8)
    assert (small.train.batch_size, small.train.microbatches) == (8, 2)
    base = plan.analytic(small).total
    assert plan.fit(small, base)[0] == ()
    labels, fitted, fsdp_plan = plan.fit(small, base - 1)
    assert labels[0] == "fsdp" and fitted.mesh.fsdp and fsdp_plan.total < base
