"""The routed experts' FP8 weights, quantized once per step before the layer scans (DeepSeek-V3 §3.3.2).

    variables[FP8_COLLECTION] = expert_blocks(config, params)      # compute_variables does this

With fp8 "block" each MoE layer's grouped GEMMs take [w_gate | w_up] and w_down as 128x128 FP8
blocks in both K-major orientations (`quantize_kernel.WeightBlocks`). Made inside the layer they are
a residual of the forward that the backward reads, and a layer scan stacks every residual into
[L, ...] buffers that it first fills with zeros (jax's scan allocates stacked outputs with
lax.empty, which lowers to zeros; on GPU train steps now skip the fill, dsjax/xla_options.py) and
then writes layer by layer: 3.9 GB of weight blocks per configs/small.py step (BENCHMARKS.md, FP8). Made here, before the scan, in one call per stack, they
enter the scan as a scanned input, which jax's scan hands to the backward as it is (its partial
evaluation forwards residuals that are slices of xs instead of stacking them): no zero fill, no
copy, and each weight is quantized once per step as before. On one H200 (2026-11-29,
BENCHMARKS.md) the configs/small.py fp8=block step went from 231.2-231.9 ms (sixth session) to
223.8-224.2 ms (seventh).

They are quantized from the weights as given (float32 masters in training), rounded to the compute
dtype first (`round_to`, in registers in the Pallas kernel): the blocks are bit-identical to those
the layer makes from its cast weights, and no bf16 copy of the experts' weights is written and read
back for them.

The tree mirrors `params`: for every MoE module (a dict holding the expert arrays gate, up, down)
{"gate_up": WeightBlocks, "down": WeightBlocks} at the same path, stacked [L, E, ...] under a layer
stack as its weights are. Under an expert-parallel mesh (`expert_parallel.mesh_for`) the
quantization runs in a shard_map with the weights' specs, so each device quantizes its own experts
(and F slice) as the layer would — XLA cannot partition a Pallas kernel; so call it where the model
runs, under the same mesh (compute_variables always is: inside the jitted step or generation, next
to the apply). Made only where the layer uses them: fp8 "block", dropless dispatch, a per-device
expert width that is a multiple of 128 (gate and up then run as one GEMM). They get no gradient: the GEMMs' custom VJP differentiates the
weights themselves (gmm_block's `blocks`).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
from jax.sharding import PartitionSpec as P

from dsjax.config import ModelConfig
from dsjax.fp8.dot import BLOCK
from dsjax.fp8.quantize_kernel import WeightBlocks, weight_blocks
from dsjax.model import expert_parallel
from dsjax.model.dispatch import ExpertBlocks

FP8_COLLECTION = "fp8"
_EXPERT_WEIGHTS = ("gate", "up", "down")


def expert_blocks(config: ModelConfig, params: Mapping) -> dict:
    """{path: {"gate_up": WeightBlocks, "down": WeightBlocks}} for every MoE module of `params` that
    will use them; {} when none will (see the module docstring)."""
    if config.fp8 != "block" or config.moe.dispatch != "dropless":
        return {}
    mesh = expert_parallel.mesh_for(config)
    tensor = None if mesh is None else expert_parallel.tensor_axis(mesh)
    split = 1 if tensor is None else mesh.shape[tensor]

    def walk(tree: Mapping) -> dict:
        out = {}
        for name, sub in tree.items():
            if not isinstance(sub, Mapping):
                continue
            if all(w in sub and not isinstance(sub[w], Mapping) for w in _EXPERT_WEIGHTS):
                if (sub["gate"].shape[-1] // split) % BLOCK == 0:
                    out[name] = _module_blocks(config, *(sub[w] for w in _EXPERT_WEIGHTS), mesh, tensor)._asdict()
            elif inner := walk(sub):
                out[name] = inner
        return out

    return walk(params)


def _module_blocks(config: ModelConfig, w_gate_XEDF, w_up_XEDF, w_down_XEFD, mesh, tensor) -> ExpertBlocks:
    """One MoE module's ExpertBlocks; X: leading (layer) axes, kept."""
    lead = w_gate_XEDF.shape[:-3]

    def quantize(*ws_XEKN) -> WeightBlocks:
        flat = tuple(jax.lax.stop_gradient(w).reshape((-1,) + w.shape[-2:]) for w in ws_XEKN)
        blocks = weight_blocks(flat, config.kernel_backend, round_to=config.dtype)
        e = ws_XEKN[0].shape[-3]
        return WeightBlocks(*(b.reshape(lead + (e,) + b.shape[1:]) for b in blocks))

    def both(w_gate, w_up, w_down) -> ExpertBlocks:
        return ExpertBlocks(quantize(w_gate, w_up), quantize(w_down))

    if mesh is None:
        return both(w_gate_XEDF, w_up_XEDF, w_down_XEFD)
    pad = (None,) * len(lead)
    weights = tuple(P(*pad, *spec) for spec in expert_parallel.weight_specs(tensor))
    blocks = jax.tree_util.tree_map(lambda spec: P(*pad, *spec), expert_parallel.block_specs(tensor),
                                    is_leaf=lambda x: isinstance(x, P))
    return jax.shard_map(both, mesh=mesh, in_specs=weights, out_specs=blocks, check_vma=False)(
        w_gate_XEDF, w_up_XEDF, w_down_XEFD)
