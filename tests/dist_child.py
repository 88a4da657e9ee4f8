"""One process of a 2-process jax.distributed run on localhost (gloo CPU collectives, 4 devices each):
writes the loss of one step of the tiny model on the (2, 2, 2) mesh spanning both processes, and
checks the checkpoint path of the data state: every process's iterator state gathered (as the
training loop saves it), then each process resuming its own shard from the gathered list."""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # dsjax, installed or not

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
process_id, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)

import numpy as np  # noqa: E402

import train_setup  # noqa: E402
from dsjax import sharding as shd  # noqa: E402
from dsjax.train import optimizer as opt, state as st  # noqa: E402
from dsjax.data import make_tokenizer, make_train_iterator  # noqa: E402
from dsjax.distributed import allgather_json  # noqa: E402
from dsjax.train.loop import global_batch, own_data_state  # noqa: E402
from dsjax.train.step import loss_and_grads  # noqa: E402

config = train_setup.tiny_config(mesh=(2, 2, 2))
mesh = shd.make_mesh(config.mesh)
assert mesh.size == 8 and jax.process_count() == 2
state = st.create(config, opt.make_optimizer(config.train), mesh, 0)
full = train_setup.random_batch(0)
rows = slice(process_id * 4, (process_id + 1) * 4)
batch = global_batch(mesh, {k: v[rows] for k, v in full.items()})
with jax.set_mesh(mesh):
    parts = jax.jit(lambda s, b: loss_and_grads(config, s.params, s.router, b))(state, batch).parts
    total = float(jax.device_get(parts.total))

def iterator():
    return make_train_iterator(config.data, make_tokenizer(config.data.tokenizer), batch_size=4,
                               seq_len=config.data.seq_len)


data = iterator()
next(data)
states = allgather_json(data.get_state())  # what the loop writes into a checkpoint
resumed = iterator()
resumed.set_state(own_data_state(states))  # a settings mismatch (another process's shard) raises
same = all(np.array_equal(a, b) for a, b in zip(next(resumed).values(), next(data).values()))
if process_id == 0:
    with open(out, "w") as f:
        f.write(repr((total, [s["settings"]["process_index"] for s in states], same)))
jax.distributed.shutdown()
