"""The per-device plan of one training step on a ('data', 'expert', 'tensor') mesh: bytes of
parameters, gradients, optimizer state and activations, all-to-all bytes per MoE layer, FLOPs per
token — worked out analytically, and read back from XLA's compiled step for comparison.

Analytic (`analytic`, no devices needed; mesh sizes come from config.mesh, no -1):

- State: every TrainState leaf of the real initializer (jax.eval_shape, no memory) is placed by its
  logical names through `sharding.param_rules(mesh.fsdp)`; a leaf holds, per device,
  itemsize · Π_dims ceil(dim / Π sizes of the mesh axes on that dim) bytes (XLA pads uneven
  shards). Parameters are param_dtype; AdamW's two moments are bf16 with train.bf16_moments.
- Gradients: jax.grad of the param_dtype master weights gives one parameter-sized copy in the
  parameters' layout; with train.microbatches > 1 the accumulation scan holds two (sum + current).
- Activations of one microbatch, n = batch / (data·expert·microbatches) · seq_len tokens per device,
  c = compute-dtype bytes, t = tensor size (heads, FFN and vocab are split over it):
      carries   L · n·D·c                   each scanned layer's input, kept for the backward
      saved     Σ_layers saved(remat)       full: nothing more; minimal: projection outputs
                                            (dots without batch dims); dots: + attention dots;
                                            none: every intermediate. MTP layers are never
                                            rematerialized: saved whole.
      working   all(layer) − saved(layer)   one layer's backward, for the largest layer: at its
                                            start the recomputed intermediates are all live (the
                                            saved ones counted above); cotangents then replace
                                            them, so the peak is about one layer's worth
      logits    (1 + mtp)·n·V/t·4 + 2·n·V/t·4   float32 logits per head, softmax and its cotangent
  Per-token intermediates are itemized in `_layer_bytes`. Under expert parallelism a MoE layer's
  buffers are expert_parallel.py's static worst case: r = S·n received rows, M = r·min(k, E/S)
  (row, expert) pairs, or M = ceil(c·n·k) with moe.ep_pair_capacity = c > 0 (dropless, drops
  counted); `ep_buffers="expected"` is a what-if dsjax does not implement: r and M at
  capacity_factor times their means (n·shards per token, n·k). grouped_gemm "xla" adds XLA's dense
  lowering of ragged_dot: three [E/S, M, D] float32 buffers at the backward's peak (XLA:CPU's
  buffer assignment; the first H200 step in BUILD_NOTES hit the same densification);
  "pallas_mgpu" has none. attention "xla" materializes [H/t, T, T] scores, "cudnn" does not.
- All-to-all per MoE layer per step (sent per device): fixed buffers move r·D·c per exchange
  whatever the route; ragged moves only rows sent, n·min(k, S, shards reachable under
  node-limited routing), or their expectation under uniform routing. Per step: (dispatch x +
  gate metadata + combine) × (forward + remat recompute + backward) × microbatches; a fraction
  (S−1)/S of it leaves the device. Tokens are replicated over 'tensor', so every tensor rank sends
  the same rows: the mesh moves tensor× the bytes of one rank.
- FLOPs per token: dsjax/train/flops.py (DESIGN.md's MFU formula).

Compiled (`compiled`): the real jitted step (train/step.py) lowered on ShapeDtypeStructs that carry
the state's NamedShardings — nothing is allocated — and `memory_analysis()` of two executables:
the step (arguments = state + batch; temp = activations + gradients + optimizer temporaries) and
its gradient half `loss_and_grads` returning the gradients in the parameters' shardings, as the
step's optimizer reads them (arguments = params + router + batch; output = gradients, whose
dtypes and tree the computation decides; temp = activations). Hence compiled parameters = probe
arguments − router − batch, gradients = probe output, optimizer state = step arguments − probe
arguments − scalars. The probe is compiled once more with its output sharding left to XLA, which
shows what propagation alone would lay out (it replicates the embedding's scatter-add gradient
over 'tensor'; the step, whose optimizer fixes the layout, does not).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from dsjax import sharding as shd
from dsjax.config import Config, ModelConfig, TrainConfig, replace
from dsjax.train import flops as flops_lib
from dsjax.train import state as state_lib
from dsjax.train.optimizer import make_optimizer
from dsjax.train.step import BATCH_KEYS, loss_and_grads, make_train_step

F32 = 4
# XLA's dense ragged_dot lowering keeps this many [E_l, M, D] float32 buffers at the backward peak.
RAGGED_DOT_DENSE_BUFFERS = 3


class StateBytes(NamedTuple):
    """Per-device bytes of the TrainState's parts."""

    params: int
    opt_state: int
    router: int
    scalars: int  # step, rng, skip counters


class AllToAll(NamedTuple):
    """Bytes one device sends per MoE layer per step (all exchanges, every pass)."""

    fixed: int  # 'all_to_all': worst-case [S·n, D] buffers, whatever the route
    ragged_worst: int  # 'ragged_all_to_all': every token to min(k, S, reachable) shards
    ragged_uniform: int  # 'ragged_all_to_all', experts drawn uniformly within the kept groups
    off_device: float  # fraction that leaves the device: (S-1)/S


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-device figures of one training step (bytes unless named otherwise)."""

    mesh: tuple[int, int, int]
    state: StateBytes
    gradients: int  # one parameter-sized copy, param_dtype
    accumulator: int  # the accumulation scan's running sum (train.microbatches > 1), else 0
    batch: int
    activations: dict[str, int]  # named terms, see the module docstring
    all_to_all: AllToAll
    moe_layers: int  # MoE layers exchanging tokens (MTP included)
    flops_per_token: float
    tokens_per_device: int  # per step, all microbatches

    @property
    def activation_total(self) -> int:
        return sum(self.activations.values())

    @property
    def total(self) -> int:
        s = self.state
        return (s.params + s.opt_state + s.router + s.scalars + self.gradients + self.accumulator + self.batch
                + self.activation_total)


def mesh_sizes(config: Config) -> dict[str, int]:
    m = config.mesh
    if -1 in (m.data, m.expert, m.tensor):
        raise ValueError("config field 'mesh': a plan needs every axis size given (no -1)")
    return {"data": m.data, "expert": m.expert, "tensor": m.tensor}


def shard_bytes(shape, dtype, spec: P, sizes: dict[str, int]) -> int:
    """Per-device bytes of an array laid out by a mesh PartitionSpec (uneven shards padded up)."""
    elements = 1
    for i, dim in enumerate(shape):
        axes = spec[i] if i < len(spec) else None
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        elements *= math.ceil(dim / math.prod(sizes[a] for a in axes))
    return elements * jnp.dtype(dtype).itemsize


@functools.lru_cache(maxsize=8)
def _boxed_state(model: ModelConfig, train: TrainConfig):
    """The real initializer's TrainState, abstract and boxed with logical names (mesh-independent)."""
    config = Config(model=model, train=train)
    optimizer = make_optimizer(train)
    return state_lib.abstract_boxed(config, optimizer)


def state_bytes(config: Config) -> StateBytes:
    """Per-device bytes of every TrainState part, from the leaves' logical names."""
    boxed = _boxed_state(cpu_compilable(config).model, config.train)  # kernels do not change the state
    sizes = mesh_sizes(config)
    mesh_specs = nn.logical_to_mesh(nn.get_partition_spec(boxed), shd.param_rules(config.mesh.fsdp))
    per_leaf = jax.tree_util.tree_map(lambda spec, x: shard_bytes(x.shape, x.dtype, spec, sizes), mesh_specs,
                                      nn.unbox(boxed), is_leaf=lambda x: isinstance(x, P))

    def total(tree):
        return int(sum(jax.tree_util.tree_leaves(tree)))

    scalars = per_leaf.step + per_leaf.rng + per_leaf.skipped + per_leaf.consecutive_skips
    return StateBytes(total(per_leaf.params), total(per_leaf.opt_state), total(per_leaf.router), total(scalars))


def microbatch_rows(config: Config) -> int:
    """Rows per device in one microbatch (the batch is split over data·expert)."""
    s = mesh_sizes(config)
    return config.train.batch_size // (s["data"] * s["expert"] * config.train.microbatches)


def _layer_bytes(config: Config, n: int, moe: bool, ep_buffers: str) -> dict[str, int]:
    """One decoder layer's forward intermediates on n tokens, per device, by kind: 'proj' (dots
    without batch dims), 'attn' (attention dots), 'other', and 'dense_ragged' (XLA's ragged_dot
    lowering: backward working set only)."""
    m, sizes = config.model, mesh_sizes(config)
    c = jnp.dtype(m.dtype).itemsize
    t, s_ep = sizes["tensor"], sizes["expert"]
    d, a = m.hidden_size, m.mla
    h = math.ceil(a.num_attention_heads / t)
    q = a.q_lora_rank or 0
    k_, r_, o_, lat = a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim, a.kv_lora_rank
    seq = config.data.seq_len
    proj = q + h * (k_ + r_) + (lat + r_) + h * (k_ + o_) + d  # q_a, q_b, kv_a, kv_b, o
    other = 4 * d + q + lat + h * r_ + r_  # norms, residual adds, rotated rope parts
    if m.attention == "xla":  # scores f32, masked scores f32, probs; the P·V output
        attn = h * seq * (2 * F32 + c) + h * o_ * c
    else:  # flash: [q;k_rope] and padded v copies, per-row logsumexp
        attn = 3 * h * (k_ + r_) * c + h * F32
    out = {"proj": proj * c * n, "attn": attn * n, "other": other * c * n, "dense_ragged": 0}
    if not moe:
        f = math.ceil(m.intermediate_size / t)
        out["proj"] += (2 * f + d) * c * n
        out["other"] += f * c * n
        return out
    e_cfg = m.moe
    e, kk = e_cfg.n_routed_experts, e_cfg.num_experts_per_tok
    f = math.ceil(e_cfg.moe_intermediate_size / t)
    fs = math.ceil(e_cfg.moe_intermediate_size * e_cfg.n_shared_experts / t)
    out["proj"] += (2 * fs + d) * c * n + e * F32 * n  # shared expert, router logits
    out["other"] += fs * c * n + 3 * e * F32 * n  # shared h; sigmoid, biased and masked scores
    e_l = e // s_ep
    rows = s_ep * n if s_ep > 1 else n  # received rows (static worst case under EP)
    pairs = rows * min(kk, e_l)
    if s_ep > 1 and e_cfg.dispatch == "dropless" and e_cfg.ep_pair_capacity > 0:  # bounded, drops counted
        pairs = min(pairs, math.ceil(e_cfg.ep_pair_capacity * n * kk))
    if ep_buffers == "expected" and s_ep > 1:  # what-if: capacity_factor x the mean (not in dsjax)
        rows = math.ceil(e_cfg.capacity_factor * n * _shards_per_token(config)[1])
        pairs = math.ceil(e_cfg.capacity_factor * n * kk)
    out["other"] += pairs * (d * c + d * F32 + 3 * 4)  # gathered rows, expert outputs, sort keys
    if e_cfg.dispatch == "capacity":  # [E_l, cap] buffers; cap counts the tokens of a data slice
        slots = e_l * math.ceil(e_cfg.capacity_factor * n * s_ep * kk / e)
        out["proj"] += slots * (2 * f + d) * F32  # gate, up, down einsums, float32 out
        out["other"] += slots * (d + f) * c  # the scattered buffer, h
    else:
        out["proj"] += pairs * 2 * f * F32  # gate, up grouped GEMMs, float32 out
        out["other"] += pairs * f * c  # h
    if s_ep > 1:  # send/recv tokens + metadata, combined rows f32 -> c -> back -> f32, per-token sum
        out["other"] += rows * (2 * d * c + 2 * 2 * kk * F32 + d * F32 + 2 * d * c + d * F32) + n * d * F32
    if e_cfg.grouped_gemm == "xla" and e_cfg.dispatch != "capacity":
        out["dense_ragged"] = RAGGED_DOT_DENSE_BUFFERS * e_l * pairs * d * F32
    return out


def _saved(layer: dict[str, int], remat: str) -> int:
    kinds = {"full": (), "minimal": ("proj",), "dots": ("proj", "attn"), "none": ("proj", "attn", "other")}[remat]
    return sum(layer[k] for k in kinds)


def activation_bytes(config: Config, ep_buffers: str = "worst") -> dict[str, int]:
    """Named per-device activation terms of one microbatch (module docstring). ep_buffers "worst"
    is dsjax's static sizing; "expected" sizes them at capacity_factor times the mean — a what-if,
    not something dsjax implements."""
    m = config.model
    n = microbatch_rows(config) * config.data.seq_len
    c = jnp.dtype(m.dtype).itemsize
    mtp = m.mtp.num_nextn_predict_layers if config.train.mtp_weight > 0 else 0
    v = math.ceil(m.vocab_size / mesh_sizes(config)["tensor"])
    dense, moe = _layer_bytes(config, n, False, ep_buffers), _layer_bytes(config, n, True, ep_buffers)
    mtp_layer = moe if m.moe.n_routed_experts else dense

    def everything(layer):
        return layer["proj"] + layer["attn"] + layer["other"]

    working = max(everything(layer) - _saved(layer, m.remat) + layer["dense_ragged"]
                  for layer in ([dense] if m.num_dense_layers else []) + ([moe] if m.num_moe_layers or mtp else []))
    return {
        "layer carries": (m.num_hidden_layers + 1) * n * m.hidden_size * c,
        "saved in layers": m.num_dense_layers * _saved(dense, m.remat) + m.num_moe_layers * _saved(moe, m.remat),
        "MTP layers (no remat)": mtp * (everything(mtp_layer) + 7 * n * m.hidden_size * c),
        "one layer's backward": working,
        "logits and loss": (1 + mtp) * n * v * F32 + 2 * n * v * F32,
    }


def _shards_per_token(config: Config) -> tuple[int, float]:
    """Expert shards one token reaches: the bound min(k, reachable shards), and the mean when its k
    experts are drawn uniformly from its topk_group kept groups (node-limited routing, V3 §2.1.2)."""
    moe, s = config.model.moe, mesh_sizes(config)["expert"]
    e, k = moe.n_routed_experts, moe.num_experts_per_tok
    e_l, g = e // s, e // moe.n_group
    if g % e_l == 0:  # a group spans g / e_l whole shards
        shards, per_shard = moe.topk_group * g // e_l, e_l
    elif e_l % g == 0:  # a shard holds whole groups (kept groups taken to sit on distinct shards)
        shards, per_shard = min(s, moe.topk_group), g
    else:  # groups straddle shards: any shard may be reached
        shards, per_shard = s, e_l
    pool = shards * per_shard
    miss = math.comb(pool - per_shard, k) / math.comb(pool, k)
    return min(k, shards), shards * (1.0 - miss)


def all_to_all_bytes(config: Config, ep_buffers: str = "worst") -> AllToAll:
    """Bytes one device sends over 'expert' per MoE layer per step (module docstring); with
    ep_buffers "expected" the fixed buffers hold capacity_factor x the mean rows (a what-if)."""
    m, sizes = config.model, mesh_sizes(config)
    s = sizes["expert"]
    if s == 1 or not m.moe.n_routed_experts or m.moe.dispatch == "dense":
        return AllToAll(0, 0, 0, 0.0)
    c = jnp.dtype(m.dtype).itemsize
    n = microbatch_rows(config) * config.data.seq_len
    k = m.moe.num_experts_per_tok
    passes = 2 if m.remat == "none" else 3  # forward, rematerialized forward, backward
    per_row = 2 * m.hidden_size * c + 2 * k * F32  # dispatch row + its ids/gates, combined row back
    bound, uniform = _shards_per_token(config)
    scale = passes * config.train.microbatches
    fixed_rows = s * n if ep_buffers == "worst" else math.ceil(m.moe.capacity_factor * n * uniform)
    return AllToAll(scale * fixed_rows * per_row, scale * n * bound * per_row, int(scale * n * uniform * per_row),
                    (s - 1) / s)


def analytic(config: Config, ep_buffers: str = "worst") -> Plan:
    """The plan of `config` on the mesh config.mesh describes; no devices needed."""
    m = config.model
    state = state_bytes(config)
    sizes = mesh_sizes(config)
    batch = len(BATCH_KEYS) * 4 * math.ceil(config.train.batch_size / (sizes["data"] * sizes["expert"])) \
        * config.data.seq_len
    with_mtp = m.mtp.num_nextn_predict_layers > 0 and config.train.mtp_weight > 0
    seq = config.data.seq_len
    moe_layers = (m.num_moe_layers + (m.mtp.num_nextn_predict_layers if with_mtp else 0)) if m.moe.n_routed_experts \
        else 0
    return Plan(mesh=(sizes["data"], sizes["expert"], sizes["tensor"]), state=state, gradients=state.params,
                accumulator=state.params if config.train.microbatches > 1 else 0, batch=batch,
                activations=activation_bytes(config, ep_buffers), all_to_all=all_to_all_bytes(config, ep_buffers),
                moe_layers=moe_layers, flops_per_token=flops_lib.train_flops(m, 1, seq, with_mtp) / seq,
                tokens_per_device=microbatch_rows(config) * config.train.microbatches * seq)


# ---------------------------------------------------------------------------------- compiled


class Compiled(NamedTuple):
    """Per-device bytes read from XLA's memory_analysis of the compiled step and its gradient half."""

    params: int
    gradients: int  # laid out as the optimizer reads them (the parameters' shardings)
    gradients_xla_layout: int | None  # output sharding left to XLA's propagation (None: not compiled)
    opt_state: int
    step_arguments: int
    step_temp: int  # activations + gradients + optimizer temporaries
    grads_temp: int  # activations of the forward + backward alone
    step_peak: int  # arguments + outputs not aliased to them + temp
    step_compile_s: float
    grads_compile_s: float


def reduced_depth(config: Config, moe_layers: int = 2) -> Config:
    """Full width, the dense layers plus `moe_layers` MoE layers (MTP as configured)."""
    layers = config.model.moe.first_k_dense_replace + moe_layers
    return replace(config, **{"model.num_hidden_layers": layers})


def _abstract_batch(config: Config, mesh):
    sharding = shd.batch_sharding(mesh, 2)
    shape = (config.train.batch_size, config.data.seq_len)
    return {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "loss_mask" else jnp.int32, sharding=sharding)
            for k in BATCH_KEYS}


def compiled(config: Config, mesh, xla_layout: bool = True) -> Compiled:
    """Lower and compile the real step on `mesh` (fake CPU devices will do) from abstract inputs;
    `xla_layout` also compiles the gradient half with its output layout left to XLA."""
    optimizer = make_optimizer(config.train)
    abstract = state_lib.abstract(config, optimizer, mesh)
    shardings = jax.tree_util.tree_map(lambda x: x.sharding, abstract)
    batch = _abstract_batch(config, mesh)
    step = make_train_step(config, optimizer, mesh, shardings)
    in_shardings = (shardings.params, shardings.router, {k: x.sharding for k, x in batch.items()})

    def grads_fn(out_shardings):
        return jax.jit(lambda p, r, b: loss_and_grads(config, p, r, b).grads, in_shardings=in_shardings,
                       out_shardings=out_shardings)

    with jax.set_mesh(mesh):
        start = time.perf_counter()
        step_mem = step.lower(abstract, batch).compile().memory_analysis()
        step_s = time.perf_counter() - start
        start = time.perf_counter()
        grads_mem = grads_fn(shardings.params).lower(abstract.params, abstract.router, batch).compile() \
            .memory_analysis()
        grads_s = time.perf_counter() - start
        free = grads_fn(None).lower(abstract.params, abstract.router, batch).compile().memory_analysis() \
            if xla_layout else None
    sizes = {a: mesh.shape[a] for a in shd.AXES}
    router = int(sum(shard_bytes(x.shape, x.dtype, x.sharding.spec, sizes)
                     for x in jax.tree_util.tree_leaves(abstract.router)))
    batch_bytes = int(sum(shard_bytes(x.shape, x.dtype, x.sharding.spec, sizes) for x in batch.values()))
    scalars = int(sum(np.dtype(x.dtype).itemsize * math.prod(x.shape)
                      for x in (abstract.step, abstract.rng, abstract.skipped, abstract.consecutive_skips)))
    params = grads_mem.argument_size_in_bytes - router - batch_bytes
    return Compiled(
        params=params, gradients=grads_mem.output_size_in_bytes,
        gradients_xla_layout=free.output_size_in_bytes if free else None,
        opt_state=step_mem.argument_size_in_bytes - grads_mem.argument_size_in_bytes - scalars,
        step_arguments=step_mem.argument_size_in_bytes, step_temp=step_mem.temp_size_in_bytes,
        grads_temp=grads_mem.temp_size_in_bytes,
        step_peak=(step_mem.argument_size_in_bytes + step_mem.output_size_in_bytes - step_mem.alias_size_in_bytes
                   + step_mem.temp_size_in_bytes),
        step_compile_s=step_s, grads_compile_s=grads_s)


def cpu_compilable(config: Config) -> Config:
    """The same model with GPU-only kernels swapped for their XLA references, so XLA:CPU can compile
    it (state bytes are unchanged; activations then follow the XLA paths)."""
    return replace(config, **{"model.moe.grouped_gemm": "xla", "model.attention": "xla",
                              "model.kernel_backend": "xla_cpu"})


# -------------------------------------------------------------------------------- fitting


KNOBS = (  # tried cumulatively, cheapest first: (label, config changes)
    ("fsdp", {"mesh.fsdp": True}),
    ("pallas grouped GEMM", {"model.moe.grouped_gemm": "pallas_mgpu"}),
    ("cudnn attention", {"model.attention": "cudnn"}),
    ("bf16 moments", {"train.bf16_moments": True}),
)


def meshes(config: Config, devices: int, max_tensor: int) -> list[tuple[int, int, int]]:
    """(data, expert, tensor) over `devices` with experts and heads dividing evenly."""
    m = config.model
    out = []
    for tensor in range(1, max_tensor + 1):
        for expert in range(1, devices // tensor + 1):
            if devices % (tensor * expert) or m.mla.num_attention_heads % tensor:
                continue
            if m.moe.n_routed_experts % expert:
                continue
            out.append((devices // (tensor * expert), expert, tensor))
    return out


def on_mesh(config: Config, mesh: tuple[int, int, int], global_batch: int, rows_per_device: int = 1) -> Config:
    """`config` on `mesh` with `rows_per_device` rows per microbatch and as many microbatches as
    reach `global_batch` rows (rounded up)."""
    data, expert, tensor = mesh
    rows = data * expert * rows_per_device
    micro = max(1, math.ceil(global_batch / rows))
    return replace(config, **{"mesh.data": data, "mesh.expert": expert, "mesh.tensor": tensor,
                              "train.batch_size": rows * micro, "train.microbatches": micro})


def fit(config: Config, budget_bytes: float, ep_buffers: str = "worst") -> tuple[tuple[str, ...], Config, Plan]:
    """The fewest KNOBS (applied in order) whose plan fits `budget_bytes`: (their labels, the
    config with them, its plan); when none fits, every knob's."""
    labels: tuple[str, ...] = ()
    plan = analytic(config, ep_buffers)
    for label, changes in KNOBS:
        if plan.total <= budget_bytes:
            break
        changed = replace(config, **changes)
        if changed != config:
            config, labels, plan = changed, labels + (label,), analytic(changed, ep_buffers)
    return labels, config, plan
