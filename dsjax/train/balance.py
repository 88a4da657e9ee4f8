"""Auxiliary-loss-free load balancing (DeepSeek-V3 §2.1.2, eq. 16 and after).

After every training step each MoE layer's bias moves against its experts' loads:

    b_i <- b_i + γ · sign(mean_load - load_i)

with the loads counted over the whole global batch (the arrays are global, so the sums span every
device of the mesh), outside the gradient and the optimizer. The bias only changes which experts
are *selected*; gate weights never see it. MTP layers have routers too and are updated the same
way. γ = 0 freezes the bias.
"""

from __future__ import annotations


import jax.numpy as jnp


def bias_step(bias_E, load_E, gamma: float):
    """One update of one layer's (or a stack's, [L, E]) bias from its loads."""
    mean = load_E.mean(axis=-1, keepdims=True)
    return bias_E + gamma * jnp.sign(mean - load_E).astype(bias_E.dtype)


def update_router(router, moe_load_LE, mtp_loads, gamma: float):
    """The `router` collection after one balancing step.

    router: {'router': {'moe_stack': {...'bias': [L, E]}, 'mtp_k': {...'bias': [E]}}} as the model
    creates it; moe_load_LE: [L_moe, E] loads of the main MoE layers; mtp_loads: per MTP depth [E].
    """
    if not router:
        return router
    tree = router["router"]
    new = dict(tree)
    if "moe_stack" in tree:
        leaf = tree["moe_stack"]["scan"]["layer"]["moe"]["router"]["bias"]
        new["moe_stack"] = {"scan": {"layer": {"moe": {"router": {"bias": bias_step(leaf, moe_load_LE, gamma)}}}}}
    for k, load_E in enumerate(mtp_loads):
        name = f"mtp_{k}"
        if name in tree and load_E is not None:
            leaf = tree[name]["layer"]["moe"]["router"]["bias"]
            new[name] = {"layer": {"moe": {"router": {"bias": bias_step(leaf, load_E, gamma)}}}}
    return {"router": new}


def load_ratio(load_E):
    """max / mean expert load (1.0 is perfectly balanced), per layer."""
    return load_E.max(-1) / jnp.maximum(load_E.mean(-1), 1e-9)


