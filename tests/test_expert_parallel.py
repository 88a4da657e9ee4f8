"""Expert parallelism and the grouped GEMM's custom VJP agree with the single-device reference.

Pairs that must agree: the MoE layer under meshes with expert = 4 and 8 (and tensor = 2) vs the same
layer with no mesh — outputs, gradients of every parameter and of the input, loads, dropped counts —
under routes that leave experts empty and pile most pairs on one expert; the ragged_all_to_all
exchange (with XLA:CPU lacking the collective, an all_to_all-built stand-in of its documented
semantics checks the offsets this code computes); and the grouped GEMM's custom VJP, fed kernels
that leave garbage outside the groups as the Pallas kernels do, vs autodiff of jax.lax.ragged_dot.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from dsjax import fallbacks, sharding as shd
from dsjax.config import ModelConfig, MoEConfig, replace
from dsjax.model import expert_parallel, grouped_gemm
from dsjax.model.decoder import REMAT_POLICIES
from dsjax.model.moe import MoE

OUT_RTOL = 1e-5  # per leaf ||a - b|| / ||b||, float32
GRAD_RTOL = 1e-5
GMM_RTOL = 1e-6

B, T, D, E, K = 8, 8, 16, 8, 3

CONFIG = ModelConfig(hidden_size=D, moe=MoEConfig(moe_intermediate_size=8, n_routed_experts=E, num_experts_per_tok=K,
                                                  n_group=4, topk_group=2, n_shared_experts=1,
                                                  routed_scaling_factor=2.5))


def skewed_ids(seed=0):
    """Slot 0 always expert 5 (most pairs); experts 0 and 4 never chosen; the rest spread unevenly."""
    r = np.random.RandomState(seed)
    ids = np.zeros((B, T, K), np.int32)
    ids[..., 0] = 5
    for b in range(B):
        for t in range(T):
            ids[b, t, 1:] = r.choice([1, 2, 3, 6, 7], K - 1, replace=False, p=[0.05, 0.05, 0.1, 0.2, 0.6])
    return jnp.asarray(ids)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def make_mesh(shape):
    return jax.make_mesh(shape, shd.AXES, axis_types=(AxisType.Auto,) * 3, devices=jax.devices()[: np.prod(shape)])


def layer_outputs(config, variables, x, replay, mesh=None, b=B, t=T):
    """(y, loads, dropped), and gradients of sum(y * ct) w.r.t. params and x; under `mesh` if given."""
    seg = jnp.ones((b, t), jnp.int32)
    ct = jax.random.normal(jax.random.key(7), (b, t, config.hidden_size))

    def loss(params, x):
        y, stats = MoE(config).apply({**variables, "params": params}, x, seg, replay)
        return (y * ct).sum(), (y, stats.load_E, stats.dropped)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    if mesh is None:
        (_, aux), grads = step(variables["params"], x)
        return jax.device_get((aux, grads))
    with jax.set_mesh(mesh), nn.logical_axis_rules(shd.ACTIVATION_RULES):
        x = jax.device_put(x, NamedSharding(mesh, P(shd.BATCH, None, None)))
        (_, aux), grads = step(variables["params"], x)
        hlo = step.lower(variables["params"], x).compile().as_text()
    return jax.device_get((aux, grads)), hlo


def init(config, seed=1):
    x = jax.random.normal(jax.random.key(0), (B, T, config.hidden_size))
    variables = nn.unbox(MoE(config).init(jax.random.key(seed), x, jnp.ones((B, T), jnp.int32)))
    return variables, x


def assert_agree(want, got):
    (y1, load1, dropped1), g1 = want
    (y2, load2, dropped2), g2 = got
    assert rel(y2, y1) <= OUT_RTOL, rel(y2, y1)
    np.testing.assert_array_equal(load2, load1)
    assert int(dropped2) == int(dropped1)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree_util.tree_leaves(g2)):
        assert rel(b, a) <= GRAD_RTOL, (jax.tree_util.keystr(path), rel(b, a))


@pytest.mark.parametrize("mesh_shape", [(2, 4, 1), (1, 8, 1), (1, 4, 2)], ids=str)
def test_expert_parallel_matches_single_device(mesh_shape):
    variables, x = init(CONFIG)
    replay = skewed_ids()
    want = layer_outputs(CONFIG, variables, x, replay)
    got, hlo = layer_outputs(CONFIG, variables, x, replay, make_mesh(mesh_shape))
    assert "all-to-all" in hlo  # the expert-parallel path ran, not XLA's auto-sharded local dispatch
    assert_agree(want, got)
    load = np.asarray(want[0][1])
    assert load[0] == load[4] == 0 and load[5] == B * T  # the route really is uneven


def _all_to_alls(policy) -> int:
    """all_to_all equations in the jaxpr of the value-and-grad of a MoE layer remat'd under `policy`,
    mesh (1, 2, 1). (The jaxpr, not the compiled HLO: without a layer scan XLA would merge a repeated
    exchange with the forward one.)"""
    variables, x = init(CONFIG)
    seg = jnp.ones((B, T), jnp.int32)

    def loss(params, x):
        apply = jax.checkpoint(lambda p, x: MoE(CONFIG).apply({**variables, "params": p}, x, seg)[0], policy=policy)
        return apply(params, x).sum()

    mesh = make_mesh((1, 2, 1))
    with jax.set_mesh(mesh), nn.logical_axis_rules(shd.ACTIVATION_RULES):
        x = jax.device_put(x, NamedSharding(mesh, P(shd.BATCH, None, None)))
        return str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(variables["params"], x)).count("= all_to_all[")


def test_remat_keeps_the_received_rows():
    """Under the decoder's "minimal" policy the backward pass never repeats the dispatch exchange: as
    many all-to-alls as when everything is saved, fewer than when nothing is."""
    saved_all = _all_to_alls(jax.checkpoint_policies.everything_saveable)
    assert _all_to_alls(REMAT_POLICIES["minimal"]) == saved_all < _all_to_alls(jax.checkpoint_policies.nothing_saveable)


def test_expert_parallel_with_the_router_choosing():
    config = replace(CONFIG, **{"moe.num_experts_per_tok": 2})
    variables, x = init(config, seed=3)
    bias = np.zeros(E, np.float32)
    bias[[2, 3]] = 1.0  # group 1 (experts 2, 3) wins every token
    variables = {**variables, "router": {"router": {"bias": jnp.asarray(bias)}}}
    want = layer_outputs(config, variables, x, None)
    got, _ = layer_outputs(config, variables, x, None, make_mesh((2, 4, 1)))
    assert_agree(want, got)
    assert np.asarray(want[0][1])[2] == B * T


def test_expert_parallel_capacity_drops_what_the_reference_drops():
    config = replace(CONFIG, **{"moe.dispatch": "capacity", "moe.capacity_factor": 1.0})
    variables, x = init(config)
    replay = skewed_ids()
    want = layer_outputs(config, variables, x, replay)
    assert int(want[0][2]) > 0  # expert 5 overflows
    got, _ = layer_outputs(config, variables, x, replay, make_mesh((1, 4, 2)))
    assert_agree(want, got)


def _pairs_per_shard(replay, shards):
    """Real (token, expert) pairs each expert shard receives, and whether each pair arrives past
    the first `max_pairs` on its shard (arrival order: source device, then token, then slot = the
    global (token, slot) order when the batch is split over the expert axis only)."""
    shard_F = np.asarray(replay).reshape(-1) // (E // shards)
    rank_F = np.zeros_like(shard_F)
    for sh in range(shards):
        rank_F[shard_F == sh] = np.arange((shard_F == sh).sum())
    return np.bincount(shard_F, minlength=shards), rank_F


def test_expert_parallel_pair_capacity_bounds_the_buffer_and_counts_drops():
    """moe.ep_pair_capacity: a bound every shard stays under changes nothing; a tighter one drops
    exactly the pairs past it on each shard (counted), and only their tokens' outputs change."""
    variables, x = init(CONFIG)
    replay = skewed_ids()
    mesh, shards = make_mesh((1, 4, 1)), 4
    per_shard, rank_F = _pairs_per_shard(replay, shards)
    n_local = B * T // shards
    worst = shards * n_local * min(K, E // shards)
    want = layer_outputs(CONFIG, variables, x, replay)
    loose = (per_shard.max() + 1) / (n_local * K)  # bounds the buffer below the worst case, drops none
    assert per_shard.max() < np.ceil(loose * n_local * K) < worst
    got, _ = layer_outputs(replace(CONFIG, **{"moe.ep_pair_capacity": loose}), variables, x, replay, mesh)
    assert_agree(want, got)

    tight = 0.5  # 24 pairs per shard: the shard of expert 5 receives every token's slot 0
    max_pairs = int(np.ceil(tight * n_local * K))
    (y, load, dropped), _ = layer_outputs(replace(CONFIG, **{"moe.ep_pair_capacity": tight}), variables, x, replay,
                                          mesh)[0]
    assert int(dropped) == np.maximum(per_shard - max_pairs, 0).sum() > 0
    np.testing.assert_array_equal(load, want[0][1])  # routing (and the bias update's loads) unchanged
    lost_N = (rank_F >= max_pairs).reshape(B * T, K).any(-1)
    y_N, want_N = np.asarray(y).reshape(B * T, D), np.asarray(want[0][0]).reshape(B * T, D)
    assert rel(y_N[~lost_N], want_N[~lost_N]) <= OUT_RTOL
    changed_N = np.linalg.norm(y_N - want_N, axis=-1) / np.linalg.norm(want_N, axis=-1)
    assert (changed_N[lost_N] > 1e-2).all(), changed_N[lost_N].min()  # each lost a routed expert's share


def test_expert_parallel_pads_indivisible_token_counts():
    b, t = 1, 3  # decoding-like: 3 tokens over 4 batch shards
    variables, _ = init(CONFIG)
    x = jax.random.normal(jax.random.key(4), (b, t, D))
    replay = skewed_ids()[:b, :t]
    seg = jnp.ones((b, t), jnp.int32)
    want = MoE(CONFIG).apply(variables, x, seg, replay)[0]
    with jax.set_mesh(make_mesh((1, 4, 1))), nn.logical_axis_rules(shd.ACTIVATION_RULES):
        assert expert_parallel.mesh_for(CONFIG) is not None
        got = jax.jit(lambda v, x: MoE(CONFIG).apply(v, x, seg, replay)[0])(variables, x)
    assert rel(got, want) <= OUT_RTOL


def _emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                                axis_name):
    """jax.lax.ragged_all_to_all's documented semantics from all_to_all, gathers and a scatter."""
    s = input_offsets.shape[0]
    rows = operand.shape[0]
    r_L = jnp.arange(rows)
    src_SL = input_offsets[:, None] + r_L[None, :]
    chunks = jnp.take(operand, jnp.clip(src_SL, 0, rows - 1), axis=0)  # [S, L, ...]: chunk j goes to j
    a2a = functools.partial(jax.lax.all_to_all, axis_name=axis_name, split_axis=0, concat_axis=0, tiled=True)
    got = a2a(chunks.reshape((s * rows,) + operand.shape[1:])).reshape(chunks.shape)  # [i]: from source i
    at_S = a2a(output_offsets)
    dst_SL = jnp.where(r_L[None, :] < recv_sizes[:, None], at_S[:, None] + r_L[None, :], output.shape[0])
    return output.at[dst_SL.reshape(-1)].set(got.reshape((-1,) + operand.shape[1:]), mode="drop")


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_ragged_exchange_offsets(monkeypatch, dispatch):
    monkeypatch.setattr(jax.lax, "ragged_all_to_all", _emulated_ragged_all_to_all)
    config = replace(CONFIG, **{"moe.expert_parallel": "ragged_all_to_all", "moe.dispatch": dispatch,
                                "moe.capacity_factor": 1.0})
    variables, x = init(config)
    replay = skewed_ids(seed=2)
    want = layer_outputs(config, variables, x, replay)
    got, _ = layer_outputs(config, variables, x, replay, make_mesh((1, 4, 2)))
    assert_agree(want, got)


def test_ragged_exchange_lowers_with_gradients():
    config = replace(CONFIG, **{"moe.expert_parallel": "ragged_all_to_all"})
    variables, x = init(config)
    seg = jnp.ones((B, T), jnp.int32)
    with jax.set_mesh(make_mesh((2, 4, 1))), nn.logical_axis_rules(shd.ACTIVATION_RULES):
        grad = jax.jit(jax.grad(lambda p, x: MoE(config).apply({**variables, "params": p}, x, seg)[0].sum(),
                                argnums=(0, 1)))
        text = grad.lower(variables["params"], x).as_text()
    assert "ragged_all_to_all" in text


def test_kernel_backend_on_a_data_mesh_falls_back_inside_shard_map(caplog):
    """grouped_gemm='pallas_mgpu' with float32 operands: shard_map over (data, tensor), xla fallback."""
    config = replace(CONFIG, **{"moe.grouped_gemm": "pallas_mgpu"})
    variables, x = init(config)
    replay = skewed_ids()
    want = layer_outputs(CONFIG, variables, x, replay)
    fallbacks.forget()
    with caplog.at_level(logging.WARNING, logger=grouped_gemm.__name__):
        got, _ = layer_outputs(config, variables, x, replay, make_mesh((4, 1, 2)))
    assert_agree(want, got)
    assert any("using jax.lax.ragged_dot" in r.getMessage() for r in caplog.records)


def test_local_dispatch_without_expert_axis():
    with jax.set_mesh(make_mesh((4, 1, 2))):
        assert expert_parallel.mesh_for(CONFIG) is None
    assert expert_parallel.mesh_for(CONFIG) is None


# ------------------------------------------------------------------------------- grouped GEMM


def _garbage_outside(y, group_sizes):
    return jnp.where((jnp.arange(y.shape[0]) < group_sizes.sum())[:, None], y, jnp.nan)


def _masked_weight_grad(x, dy, group_sizes):
    """dw[g] = (x * in_g)^T dy: like transposed_ragged_dot_mgpu, rows outside a group are zeroed by
    multiplying (so a NaN anywhere in x or dy spoils every dw[g]: stricter than the kernel, whose
    products only reach the rows of blocks it shares with a neighbour)."""
    ends = jnp.cumsum(group_sizes)
    group_M = jnp.searchsorted(ends, jnp.arange(x.shape[0]), side="right")
    in_MG = jax.nn.one_hot(group_M, group_sizes.shape[0], dtype=x.dtype)  # rows past the groups: none
    return jnp.einsum("mk,mg,mn->gkn", x, in_MG, dy)


GARBAGE_KERNELS = grouped_gemm.Kernels(
    forward=lambda x, w, g: _garbage_outside(jax.lax.ragged_dot(x, w, g), g),
    input_grad=lambda dy, w, g: _garbage_outside(jax.lax.ragged_dot(dy, jnp.swapaxes(w, 1, 2), g), g),
    weight_grad=_masked_weight_grad,
)


@pytest.mark.parametrize("covered", [False, True])
def test_grouped_vjp_matches_ragged_dot_autodiff(covered):
    """Kernels that leave NaN garbage outside the groups: masked away when rows lie outside them
    (rows 32..39 here), and nothing to mask when the groups cover every row (`covered`)."""
    x = jax.random.normal(jax.random.key(0), (40, 12))
    w = jax.random.normal(jax.random.key(1), (5, 12, 10))
    group_sizes = jnp.array([7, 0, 15, 0, 18 if covered else 10], jnp.int32)  # with empty groups
    ct = jax.random.normal(jax.random.key(2), (40, 10))
    ref = jax.value_and_grad(lambda x, w: (jax.lax.ragged_dot(x, w, group_sizes) * ct).sum(), (0, 1))
    got = jax.jit(jax.value_and_grad(lambda x, w: (grouped_gemm.grouped(x, w, group_sizes, GARBAGE_KERNELS,
                                                                        covered) * ct).sum(), (0, 1)))
    (v1, (dx1, dw1)), (v2, (dx2, dw2)) = ref(x, w), got(x, w)
    assert np.isfinite(np.asarray(dx2)).all()
    assert rel(v2, v1) <= GMM_RTOL and rel(dx2, dx1) <= GMM_RTOL and rel(dw2, dw1) <= GMM_RTOL


def test_expert_parallel_keeps_the_kernels_garbage_out(monkeypatch):
    """The Pallas kernels' contract — rows past the groups come back as garbage (NaN here), the
    weight gradient zeroes other groups' rows by multiplying — with the expert-parallel path asking
    them not to zero those rows (dispatch.ffn_grouped's past_groups="unread") still gives the
    single-device outputs and gradients: the padding pairs of the worst-case pair buffer reach
    neither the combine, nor the gather's gradient, nor (as NaN) a weight gradient."""
    monkeypatch.setattr(grouped_gemm, "MGPU", GARBAGE_KERNELS)
    monkeypatch.setattr(grouped_gemm, "mgpu_unfit_reason", lambda x, w: None)  # float32 through "the kernels"
    variables, x = init(CONFIG)
    replay = skewed_ids()
    want = layer_outputs(CONFIG, variables, x, replay)
    got, _ = layer_outputs(replace(CONFIG, **{"moe.grouped_gemm": "pallas_mgpu"}), variables, x, replay,
                           make_mesh((1, 4, 1)))
    assert_agree(want, got)


def test_gmm_falls_back_on_shapes_the_kernel_cannot_take(caplog):
    x = jax.random.normal(jax.random.key(0), (8, 12))
    w = jax.random.normal(jax.random.key(1), (2, 12, 10))
    group_sizes = jnp.array([3, 5], jnp.int32)
    assert grouped_gemm.mgpu_unfit_reason(x, w) is not None
    assert grouped_gemm.mgpu_unfit_reason(x.astype(jnp.bfloat16), jnp.zeros((2, 256, 128), jnp.bfloat16)) is None
    fallbacks.forget()
    with caplog.at_level(logging.WARNING, logger=grouped_gemm.__name__):
        got = grouped_gemm.gmm(x, w, group_sizes, "pallas_mgpu")
        grouped_gemm.gmm(x, w, group_sizes, "pallas_mgpu")
    np.testing.assert_array_equal(got, jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=jnp.float32))
    assert sum("using jax.lax.ragged_dot" in r.getMessage() for r in caplog.records) == 1
