"""Every dsjax setting, declared once, with the paper's field names.

Frozen dataclasses hold the defaults; `configs/*.py` are ml-collections files that start from
`config_dict()` (a ConfigDict of every default) and override a few keys, so `--config.x=...` works on
the command line and a misspelt key is an error. `from_config_dict` turns the ConfigDict back into
the dataclasses and validates, naming the field, before anything compiles.

Field names follow DeepSeek-V3's config.json (kv_lora_rank, qk_rope_head_dim, n_routed_experts,
routed_scaling_factor, ...), grouped into parts: `mla`, `moe`, `mtp`, `rope`. The public API's
`config` is the ModelConfig.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Optional

# ---------------------------------------------------------------------------------------- model


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    """Multi-head Latent Attention (DeepSeek-V2 §2.1)."""

    num_attention_heads: int = 4
    q_lora_rank: Optional[int] = 32  # None: direct query projection (V2-Lite)
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """RoPE on the decoupled rope dims, optionally YaRN-scaled (DeepSeek-V2 App. B)."""

    rope_theta: float = 10000.0
    interleave: bool = True  # pairs (x0,x1),(x2,x3),... as in the official checkpoints; False: split halves
    scaling: str = "none"  # "none" | "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """DeepSeekMoE (DeepSeek-V3 §2.1.2): routed + shared experts, group-limited routing."""

    first_k_dense_replace: int = 1
    moe_intermediate_size: int = 32
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    n_group: int = 2
    topk_group: int = 1
    topk_method: str = "noaux_tc"  # "noaux_tc" (V3) | "group_limited_greedy" | "greedy" (V2)
    scoring_func: str = "sigmoid"  # "sigmoid" (V3) | "softmax" (V2)
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    dispatch: str = "dropless"  # "dropless" | "capacity" | "dense" (reference, every expert on every token)
    capacity_factor: float = 1.25
    # Token exchange over the mesh's 'expert' axis (dsjax/model/expert_parallel.py): fixed worst-case
    # buffers through all_to_all (every backend) or ragged_all_to_all (GPU/TPU; XLA:CPU lacks it).
    expert_parallel: str = "all_to_all"  # "all_to_all" | "ragged_all_to_all"
    # Under expert parallelism with dispatch "dropless": 0 sizes each device's (row, local expert)
    # pair buffer for the worst case, S·N·min(k, E/S) pairs (no drops); c > 0 sizes it
    # ceil(c·N·k), c times what a balanced route brings (N tokens per device), and drops, counted,
    # the pairs that arrive past it.
    ep_pair_capacity: float = 0.0
    grouped_gemm: str = "xla"  # "xla" (jax.lax.ragged_dot) | "pallas_mgpu" (Hopper Pallas kernels)


@dataclasses.dataclass(frozen=True)
class MTPConfig:
    """Multi-token prediction (DeepSeek-V3 §2.2)."""

    num_nextn_predict_layers: int = 0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    dtype: str = "float32"  # compute dtype; master weights are param_dtype
    param_dtype: str = "float32"
    fp8: str = "none"  # "none" | "tensor" | "block"
    kernel_backend: str = "xla_cpu"  # "xla_cpu" | "xla_gpu" | "xla_tpu" | "pallas_gpu"
    attention: str = "xla"  # "xla" | "cudnn"   (training / prefill attention core)
    decode_attention: str = "xla"  # "xla" | "pallas"   (absorbed decode over the latent cache)
    remat: str = "none"  # "none" | "full" | "dots" | "minimal"
    mla: MLAConfig = MLAConfig()
    rope: RopeConfig = RopeConfig()
    moe: MoEConfig = MoEConfig()
    mtp: MTPConfig = MTPConfig()

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.num_dense_layers

    @property
    def num_dense_layers(self) -> int:
        return min(self.moe.first_k_dense_replace, self.num_hidden_layers) if self.moe.n_routed_experts else self.num_hidden_layers


# ----------------------------------------------------------------------------------------- rest


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh ('data', 'expert', 'tensor'); -1 fills with the remaining devices."""

    data: int = -1
    expert: int = 1
    tensor: int = 1
    fsdp: bool = False  # shard non-expert weights over 'data' too


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = "arithmetic"  # "arithmetic" | "stdlib" | "text" | "jsonl" | "arrayrecord"
    paths: tuple[str, ...] = ()
    jsonl_field: str = "text"
    tokenizer: str = "byte"  # "byte" or a path to a local tokenizer.json
    seq_len: int = 128
    seed: int = 0
    heldout_size: int = 512  # problems (arithmetic) or documents held out from training
    num_workers: int = 0
    max_operand: int = 99  # arithmetic task difficulty
    max_terms: int = 3
    arithmetic_ops: tuple[str, ...] = ("+", "-")  # any of "+", "-", "*"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 200  # the run's horizon: schedule and data order
    stop_at_step: Optional[int] = None  # end early with a checkpoint, as a preemption would
    batch_size: int = 8  # sequences per step (global)
    microbatches: int = 1
    learning_rate: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    bf16_moments: bool = False
    mtp_weight: float = 0.3
    seq_aux_weight: float = 1e-4
    bias_update_rate: float = 1e-3  # γ of aux-loss-free balancing; 0 freezes the bias
    max_consecutive_skips: int = 5
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    seed: int = 0
    peak_tflops: float = 989.0  # H200 dense bf16, for MFU


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    init_checkpoint: Optional[str] = None  # a workdir (or checkpoints dir) scripts/train.py wrote
    steps: int = 100
    stop_at_step: Optional[int] = None
    prompts_per_step: int = 8
    num_generations: int = 8  # G
    max_prompt_length: int = 64
    max_completion_length: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_iterations: int = 1  # μ
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.0
    aggregation: str = "token"  # "sequence" | "token" | "dr_grpo"
    scale_rewards: str = "group"  # "group" | "batch" | "none"
    reward_funcs: tuple[str, ...] = ("accuracy", "format")
    reward_weights: tuple[float, ...] = (1.0, 0.5)
    reward_timeout_s: float = 5.0
    router_replay: bool = True
    mtp_weight: float = 0.0
    learning_rate: float = 1e-4
    eval_every: int = 10
    heldout_eval_size: int = 512
    log_every: int = 1
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    seed: int = 0  # rollout sampling (and the init when there is no init_checkpoint)
    weight_decay: float = 0.0  # AdamW decay during RL (TRL's default 0); other AdamW fields from train.*
    microbatches: int = 1  # row chunks of the log-prob forwards and of the update's gradient accumulation
    eval_batch_size: int = 256  # held-out prompts decoded at once


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    grpo: GRPOConfig = GRPOConfig()


# --------------------------------------------------------------------------------- validation


class ConfigError(ValueError):
    """A config value that dsjax cannot run; the message names the field."""


_CHOICES = {
    "model.dtype": ("float32", "bfloat16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.fp8": ("none", "tensor", "block"),
    "model.kernel_backend": ("xla_cpu", "xla_gpu", "xla_tpu", "pallas_gpu"),
    "model.attention": ("xla", "cudnn"),
    "model.decode_attention": ("xla", "pallas"),
    "model.remat": ("none", "full", "dots", "minimal"),
    "model.rope.scaling": ("none", "yarn"),
    "model.moe.topk_method": ("noaux_tc", "group_limited_greedy", "greedy"),
    "model.moe.scoring_func": ("sigmoid", "softmax"),
    "model.moe.dispatch": ("dropless", "capacity", "dense"),
    "model.moe.expert_parallel": ("all_to_all", "ragged_all_to_all"),
    "model.moe.grouped_gemm": ("xla", "pallas_mgpu"),
    "data.source": ("arithmetic", "stdlib", "text", "jsonl", "arrayrecord"),
    "grpo.aggregation": ("sequence", "token", "dr_grpo"),
    "grpo.scale_rewards": ("group", "batch", "none"),
}


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config field '{field}': {message}")


def validate_model(m: ModelConfig, prefix: str = "model") -> ModelConfig:
    """Checks a ModelConfig; returns it unchanged or raises ConfigError naming the field."""
    for key, choices in _CHOICES.items():
        if key.startswith("model."):
            value = m
            for part in key.split(".")[1:]:
                value = getattr(value, part)
            _check(value in choices, prefix + key[len("model"):], f"{value!r} is not one of {choices}")
    positive = {
        "vocab_size": m.vocab_size, "hidden_size": m.hidden_size, "intermediate_size": m.intermediate_size,
        "num_hidden_layers": m.num_hidden_layers, "mla.num_attention_heads": m.mla.num_attention_heads,
        "mla.kv_lora_rank": m.mla.kv_lora_rank, "mla.qk_nope_head_dim": m.mla.qk_nope_head_dim,
        "mla.v_head_dim": m.mla.v_head_dim, "max_position_embeddings": m.max_position_embeddings,
    }
    for name, value in positive.items():
        _check(value > 0, f"{prefix}.{name}", f"must be positive, got {value}")
    _check(m.mla.qk_rope_head_dim > 0 and m.mla.qk_rope_head_dim % 2 == 0, f"{prefix}.mla.qk_rope_head_dim",
           f"must be positive and even (RoPE rotates pairs), got {m.mla.qk_rope_head_dim}")
    _check(m.mla.q_lora_rank is None or m.mla.q_lora_rank > 0, f"{prefix}.mla.q_lora_rank",
           f"must be None or positive, got {m.mla.q_lora_rank}")
    _check(m.rms_norm_eps > 0, f"{prefix}.rms_norm_eps", "must be positive")
    if m.rope.scaling == "yarn":
        _check(m.rope.factor >= 1.0, f"{prefix}.rope.factor", f"YaRN factor must be >= 1, got {m.rope.factor}")
        _check(m.rope.original_max_position_embeddings > 0, f"{prefix}.rope.original_max_position_embeddings",
               "must be positive")
    moe = m.moe
    _check(0 <= moe.first_k_dense_replace, f"{prefix}.moe.first_k_dense_replace", "must be >= 0")
    _check(moe.n_routed_experts >= 0, f"{prefix}.moe.n_routed_experts", "must be >= 0")
    if moe.n_routed_experts and m.num_hidden_layers > moe.first_k_dense_replace:
        _check(moe.moe_intermediate_size > 0, f"{prefix}.moe.moe_intermediate_size", "must be positive")
        _check(1 <= moe.num_experts_per_tok <= moe.n_routed_experts, f"{prefix}.moe.num_experts_per_tok",
               f"must be in [1, n_routed_experts={moe.n_routed_experts}], got {moe.num_experts_per_tok}")
        _check(moe.n_group >= 1 and moe.n_routed_experts % moe.n_group == 0, f"{prefix}.moe.n_group",
               f"n_routed_experts={moe.n_routed_experts} must divide into n_group={moe.n_group} groups")
        _check(1 <= moe.topk_group <= moe.n_group, f"{prefix}.moe.topk_group",
               f"must be in [1, n_group={moe.n_group}], got {moe.topk_group}")
        per_group = moe.n_routed_experts // moe.n_group
        if moe.topk_method == "noaux_tc":
            _check(per_group >= 2, f"{prefix}.moe.n_group",
                   f"noaux_tc ranks groups by their top-2 scores: needs >= 2 experts per group, got {per_group}")
            _check(moe.scoring_func == "sigmoid", f"{prefix}.moe.scoring_func",
                   "topk_method 'noaux_tc' (V3) uses sigmoid scores")
        else:
            _check(moe.scoring_func == "softmax", f"{prefix}.moe.scoring_func",
                   f"topk_method {moe.topk_method!r} (V2) uses softmax scores")
            _check(not moe.norm_topk_prob, f"{prefix}.moe.norm_topk_prob",
                   "V2 routing (softmax) with norm_topk_prob=True is not supported (no official V2 config sets it)")
        _check(moe.topk_group * per_group >= moe.num_experts_per_tok, f"{prefix}.moe.topk_group",
               f"topk_group={moe.topk_group} groups of {per_group} experts cannot supply "
               f"num_experts_per_tok={moe.num_experts_per_tok}")
        _check(moe.n_shared_experts >= 0, f"{prefix}.moe.n_shared_experts", "must be >= 0")
        _check(moe.capacity_factor > 0, f"{prefix}.moe.capacity_factor", "must be positive")
        _check(moe.ep_pair_capacity >= 0, f"{prefix}.moe.ep_pair_capacity", "must be >= 0 (0: worst case, no drops)")
    _check(m.attention == "xla" or m.kernel_backend in ("xla_gpu", "pallas_gpu"), f"{prefix}.attention",
           f"'cudnn' attention needs a GPU kernel_backend, got {m.kernel_backend!r}")
    _check(m.decode_attention == "xla" or m.kernel_backend in ("xla_gpu", "pallas_gpu", "xla_cpu"),
           f"{prefix}.decode_attention", f"'pallas' decode attention runs on GPU (or interpreted on CPU), "
           f"not with kernel_backend {m.kernel_backend!r}")
    _check(m.mtp.num_nextn_predict_layers >= 0, f"{prefix}.mtp.num_nextn_predict_layers", "must be >= 0")
    for name in ("bos_token_id", "eos_token_id"):
        tok = getattr(m, name)
        _check(tok is None or 0 <= tok < m.vocab_size, f"{prefix}.{name}", f"{tok} is outside the vocabulary")
    return m


def validate(c: Config, num_devices: Optional[int] = None) -> Config:
    """Checks a whole Config (and its mesh against `num_devices` when given)."""
    validate_model(c.model)
    for key, choices in _CHOICES.items():
        if not key.startswith("model."):
            section, name = key.split(".")
            value = getattr(getattr(c, section), name)
            _check(value in choices, key, f"{value!r} is not one of {choices}")
    for name in ("data", "expert", "tensor"):
        size = getattr(c.mesh, name)
        _check(size == -1 or size >= 1, f"mesh.{name}", f"must be -1 (fill) or >= 1, got {size}")
    _check([c.mesh.data, c.mesh.expert, c.mesh.tensor].count(-1) <= 1, "mesh", "at most one axis may be -1")
    if num_devices is not None:
        sizes = mesh_shape(c.mesh, num_devices)
        _check(c.model.mla.num_attention_heads % sizes[2] == 0, "model.mla.num_attention_heads",
               f"{c.model.mla.num_attention_heads} heads do not divide over mesh.tensor={sizes[2]}")
        if c.model.moe.n_routed_experts:
            _check(c.model.moe.n_routed_experts % sizes[1] == 0, "model.moe.n_routed_experts",
                   f"{c.model.moe.n_routed_experts} experts do not divide over mesh.expert={sizes[1]}")
        _check(c.train.batch_size % (sizes[0] * sizes[1] * c.train.microbatches) == 0, "train.batch_size",
               f"{c.train.batch_size} does not divide over data*expert={sizes[0] * sizes[1]} devices "
               f"x microbatches={c.train.microbatches}")
    t = c.train
    _check(t.steps >= 1, "train.steps", f"must be >= 1, got {t.steps}")
    _check(t.stop_at_step is None or 1 <= t.stop_at_step <= t.steps, "train.stop_at_step",
           f"must be in [1, train.steps={t.steps}], got {t.stop_at_step}")
    _check(t.batch_size >= 1 and t.microbatches >= 1, "train.batch_size", "batch_size and microbatches must be >= 1")
    _check(t.batch_size % t.microbatches == 0, "train.microbatches",
           f"batch_size={t.batch_size} is not divisible by microbatches={t.microbatches}")
    _check(t.learning_rate > 0, "train.learning_rate", "must be positive")
    _check(0 <= t.warmup_steps, "train.warmup_steps", "must be >= 0")
    _check(t.bias_update_rate >= 0, "train.bias_update_rate", "must be >= 0 (0 freezes the bias)")
    _check(t.log_every >= 1, "train.log_every", "must be >= 1")
    _check(t.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1")
    _check(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
    _check(c.data.seq_len >= 2, "data.seq_len", f"must be >= 2, got {c.data.seq_len}")
    _check(c.data.seq_len <= c.model.max_position_embeddings, "data.seq_len",
           f"{c.data.seq_len} exceeds model.max_position_embeddings={c.model.max_position_embeddings}")
    g = c.grpo
    _check(g.num_generations >= 2, "grpo.num_generations", "GRPO needs groups of >= 2 completions")
    _check(len(g.reward_funcs) == len(g.reward_weights), "grpo.reward_weights",
           f"{len(g.reward_weights)} weights for {len(g.reward_funcs)} reward_funcs")
    for name in ("steps", "prompts_per_step", "max_prompt_length", "max_completion_length", "num_iterations",
                 "eval_every", "log_every", "checkpoint_every", "keep_checkpoints", "microbatches",
                 "eval_batch_size"):
        _check(getattr(g, name) >= 1, f"grpo.{name}", f"must be >= 1, got {getattr(g, name)}")
    _check(g.stop_at_step is None or 1 <= g.stop_at_step <= g.steps, "grpo.stop_at_step",
           f"must be in [1, grpo.steps={g.steps}], got {g.stop_at_step}")
    _check(g.heldout_eval_size >= 0, "grpo.heldout_eval_size", "must be >= 0 (0 skips the held-out evaluation)")
    _check(g.learning_rate > 0, "grpo.learning_rate", "must be positive")
    for name in ("temperature", "beta", "epsilon_low", "epsilon_high", "mtp_weight", "weight_decay"):
        _check(getattr(g, name) >= 0, f"grpo.{name}", f"must be >= 0, got {getattr(g, name)}")
    _check(g.top_k >= 0 and 0 < g.top_p <= 1, "grpo.top_k", f"top_k must be >= 0 and top_p in (0, 1], "
           f"got top_k={g.top_k}, top_p={g.top_p}")
    _check(g.prompts_per_step * g.num_generations % g.microbatches == 0, "grpo.microbatches",
           f"prompts_per_step*num_generations={g.prompts_per_step * g.num_generations} is not divisible "
           f"by microbatches={g.microbatches}")
    return c


def mesh_shape(mesh: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """The (data, expert, tensor) sizes, with a -1 axis filled from `num_devices`."""
    sizes = [mesh.data, mesh.expert, mesh.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        _check(num_devices % known == 0, "mesh", f"{num_devices} devices do not divide by the fixed axes {sizes}")
        sizes[sizes.index(-1)] = num_devices // known
    _check(math.prod(sizes) == num_devices, "mesh",
           f"data*expert*tensor={math.prod(sizes)} but {num_devices} devices are available")
    return tuple(sizes)


# ------------------------------------------------------------------ ml-collections round trip


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def config_dict(config: Optional[Config] = None):
    """A ConfigDict of every field (defaults, or `config`'s values); optional fields are typed
    FieldReferences so `--config.train.stop_at_step=5` works when the default is None."""
    import ml_collections

    def convert(obj):
        out = ml_collections.ConfigDict()
        hints = _hints(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                out[f.name] = convert(value)
                continue
            hint = hints[f.name]
            args = typing.get_args(hint)
            if type(None) in args:
                inner = next(a for a in args if a is not type(None))
                out[f.name] = ml_collections.FieldReference(value, field_type=inner)
            elif isinstance(value, tuple):
                out[f.name] = value
            else:
                out[f.name] = value
        return out

    out = convert(config or Config())
    out.lock()  # a preset or flag naming an unknown key is an error
    return out


def _from_mapping(cls, values: dict, prefix: str):
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"config field '{prefix}{name}': expected a section, got {value!r}")
            kwargs[name] = _from_mapping(hint, value, f"{prefix}{name}.")
            continue
        kwargs[name] = _coerce(hint, value, prefix + name)
    return cls(**kwargs)


def _coerce(hint, value, field: str):
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    origin = typing.get_origin(hint)
    if origin is tuple:
        if isinstance(value, str):
            value = (value,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config field '{field}': expected a list, got {value!r}")
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        if item is str:  # "a,b" (ml_collections hands --config.x=a,b over as the tuple ("a,b",))
            value = tuple(p for v in value for p in (v.split(",") if isinstance(v, str) else [v]) if p != "")
        return tuple(_coerce(item, v, field) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config field '{field}': expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"config field '{field}': expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config field '{field}': expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"config field '{field}': expected a string, got {value!r}")
        return value
    return value


def from_config_dict(cd, num_devices: Optional[int] = None) -> Config:
    """ConfigDict (or plain dict) -> validated Config."""
    values = dict(cd) if isinstance(cd, dict) else cd.to_dict()
    return validate(_from_mapping(Config, values, ""), num_devices)


def to_dict(config) -> dict:
    """A JSON-ready dict of a Config or ModelConfig (tuples become lists)."""
    return dataclasses.asdict(config)


def model_from_dict(values: dict) -> ModelConfig:
    return validate_model(_from_mapping(ModelConfig, values, "model."))


def replace(config, **changes):
    """dataclasses.replace that accepts dotted keys: replace(cfg, **{'moe.n_group': 4})."""
    nested: dict[str, dict] = {}
    flat = {}
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            flat[key] = value
    for head, sub in nested.items():
        flat[head] = replace(getattr(config, head), **sub)
    return dataclasses.replace(config, **flat)
