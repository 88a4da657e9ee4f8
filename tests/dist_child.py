"""One process of a 2-process jax.distributed run on localhost (gloo CPU collectives, 4 devices each):
prints the loss of one step of the tiny model on the (2, 2, 2) mesh spanning both processes."""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
process_id, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)

import numpy as np  # noqa: E402

import train_setup  # noqa: E402
from dsjax import sharding as shd  # noqa: E402
from dsjax.train import optimizer as opt, state as st  # noqa: E402
from dsjax.train.loop import global_batch  # noqa: E402
from dsjax.train.step import loss_and_grads  # noqa: E402

config = train_setup.tiny_config(mesh=(2, 2, 2))
mesh = shd.make_mesh(config.mesh)
assert mesh.size == 8 and jax.process_count() == 2
state = st.create(config, opt.make_optimizer(config.train), mesh, 0)
full = train_setup.random_batch(0)
rows = slice(process_id * 4, (process_id + 1) * 4)
batch = global_batch(mesh, {k: v[rows] for k, v in full.items()})
with jax.set_mesh(mesh):
    parts, _, _, _ = jax.jit(lambda s, b: loss_and_grads(config, s.params, s.router, b))(state, batch)
    total = float(jax.device_get(parts.total))
if process_id == 0:
    with open(out, "w") as f:
        f.write(repr(total))
jax.distributed.shutdown()
