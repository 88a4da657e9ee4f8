"""Child for test_checkpoint's SIGKILL test: commits step 1, then starts step 2 held open in its commit.

Usage: python tests/ckpt_child.py DIRECTORY DELAY_S. Step s saves {"w": arange(64).reshape(8, 8) + s}
sharded over a (2, 2, 2) mesh, with extra {"step": s}. Prints "committed 2" only if step 2 finished.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.pop("DSJAX_TEST_SAVE_DELAY_S", None)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from dsjax import checkpoint  # noqa: E402


def state_at(step: int, mesh) -> dict:
    w_DF = jnp.arange(64, dtype=jnp.float32).reshape(8, 8) + step
    return {"w": jax.device_put(w_DF, NamedSharding(mesh, P("data", "tensor")))}


def main(directory: str, delay_s: str) -> None:
    mesh = jax.make_mesh((2, 2, 2), ("data", "expert", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    with checkpoint.Checkpointer(directory, keep=3) as ckpt:
        ckpt.save(1, state_at(1, mesh), {"step": 1})
    os.environ[checkpoint.TEST_DELAY_ENV] = delay_s  # read when the Checkpointer is built
    ckpt = checkpoint.Checkpointer(directory, keep=3)
    ckpt.save(2, state_at(2, mesh), {"step": 2})
    ckpt.wait()  # the parent SIGKILLs us in here, inside step 2's commit
    print("committed 2", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
