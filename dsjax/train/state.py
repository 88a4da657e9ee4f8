"""The train state — everything that changes in training, explicit — born sharded.

`TrainState` holds params, optimizer state, the router bias (the `router` collection: updated
outside the gradient and the optimizer), the step, an RNG key and the skipped-step counters.
`create` jits the initializer with `out_shardings` computed from the logical names the model
gives every parameter, so no parameter or moment is ever materialized whole on one device.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from dsjax import sharding as shd
from dsjax.config import Config
from dsjax.model import Transformer


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32: optimizer steps taken (skipped ones included)
    params: Any
    opt_state: Any
    router: Any  # {'router': bias tree}: aux-loss-free balancing biases
    rng: jax.Array
    skipped: jax.Array  # int32: total updates skipped for a non-finite loss or gradient
    consecutive_skips: jax.Array  # int32

    def variables(self):
        return {"params": self.params, **self.router}


def _init_boxed(config: Config, optimizer: optax.GradientTransformation, rng):
    """The TrainState from the real initializer, every leaf boxed with its logical axis names."""
    init_rng, state_rng = jax.random.split(rng)
    tokens = jnp.zeros((1, 8), jnp.int32)
    variables = Transformer(config.model).init(init_rng, tokens)
    params = variables["params"]
    router = {"router": variables["router"]} if "router" in variables else {}
    opt_state = optimizer.init(params)
    zero = jnp.zeros((), jnp.int32)
    return TrainState(zero, params, opt_state, router, state_rng, zero, zero)


def abstract_boxed(config: Config, optimizer):
    """The TrainState as boxed ShapeDtypeStructs carrying logical names — no mesh, no memory."""
    return jax.eval_shape(lambda: _init_boxed(config, optimizer, jax.random.PRNGKey(0)))


def shardings(config: Config, optimizer, mesh):
    """NamedShardings of the (unboxed) TrainState, from the parameters' logical names."""
    boxed = abstract_boxed(config, optimizer)
    return shd.logical_shardings(boxed, mesh, shd.param_rules(config.mesh.fsdp))


def abstract(config: Config, optimizer, mesh):
    """ShapeDtypeStructs of the TrainState with their target shardings (for restore and AOT)."""
    boxed = abstract_boxed(config, optimizer)
    state_shardings = shd.logical_shardings(boxed, mesh, shd.param_rules(config.mesh.fsdp))
    return jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                  nn.unbox(boxed), state_shardings)


def create(config: Config, optimizer, mesh, seed: int) -> TrainState:
    """The initial TrainState, every leaf created directly in its sharding."""
    out = shardings(config, optimizer, mesh)
    init = jax.jit(lambda rng: nn.unbox(_init_boxed(config, optimizer, rng)), out_shardings=out)
    with jax.set_mesh(mesh):
        return init(jax.random.PRNGKey(seed))


def load_workdir(workdir: str, mesh=None, step=None):
    """(Config, variables, step) of a run directory scripts/train.py, scripts/grpo.py (or
    convert_hf.py) wrote: config.json plus the parameters and router bias of the TrainState in
    checkpoints/, restored onto `mesh` (default: all devices on the data axis). The optimizer
    state is not read, so the run's optimizer does not matter."""
    import json
    import os

    from dsjax import checkpoint as ckpt_lib
    from dsjax.config import ConfigError, MeshConfig, from_config_dict, replace
    from dsjax.train.optimizer import make_optimizer

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ConfigError(f"{path}: not found — is {workdir} a dsjax run directory?")
    with open(path) as f:
        config = from_config_dict(json.load(f))
    if mesh is None:
        config = replace(config, mesh=MeshConfig())
        mesh = shd.make_mesh(config.mesh)
    full = abstract(config, make_optimizer(config.train), mesh)  # only its params and router are read
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=1_000_000)
    wanted = {"params": full.params, **({"router": full.router} if full.router else {})}
    parts, extra = checkpointer.restore_parts(step, abstract_parts=wanted)
    checkpointer.close()
    return config, {"params": parts["params"], **parts.get("router", {})}, int(extra["step"])
