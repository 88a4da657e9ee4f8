"""Hugging Face checkpoints in and out: config.json and safetensors in the official DeepSeek layout.

Reads both config.json formats: the hub's (deepseek-ai/DeepSeek-V3, V2, V2-Lite, R1: rope_scaling,
top-level rope_theta, scoring_func, topk_method) and the one transformers >= 5 writes
(rope_parameters; no scoring_func/topk_method for V3, so the router kind comes from model_type;
head_dim there is derived and ignored). Unknown HF keys are warnings.

Weights: per-expert tensors (`model.layers.{i}.mlp.experts.{e}.gate_proj.weight`), the MTP layer
at index num_hidden_layers (enorm, hnorm, eh_proj, shared_head.norm and a full decoder layer;
copies of embed_tokens / shared_head.head may be present), FP8 E4M3 weights with
`weight_scale_inv` in 128×128 blocks (partial at the edges) dequantized on load. Every dsjax leaf
is assembled with `jax.make_array_from_callback` straight into its target sharding, each device
reading only its own layers and experts, so the host never holds the whole model.

`save_pretrained` writes the same layout (optionally FP8 + weight_scale_inv for the projection
and expert weights; embeddings, head, norms, router, eh_proj and shared_head stay in the master
dtype, as in the official files), which transformers' DeepseekV3ForCausalLM loads.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import linen as nn

from dsjax import sharding as shd
from dsjax.config import MLAConfig, MoEConfig, ModelConfig, MTPConfig, RopeConfig, validate_model
from dsjax.model.transformer import Transformer
from dsjax.safetensors_file import SafetensorsError, SafetensorsFile, write

FP8_BLOCK = (128, 128)


class CheckpointError(ValueError):
    """An HF checkpoint dsjax cannot load; the message names the key, tensor or file."""


# ------------------------------------------------------------------------------------ config

_KNOWN_KEYS = {
    "architectures", "auto_map", "model_type", "torch_dtype", "dtype", "transformers_version", "use_cache",
    "pretraining_tp", "attention_dropout", "attention_bias", "mlp_bias", "tie_word_embeddings", "hidden_act",
    "num_key_value_heads", "head_dim", "qk_head_dim", "aux_loss_alpha", "seq_aux", "output_router_logits",
    "router_aux_loss_coef", "ep_size", "moe_layer_freq", "quantization_config", "pad_token_id", "bos_token_id",
    "eos_token_id", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "max_position_embeddings",
    "rms_norm_eps", "initializer_range", "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
    "qk_rope_head_dim", "v_head_dim", "first_k_dense_replace", "moe_intermediate_size", "n_routed_experts",
    "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group", "topk_method", "scoring_func",
    "norm_topk_prob", "routed_scaling_factor", "num_nextn_predict_layers", "rope_theta", "rope_scaling",
    "rope_parameters", "rope_interleave", "num_experts", "num_local_experts",
}


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: not found") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """ModelConfig from a parsed HF config.json (hub or transformers >= 5 format)."""
    model_type = hf.get("model_type")
    if model_type not in ("deepseek_v3", "deepseek_v2"):
        raise CheckpointError(f"{source}: model_type {model_type!r} is not deepseek_v3 or deepseek_v2")
    for key in sorted(set(hf) - _KNOWN_KEYS):
        warnings.warn(f"{source}: ignoring unknown key {key!r}")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (silu only)")
    if hf.get("moe_layer_freq", 1) != 1:
        raise CheckpointError(f"{source}: moe_layer_freq {hf['moe_layer_freq']} is not supported (1 only)")
    heads = hf["num_attention_heads"]
    if hf.get("num_key_value_heads") not in (None, heads):
        raise CheckpointError(f"{source}: num_key_value_heads must equal num_attention_heads for MLA")

    def need(key):
        if key not in hf:
            raise CheckpointError(f"{source}: missing required key {key!r}")
        return hf[key]

    rope_params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    if not scaling and rope_params.get("rope_type", "default") != "default":
        scaling = rope_params
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind not in ("default", "yarn"):
        raise CheckpointError(f"{source}: rope scaling type {kind!r} is not supported (yarn only)")
    theta = hf.get("rope_theta", rope_params.get("rope_theta", 10000.0))
    rope = RopeConfig(rope_theta=float(theta), interleave=bool(hf.get("rope_interleave", True)))
    if kind == "yarn":
        rope = dataclasses.replace(
            rope, scaling="yarn", factor=float(scaling["factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
            beta_fast=float(scaling.get("beta_fast") or 32), beta_slow=float(scaling.get("beta_slow") or 1),
            mscale=float(scaling.get("mscale") or 0.0), mscale_all_dim=float(scaling.get("mscale_all_dim") or 0.0))

    v3 = model_type == "deepseek_v3"
    n_routed = hf.get("n_routed_experts") or 0
    topk_method = hf.get("topk_method") or ("noaux_tc" if v3 else "greedy")
    scoring = hf.get("scoring_func") or ("sigmoid" if topk_method == "noaux_tc" else "softmax")
    n_group = hf.get("n_group") or 1
    moe = MoEConfig(
        first_k_dense_replace=int(hf.get("first_k_dense_replace", 0)),
        moe_intermediate_size=int(hf.get("moe_intermediate_size") or 1),
        n_routed_experts=int(n_routed), n_shared_experts=int(hf.get("n_shared_experts") or 0),
        num_experts_per_tok=int(hf.get("num_experts_per_tok") or 1), n_group=int(n_group),
        topk_group=int(hf.get("topk_group") or n_group), topk_method=topk_method, scoring_func=scoring,
        norm_topk_prob=bool(hf.get("norm_topk_prob", v3)),
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)))
    eos = hf.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    config = ModelConfig(
        vocab_size=int(need("vocab_size")), hidden_size=int(need("hidden_size")),
        intermediate_size=int(need("intermediate_size")), num_hidden_layers=int(need("num_hidden_layers")),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), initializer_range=float(hf.get("initializer_range", 0.02)),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=eos,
        mla=MLAConfig(num_attention_heads=int(heads), q_lora_rank=hf.get("q_lora_rank"),
                      kv_lora_rank=int(need("kv_lora_rank")), qk_nope_head_dim=int(need("qk_nope_head_dim")),
                      qk_rope_head_dim=int(need("qk_rope_head_dim")), v_head_dim=int(need("v_head_dim"))),
        rope=rope, moe=moe, mtp=MTPConfig(int(hf.get("num_nextn_predict_layers") or 0)))
    try:
        return validate_model(config)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from e


def load_config(path: str) -> ModelConfig:
    """The ModelConfig of an HF directory's config.json."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    return config_from_hf(_read_json(file), file)


def config_to_hf(config: ModelConfig, dtype: str = "float32") -> dict:
    """config.json in the hub format of deepseek-ai/DeepSeek-V3 (V2 for softmax routers)."""
    v3 = config.moe.scoring_func == "sigmoid"
    m, moe, rope = config.mla, config.moe, config.rope
    out = {
        "architectures": ["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v3" if v3 else "deepseek_v2",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "moe_intermediate_size": moe.moe_intermediate_size,
        "num_hidden_layers": config.num_hidden_layers, "num_nextn_predict_layers": config.mtp.num_nextn_predict_layers,
        "num_attention_heads": m.num_attention_heads, "num_key_value_heads": m.num_attention_heads,
        "q_lora_rank": m.q_lora_rank, "kv_lora_rank": m.kv_lora_rank, "qk_nope_head_dim": m.qk_nope_head_dim,
        "qk_rope_head_dim": m.qk_rope_head_dim, "v_head_dim": m.v_head_dim,
        "n_routed_experts": moe.n_routed_experts, "n_shared_experts": moe.n_shared_experts,
        "num_experts_per_tok": moe.num_experts_per_tok, "n_group": moe.n_group, "topk_group": moe.topk_group,
        "topk_method": moe.topk_method, "scoring_func": moe.scoring_func, "norm_topk_prob": moe.norm_topk_prob,
        "routed_scaling_factor": moe.routed_scaling_factor, "first_k_dense_replace": moe.first_k_dense_replace,
        "moe_layer_freq": 1, "hidden_act": "silu", "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings, "initializer_range": config.initializer_range,
        "rope_theta": rope.rope_theta, "rope_interleave": rope.interleave, "rope_scaling": None,
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
        "tie_word_embeddings": False, "attention_bias": False, "torch_dtype": dtype,
    }
    if rope.scaling == "yarn":
        out["rope_scaling"] = {"type": "yarn", "factor": rope.factor, "beta_fast": rope.beta_fast,
                               "beta_slow": rope.beta_slow, "mscale": rope.mscale, "mscale_all_dim": rope.mscale_all_dim,
                               "original_max_position_embeddings": rope.original_max_position_embeddings}
    return out


# ------------------------------------------------------------------------------ name mapping

# dsjax path inside one decoder layer -> HF name inside `model.layers.{i}.`; "{e}" marks per-expert.
_LAYER_NAMES = {
    "attn_norm/scale": "input_layernorm.weight",
    "mlp_norm/scale": "post_attention_layernorm.weight",
    "attn/q/kernel": "self_attn.q_proj.weight",
    "attn/q_a/kernel": "self_attn.q_a_proj.weight",
    "attn/q_a_norm/scale": "self_attn.q_a_layernorm.weight",
    "attn/q_b/kernel": "self_attn.q_b_proj.weight",
    "attn/kv_a/kernel": "self_attn.kv_a_proj_with_mqa.weight",
    "attn/kv_a_norm/scale": "self_attn.kv_a_layernorm.weight",
    "attn/kv_b": "self_attn.kv_b_proj.weight",
    "attn/o/kernel": "self_attn.o_proj.weight",
    "mlp/gate/kernel": "mlp.gate_proj.weight",
    "mlp/up/kernel": "mlp.up_proj.weight",
    "mlp/down/kernel": "mlp.down_proj.weight",
    "moe/router/kernel": "mlp.gate.weight",
    "moe/router/bias": "mlp.gate.e_score_correction_bias",
    "moe/gate": "mlp.experts.{e}.gate_proj.weight",
    "moe/up": "mlp.experts.{e}.up_proj.weight",
    "moe/down": "mlp.experts.{e}.down_proj.weight",
    "moe/shared/gate/kernel": "mlp.shared_experts.gate_proj.weight",
    "moe/shared/up/kernel": "mlp.shared_experts.up_proj.weight",
    "moe/shared/down/kernel": "mlp.shared_experts.down_proj.weight",
}
_MTP_NAMES = {"enorm/scale": "enorm.weight", "hnorm/scale": "hnorm.weight", "eh_proj/kernel": "eh_proj.weight",
              "norm/scale": "shared_head.norm.weight"}
_TOP_NAMES = {"embed/embedding": "model.embed_tokens.weight", "final_norm/scale": "model.norm.weight",
              "head/kernel": "lm_head.weight"}
_IN_NDIM = {"attn/o/kernel": 2}  # kernels whose input spans two dsjax dims ([H, O, D])
# Kept in the master dtype when saving FP8, as in the official files.
_NEVER_FP8 = ("layernorm", "norm.weight", "mlp.gate.", "embed_tokens", "lm_head", "eh_proj", "shared_head")


@dataclasses.dataclass(frozen=True)
class LeafSpec:
    """How one dsjax leaf is laid out in HF tensors: `names` is an object array over the leaf's
    leading stacked dims (layers, experts) holding HF tensor names; `in_ndim` splits the per-tensor
    dsjax shape into input and output dims; 1-D leaves (norms, bias) are copied as is."""

    names: np.ndarray
    in_ndim: int = 1  # 0: stored as is (the embedding table [V, D])


def _collection_path(path) -> tuple[str, str]:
    keys = [p.key for p in path]
    return keys[0], "/".join(keys[1:])


def leaf_specs(config: ModelConfig) -> dict[str, LeafSpec]:
    """'collection/dsjax/path' -> LeafSpec for every variable of Transformer(config)."""
    specs: dict[str, LeafSpec] = {}
    ld, lm = config.num_dense_layers, config.num_moe_layers
    e = config.moe.n_routed_experts

    def add_layer(prefix: str, rel: str, layer_ids: list[int] | None):
        hf_rel = _LAYER_NAMES[rel]
        collection = "router" if rel == "moe/router/bias" else "params"
        per_layer = [f"model.layers.{i}.{hf_rel}" for i in (layer_ids if layer_ids is not None else [None])]
        if "{e}" in hf_rel:
            names = np.array([[n.replace("{e}", str(j)) for j in range(e)] for n in per_layer], dtype=object)
        else:
            names = np.array(per_layer, dtype=object)
        if layer_ids is None:
            names = names[0]
        specs[f"{collection}/{prefix}{rel}"] = LeafSpec(names, _IN_NDIM.get(rel, 1))

    shapes = jax.eval_shape(lambda: nn.unbox(Transformer(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))))
    present = set()
    for path, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        collection, rel = _collection_path(path)
        present.add(f"{collection}/{rel}")
    for key in sorted(present):
        collection, rel = key.split("/", 1)
        if rel in _TOP_NAMES:
            specs[key] = LeafSpec(np.array(_TOP_NAMES[rel], dtype=object), in_ndim=0 if rel.startswith("embed") else 1)
        elif rel.startswith(("dense_stack/scan/layer/", "moe_stack/scan/layer/")):
            stack, inner = rel.split("/scan/layer/")
            ids = list(range(ld)) if stack == "dense_stack" else list(range(ld, ld + lm))
            add_layer(stack + "/scan/layer/", inner, ids)
        elif rel.startswith("mtp_"):
            k = int(rel.split("/")[0][4:])
            idx = config.num_hidden_layers + k
            inner = rel.split("/", 1)[1]
            if inner.startswith("layer/"):
                hf_rel = _LAYER_NAMES[inner[len("layer/"):]]
                names = np.array([f"model.layers.{idx}.{hf_rel}".replace("{e}", str(j)) for j in range(e)]
                                 if "{e}" in hf_rel else f"model.layers.{idx}.{hf_rel}", dtype=object)
                specs[key] = LeafSpec(names, _IN_NDIM.get(inner[len("layer/"):], 1))
            else:
                specs[key] = LeafSpec(np.array(f"model.layers.{idx}.{_MTP_NAMES[inner]}", dtype=object))
        else:
            raise AssertionError(f"no HF name for dsjax variable {key}")
    return specs


def to_dsjax(w: np.ndarray, shape: tuple[int, ...], in_ndim: int) -> np.ndarray:
    """An HF tensor ([out, in] for matrices) as the dsjax per-tensor shape [*in, *out]."""
    if w.ndim == 1 or in_ndim == 0:
        return w.reshape(shape)
    return w.T.reshape(shape)


def to_hf(w: np.ndarray, in_ndim: int) -> np.ndarray:
    if w.ndim == 1 or in_ndim == 0:
        return w
    n_in = math.prod(w.shape[:in_ndim])
    return np.ascontiguousarray(w.reshape(n_in, -1).T)


# ----------------------------------------------------------------------------------- reading


class _Tensors:
    """Name -> tensor over the checkpoint's safetensors files, dequantizing FP8 on read."""

    def __init__(self, path: str):
        index = os.path.join(path, "model.safetensors.index.json")
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}
        if os.path.exists(index):
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no 'weight_map' object")
            for name, file in weight_map.items():
                full = os.path.join(path, file)
                if not os.path.exists(full):
                    raise CheckpointError(f"{index}: tensor '{name}' maps to missing file {full}")
                self.where[name] = full
        else:
            paths = sorted(glob.glob(os.path.join(path, "*.safetensors")))
            if not paths:
                raise CheckpointError(f"{path}: no *.safetensors files and no model.safetensors.index.json")
            for full in paths:
                for name in self._open(full).keys():
                    self.where[name] = full
        for full in set(self.where.values()):
            keys = set(self._open(full).keys())
            for name, f in self.where.items():
                if f == full and name not in keys:
                    raise CheckpointError(f"{full}: index lists tensor '{name}' but the file does not hold it")
        self.used: set[str] = set()

    def _open(self, full: str) -> SafetensorsFile:
        if full not in self.files:
            try:
                self.files[full] = SafetensorsFile(full)
            except SafetensorsError as e:
                raise CheckpointError(str(e)) from e
        return self.files[full]

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._open(self.where[name]).shape(name)

    def get(self, name: str) -> np.ndarray:
        """The tensor as float32, FP8 weights dequantized with their weight_scale_inv."""
        if name not in self.where:
            raise CheckpointError(f"missing tensor '{name}'")
        f = self._open(self.where[name])
        w = f.get(name)
        self.used.add(name)
        if w.dtype == np.dtype(ml_dtypes.float8_e4m3fn):
            scale_name = name.replace(".weight", ".weight_scale_inv")
            if scale_name not in self.where:
                raise CheckpointError(f"{f.path}: FP8 tensor '{name}' has no '{scale_name}'")
            scale = self._open(self.where[scale_name]).get(scale_name).astype(np.float32)
            self.used.add(scale_name)
            return dequantize_blocks_np(w, scale, FP8_BLOCK, name)
        if w.dtype.kind != "f" and w.dtype != np.dtype(ml_dtypes.bfloat16):
            raise CheckpointError(f"{f.path}: tensor '{name}' has dtype {w.dtype}, expected a float type")
        return w.astype(np.float32)


def dequantize_blocks_np(q: np.ndarray, scale: np.ndarray, block: tuple[int, int], name: str) -> np.ndarray:
    """q * scale per block (edge blocks partial), in numpy for host-side loading."""
    want = tuple(math.ceil(s / b) for s, b in zip(q.shape, block))
    if scale.shape != want:
        raise CheckpointError(f"tensor '{name}': weight_scale_inv has shape {scale.shape}, expected {want}")
    full = np.repeat(np.repeat(scale, block[0], axis=0), block[1], axis=1)[: q.shape[0], : q.shape[1]]
    return q.astype(np.float32) * full


def _assemble(tensors: _Tensors, spec: LeafSpec, shape, dtype, sharding):
    stacked = spec.names.ndim
    per_tensor = tuple(shape[stacked:])

    def read(name: str) -> np.ndarray:
        got = tensors.shape(name) if name in tensors else None
        if got is None:
            raise CheckpointError(f"missing tensor '{name}' (needed for a {tuple(shape)} dsjax variable)")
        want = per_tensor if len(per_tensor) <= 1 or spec.in_ndim == 0 else (math.prod(per_tensor[spec.in_ndim:]),
                                                         math.prod(per_tensor[:spec.in_ndim]))
        if tuple(got) != tuple(want):
            raise CheckpointError(f"tensor '{name}' has shape {tuple(got)}, expected {want}")
        return to_dsjax(tensors.get(name), per_tensor, spec.in_ndim)

    def callback(index):
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        lead = spec.names[index[:stacked]] if stacked else spec.names
        flat = np.asarray(lead, dtype=object).reshape(-1)
        parts = [read(n)[index[stacked:]] for n in flat]
        out = np.stack(parts).reshape(np.asarray(lead, dtype=object).shape + parts[0].shape)
        return out.astype(dtype)

    return jax.make_array_from_callback(tuple(shape), sharding, callback)


def load_pretrained(path: str, dtype=jnp.float32, *, mesh: Optional[jax.sharding.Mesh] = None, fsdp: bool = False,
                    config: Optional[ModelConfig] = None):
    """(config, variables) from an HF directory, each leaf placed in its target sharding.

    `dtype` sets both the parameter and the compute dtype (float32 by default); the router bias
    stays float32. With `mesh`, leaves are sharded by dsjax's parameter rules.
    """
    config = config or load_config(path)
    name = jnp.dtype(dtype).name
    config = dataclasses.replace(config, dtype=name, param_dtype=name)
    tensors = _Tensors(path)
    if config.mtp.num_nextn_predict_layers:
        first = f"model.layers.{config.num_hidden_layers}.eh_proj.weight"
        if first not in tensors:
            warnings.warn(f"{path}: config.json declares {config.mtp.num_nextn_predict_layers} MTP layer(s) but the "
                          "files hold none (as transformers' save_pretrained writes); loading without MTP")
            config = dataclasses.replace(config, mtp=MTPConfig(0))
    boxed = jax.eval_shape(Transformer(config).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    if mesh is not None:
        shardings = shd.logical_shardings(boxed, mesh, shd.param_rules(fsdp))
    else:
        device = jax.devices()[0]
        shardings = jax.tree_util.tree_map(lambda _: jax.sharding.SingleDeviceSharding(device), nn.unbox(boxed))
    specs = leaf_specs(config)
    flat_shapes, treedef = jax.tree_util.tree_flatten_with_path(nn.unbox(boxed))
    flat_shardings = jax.tree_util.tree_leaves(shardings)
    leaves = []
    for (path_keys, sds), sharding in zip(flat_shapes, flat_shardings):
        collection, rel = _collection_path(path_keys)
        spec = specs[f"{collection}/{rel}"]
        leaf_dtype = np.float32 if collection == "router" else jnp.dtype(dtype)
        optional_bias = collection == "router" and not _first(spec.names) in tensors
        if optional_bias:  # V2 routers and V3 files without the bias: start at zero
            leaves.append(jax.device_put(np.zeros(sds.shape, np.float32), sharding))
            continue
        leaves.append(_assemble(tensors, spec, sds.shape, leaf_dtype, sharding))
    variables = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(nn.unbox(boxed)), leaves)
    unused = sorted(n for n in tensors.where if n not in tensors.used and not _ignorable(n, config))
    if unused:
        shown = ", ".join(unused[:8]) + (f" and {len(unused) - 8} more" if len(unused) > 8 else "")
        raise CheckpointError(f"{path}: unexpected tensors not used by the model: {shown}")
    return config, variables


def _first(names: np.ndarray) -> str:
    return str(np.asarray(names, dtype=object).reshape(-1)[0])


def _ignorable(name: str, config: ModelConfig) -> bool:
    if name.endswith("rotary_emb.inv_freq"):
        return True
    mtp_prefixes = tuple(f"model.layers.{config.num_hidden_layers + k}." for k in range(8))
    if name.startswith(mtp_prefixes):
        # copies of the shared embedding/head, or a whole MTP layer when MTP is disabled
        return name.endswith(("embed_tokens.weight", "shared_head.head.weight")) or not config.mtp.num_nextn_predict_layers
    return False


# ------------------------------------------------------------------------------------ saving


def save_pretrained(path: str, config: ModelConfig, variables, fp8: bool = False,
                    max_shard_bytes: int = 4 * 1024 ** 3, dtype: Optional[str] = None) -> None:
    """Writes config.json and safetensors shards in the official layout (FP8 weights optional)."""
    from dsjax import fp8 as fp8_lib

    os.makedirs(path, exist_ok=True)
    variables = nn.unbox(variables)
    out_dtype = np.dtype(jnp.dtype(dtype or config.param_dtype))
    specs = leaf_specs(config)
    tensors: list[tuple[str, np.ndarray]] = []
    for path_keys, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        collection, rel = _collection_path(path_keys)
        spec = specs[f"{collection}/{rel}"]
        host = np.asarray(jax.device_get(leaf), dtype=np.float32)
        names = np.asarray(spec.names, dtype=object)
        flat = host.reshape((-1,) + host.shape[names.ndim:]) if names.ndim else host[None]
        for name, w in zip(names.reshape(-1), flat):
            w_hf = to_hf(w, spec.in_ndim)
            keep = np.float32 if collection == "router" else out_dtype
            if fp8 and w_hf.ndim == 2 and not any(t in name for t in _NEVER_FP8):
                q, scale = fp8_lib.quantize_blocks(jnp.asarray(w_hf), FP8_BLOCK)
                tensors.append((name, np.asarray(q)))
                tensors.append((name.replace(".weight", ".weight_scale_inv"), np.asarray(scale, np.float32)))
            else:
                tensors.append((name, w_hf.astype(keep)))
    for k in range(config.mtp.num_nextn_predict_layers):  # the official files carry these copies
        idx = config.num_hidden_layers + k
        table = np.asarray(jax.device_get(variables["params"]["embed"]["embedding"]), np.float32)
        head = np.asarray(jax.device_get(variables["params"]["head"]["kernel"]), np.float32)
        tensors.append((f"model.layers.{idx}.embed_tokens.weight", table.astype(out_dtype)))
        tensors.append((f"model.layers.{idx}.shared_head.head.weight", np.ascontiguousarray(head.T).astype(out_dtype)))

    shards, current, size = [], [], 0
    for item in tensors:
        nbytes = item[1].nbytes
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(item)
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write(os.path.join(path, file), shard, metadata={"format": "pt"})
        weight_map.update({name: file for name, _ in shard})
    if len(shards) > 1:
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": sum(a.nbytes for _, a in tensors)}, "weight_map": weight_map}, f,
                      indent=2)
    hf = config_to_hf(config, "bfloat16" if out_dtype == np.dtype(ml_dtypes.bfloat16) else str(out_dtype))
    if fp8:
        hf["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": list(FP8_BLOCK)}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
