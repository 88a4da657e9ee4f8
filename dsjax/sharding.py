"""The device mesh and the two logical-axis rule tables.

Dimension letters used in names across dsjax (`x_BTD`, einsum strings):

    B batch            T query positions     S key positions      D model dim
    H heads            K qk-nope head dim    R rope head dim      O value head dim
    Q q latent         C kv latent           E experts            F FFN hidden
    V vocab            G GRPO group          L layers             N tokens (flattened B*T)

Parameters are created with logical names (`nn.with_logical_partitioning`); activations are
constrained at block boundaries with logical names (`nn.with_logical_constraint`). The two tables
below map those names onto the mesh axes ('data', 'expert', 'tensor'):

- batch over ('data', 'expert'); routed experts over 'expert'; heads, FFN hidden and vocab over
  'tensor'; with `mesh.fsdp` the model dim of every non-expert weight is sharded over 'data' too.

Meshes use Auto axis types: jax >= 0.10 defaults to Explicit axes, which Linen's logical
constraints do not drive.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from dsjax.config import MeshConfig, mesh_shape

AXES = ("data", "expert", "tensor")
BATCH = ("data", "expert")


def make_mesh(mesh: MeshConfig, devices: Optional[Sequence[jax.Device]] = None) -> jax.sharding.Mesh:
    """The ('data', 'expert', 'tensor') mesh, -1 filled from the available devices; a mesh with
    no -1 axis uses the first data*expert*tensor devices."""
    devices = list(devices if devices is not None else jax.devices())
    if -1 not in (mesh.data, mesh.expert, mesh.tensor):
        devices = devices[: mesh.data * mesh.expert * mesh.tensor]
    shape = mesh_shape(mesh, len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def param_rules(fsdp: bool = False) -> tuple[tuple[str, object], ...]:
    """Logical parameter axis -> mesh axis."""
    return (
        ("vocab", "tensor"),
        ("embed", "data" if fsdp else None),  # model dim of non-expert weights
        ("heads", "tensor"),
        ("mlp", "tensor"),
        ("expert", "expert"),
        ("expert_embed", None),
        ("expert_mlp", "tensor"),
        ("q_lora", None),
        ("kv_lora", None),
        ("head_dim", None),
        ("norm", None),
        ("layers", None),
    )


ACTIVATION_RULES: tuple[tuple[str, object], ...] = (
    ("batch", BATCH),
    ("length", None),
    ("embed", None),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("kv_lora", None),
    ("head_dim", None),
    ("expert", "expert"),
    ("tokens", BATCH),
)


@contextlib.contextmanager
def activation_rules():
    """Active logical rules for activation constraints inside a model apply."""
    with nn.logical_axis_rules(ACTIVATION_RULES):
        yield


def logical_shardings(abstract_tree, mesh: jax.sharding.Mesh, rules) -> object:
    """NamedShardings for a (possibly boxed) tree of arrays with logical names; unboxed leaves replicate."""
    specs = nn.get_partition_spec(abstract_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 2) -> NamedSharding:
    """Leading dim over ('data', 'expert'), the rest replicated."""
    return NamedSharding(mesh, P(BATCH, *([None] * (ndim - 1))))


def num_batch_shards(mesh: jax.sharding.Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH]))
