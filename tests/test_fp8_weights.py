"""The experts' FP8 weights quantized before the layer scans (dsjax/model/fp8_weights.py).

Pairs that must agree: the model's loss and every gradient with the blocks made by
compute_variables vs made inside each layer, on one device and under an expert x tensor mesh; and
the property the hoisting is for — the layer scan then stacks no FP8 weight blocks as residuals,
where without it it does.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import presets
from dsjax import sharding as shd
from dsjax.config import replace
from dsjax.model import Transformer, compute_variables
from dsjax.model.fp8_weights import FP8_COLLECTION, expert_blocks
from dsjax.model.moe import MoE
from test_expert_parallel import make_mesh, rel

# F = 128 (a whole FP8 block: gate and up run as one GEMM), bf16 compute, float32 masters
CONFIG = replace(presets.load("tiny").model, num_hidden_layers=3, fp8="block", remat="minimal", dtype="bfloat16",
                 **{"moe.first_k_dense_replace": 1, "moe.dispatch": "dropless", "moe.moe_intermediate_size": 128})
TOKENS = jax.random.randint(jax.random.key(1), (2, 128), 0, CONFIG.vocab_size)


def _loss(hoisted: bool, variables):
    def loss(params):
        v = compute_variables(CONFIG, {**variables, "params": params})
        if not hoisted:
            v.pop(FP8_COLLECTION)
        return Transformer(CONFIG).apply(v, TOKENS, return_mtp=True).astype(jnp.float32).sum()
    return loss


def _init(key):
    return nn.unbox(Transformer(CONFIG).init(key, TOKENS))


@functools.cache
def _variables():
    return jax.jit(_init)(jax.random.key(0))


def _stacked_fp8_residuals(fn, *args) -> list:
    """Shapes of the float8 arrays that layer scans stack: the outputs of every scan in fn's jaxpr."""
    found = []

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "scan":
                found.extend(tuple(v.aval.shape) for v in eqn.outvars if v.aval.dtype == jnp.float8_e4m3fn)
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else (param,):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        visit(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        visit(sub)

    visit(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def test_compute_variables_makes_the_blocks_every_moe_layer_uses():
    """One entry per MoE module (the stack's, stacked [L, E, ...], and the MTP module's), none for the
    dense layers; none at all when the layers would not use them."""
    variables = jax.eval_shape(_init, jax.random.key(0))
    blocks = jax.eval_shape(functools.partial(compute_variables, CONFIG), variables)[FP8_COLLECTION]
    stack = blocks["moe_stack"]["scan"]["layer"]["moe"]
    e, d, f = CONFIG.moe.n_routed_experts, CONFIG.hidden_size, CONFIG.moe.moe_intermediate_size
    layers = CONFIG.num_hidden_layers - CONFIG.moe.first_k_dense_replace
    assert stack["gate_up"].q_GKN.shape == (layers, e, d, 2 * f)
    assert stack["gate_up"].qt_GNK.shape == (layers, e, 2 * f, d)
    assert stack["down"].q_GKN.shape == (layers, e, f, d) and stack["down"].q_GKN.dtype == jnp.float8_e4m3fn
    assert set(blocks) == {"moe_stack", "mtp_0"}
    assert blocks["mtp_0"]["layer"]["moe"]["down"].s_GJL.shape == (e, 1, (d + 127) // 128)
    for unused in (replace(CONFIG, fp8="none"), replace(CONFIG, **{"moe.dispatch": "capacity"})):
        assert FP8_COLLECTION not in jax.eval_shape(functools.partial(compute_variables, unused), variables)
    narrow = {"moe": {"gate": jnp.ones((e, d, 96)), "up": jnp.ones((e, d, 96)), "down": jnp.ones((e, 96, d))}}
    assert expert_blocks(CONFIG, narrow) == {}  # F not a multiple of 128: gate and up stay two GEMMs


def test_blocks_for_a_dispatch_that_would_ignore_them_are_refused():
    from dsjax.model import dispatch

    config = replace(CONFIG, **{"moe.dispatch": "capacity"})
    e, d, f = 4, 128, 128
    x, ids, weights = jnp.ones((8, d)), jnp.zeros((8, 2), jnp.int32), jnp.ones((8, 2))
    w_gate = w_up = jnp.ones((e, d, f))
    w_down = jnp.ones((e, f, d))
    blocks = expert_blocks(CONFIG, {"moe": {"gate": w_gate, "up": w_up, "down": w_down}})["moe"]
    with pytest.raises(ValueError, match="model.moe.dispatch='capacity'"):
        dispatch.routed_experts(x, ids, weights, w_gate, w_up, w_down, config,
                                dispatch.ExpertBlocks(blocks["gate_up"], blocks["down"]))


def test_hoisted_blocks_give_the_same_loss_and_gradients_and_leave_the_scan_stacks():
    variables = _variables()
    (loss_in, grads_in), (loss_out, grads_out) = (
        jax.jit(jax.value_and_grad(_loss(hoisted, variables)))(variables["params"]) for hoisted in (False, True))
    assert float(loss_out) == float(loss_in)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads_in), jax.tree_util.tree_leaves(grads_out)):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=jax.tree_util.keystr(path))

    e, d, f = CONFIG.moe.n_routed_experts, CONFIG.hidden_size, CONFIG.moe.moe_intermediate_size
    layers = CONFIG.num_hidden_layers - CONFIG.moe.first_k_dense_replace
    weight_stacks = {(layers, e, d, 2 * f), (layers, e, f, d)}  # [w_gate | w_up] and w_down, as saved
    in_layer = _stacked_fp8_residuals(jax.grad(_loss(False, variables)), variables["params"])
    hoisted = _stacked_fp8_residuals(jax.grad(_loss(True, variables)), variables["params"])
    assert weight_stacks <= set(in_layer)
    assert not weight_stacks & set(hoisted)
    assert len(hoisted) == len(in_layer) - len(weight_stacks)  # the activations' tiles are still saved


def test_hoisted_blocks_under_an_expert_and_tensor_mesh():
    """expert = 2, tensor = 2: the blocks are made per device in a shard_map with the weights' specs
    (each tensor shard's [gate | up] slice), and the MoE layer under the mesh gives the outputs and
    gradients it gives when it quantizes the weights itself."""
    config = replace(CONFIG, hidden_size=64, **{"moe.moe_intermediate_size": 256, "moe.n_shared_experts": 0})
    b, t = 4, 16
    x = jax.random.normal(jax.random.key(0), (b, t, config.hidden_size))
    seg = jnp.ones((b, t), jnp.int32)
    variables = nn.unbox(MoE(config).init(jax.random.key(1), x, seg))
    ct = jax.random.normal(jax.random.key(7), (b, t, config.hidden_size))
    mesh = make_mesh((1, 2, 2))

    def run(hoisted):
        def loss(params, x):
            v = {**variables, "params": params}
            if hoisted:
                v[FP8_COLLECTION] = expert_blocks(config, {"moe": params})["moe"]
            y, _ = MoE(config).apply(v, x.astype(jnp.bfloat16), seg)
            return (y.astype(jnp.float32) * ct).sum()
        with jax.set_mesh(mesh), nn.logical_axis_rules(shd.ACTIVATION_RULES):
            return jax.device_get(jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(variables["params"], x))

    (loss_in, grads_in), (loss_out, grads_out) = run(False), run(True)
    assert rel(loss_out, loss_in) <= 1e-6
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads_in), jax.tree_util.tree_leaves(grads_out)):
        assert rel(b, a) <= 1e-6, (jax.tree_util.keystr(path), rel(b, a))
