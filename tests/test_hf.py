"""HF checkpoints: logit parity with transformers, save/load round trips, FP8, bad input."""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_reference as ref
from dsjax import hf
from dsjax.model import Transformer

PARITY_ATOL = 1e-4  # max |Δlogits|, float32, batch 2 × 33
FP8_ROUNDTRIP_RTOL = 0.07  # E4M3 keeps 3 mantissa bits: per-element error <= 2^-4 of the block amax
TOKENS = np.random.RandomState(0).randint(0, 96, (2, 33))

CASES = {
    "v3": dict(),
    "v3_no_q_lora": dict(q_lora_rank=None),
    "v3_yarn": dict(yarn=True),
    "v3_no_norm_topk": dict(norm_topk_prob=False, n_group=2, topk_group=1),
    "v3_split_half_rope": dict(rope_interleave=False),
    "v2_group_limited": dict(model_type="deepseek_v2", topk_method="group_limited_greedy"),
    "v2_greedy_yarn": dict(model_type="deepseek_v2", topk_method="greedy", n_group=1, topk_group=1, yarn=True,
                           q_lora_rank=None),
}


def dsjax_logits(path, tokens=TOKENS):
    config, variables = hf.load_pretrained(str(path))
    return np.asarray(Transformer(config).apply(variables, jnp.asarray(tokens, jnp.int32))), config, variables


@pytest.mark.parametrize("case", sorted(CASES))
def test_logit_parity_with_transformers(case, tmp_path):
    model = ref.build(**CASES[case], seed=len(case))
    model.save_pretrained(tmp_path)
    got, _, _ = dsjax_logits(tmp_path)
    want = ref.logits(model, TOKENS)
    err = np.abs(got - want).max()
    print(f"{case}: max |Δlogits| = {err:.2e}")
    assert err <= PARITY_ATOL


def test_save_pretrained_loads_in_transformers(tmp_path):
    from transformers import DeepseekV3ForCausalLM

    model = ref.build(seed=3, mtp=1)
    model.save_pretrained(tmp_path / "hf")
    with pytest.warns(UserWarning, match="MTP"):
        logits, config, variables = dsjax_logits(tmp_path / "hf")
    hf.save_pretrained(str(tmp_path / "ours"), config, variables)
    reloaded = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ours", torch_dtype="float32").eval()
    reloaded.config._attn_implementation = "eager"
    assert np.abs(ref.logits(reloaded, TOKENS) - logits).max() <= PARITY_ATOL
    again, _, _ = dsjax_logits(tmp_path / "ours")
    np.testing.assert_array_equal(again, logits)


def test_fp8_save_round_trip(tmp_path):
    model = ref.build(seed=4)
    model.save_pretrained(tmp_path / "hf")
    logits, config, variables = dsjax_logits(tmp_path / "hf")
    hf.save_pretrained(str(tmp_path / "fp8"), config, variables, fp8=True)
    files = json.load(open(tmp_path / "fp8" / "config.json"))
    assert files["quantization_config"]["weight_block_size"] == [128, 128]
    config2, variables2 = hf.load_pretrained(str(tmp_path / "fp8"))
    flat1 = jax.tree_util.tree_leaves_with_path(variables)
    flat2 = dict(jax.tree_util.tree_leaves_with_path(variables2))
    quantized = 0
    for path, a in flat1:
        a, b = np.asarray(a), np.asarray(flat2[path])
        name = jax.tree_util.keystr(path)
        if "norm" in name or "router" in name or "embed" in name or "head" in name:
            np.testing.assert_array_equal(a, b, err_msg=name)  # islands stay exact
            continue
        quantized += 1
        err = np.abs(a - b).max() / np.abs(a).max()
        assert 0 < err <= FP8_ROUNDTRIP_RTOL, (name, err)
    assert quantized > 10


def test_mtp_layer_loads_from_official_layout(tmp_path):
    """An MTP layer at index num_hidden_layers (with embed/head copies) loads and round-trips."""
    model = ref.build(seed=5)
    model.save_pretrained(tmp_path / "hf")
    _, config, variables = dsjax_logits(tmp_path / "hf")
    from dsjax.config import replace
    config_mtp = replace(config, **{"mtp.num_nextn_predict_layers": 1})
    fresh = Transformer(config_mtp).init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))
    from flax import linen as nn
    fresh = nn.unbox(fresh)
    fresh["params"].update({k: v for k, v in variables["params"].items()})
    fresh["router"].update({k: v for k, v in variables["router"].items()})
    hf.save_pretrained(str(tmp_path / "mtp"), config_mtp, fresh)
    names = json.load(open(tmp_path / "mtp" / "config.json"))
    assert names["num_nextn_predict_layers"] == 1
    config2, loaded = hf.load_pretrained(str(tmp_path / "mtp"))
    assert config2.mtp.num_nextn_predict_layers == 1
    for (p, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(fresh), jax.tree_util.tree_leaves_with_path(loaded)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(p))


# ---------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("saved")
    ref.build(seed=6).save_pretrained(path)
    return path


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_truncated_file_names_the_file(saved, tmp_path):
    d = _copy(saved, tmp_path / "t")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(hf.CheckpointError, match="model.safetensors.*truncated"):
        hf.load_pretrained(str(d))


def test_corrupt_header_names_the_file(saved, tmp_path):
    d = _copy(saved, tmp_path / "c")
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[10:20] = b"\xff" * 10
    f.write_bytes(bytes(data))
    with pytest.raises(hf.CheckpointError, match="model.safetensors"):
        hf.load_pretrained(str(d))


def _rewrite(d, edit):
    from dsjax.safetensors_file import SafetensorsFile, write
    f = SafetensorsFile(str(d / "model.safetensors"))
    tensors = {k: np.array(f.get(k)) for k in f.keys()}
    del f
    edit(tensors)
    write(str(d / "model.safetensors"), list(tensors.items()))


def test_missing_tensor_is_named(saved, tmp_path):
    d = _copy(saved, tmp_path / "m")
    _rewrite(d, lambda t: t.pop("model.layers.1.self_attn.kv_b_proj.weight"))
    with pytest.raises(hf.CheckpointError, match="model.layers.1.self_attn.kv_b_proj.weight"):
        hf.load_pretrained(str(d))


def test_wrong_shape_is_named(saved, tmp_path):
    d = _copy(saved, tmp_path / "s")
    _rewrite(d, lambda t: t.__setitem__("model.norm.weight", np.ones((31,), np.float32)))
    with pytest.raises(hf.CheckpointError, match=r"model.norm.weight.*\(31,\)"):
        hf.load_pretrained(str(d))


def test_wrong_dtype_is_named(saved, tmp_path):
    d = _copy(saved, tmp_path / "d")
    _rewrite(d, lambda t: t.__setitem__("model.norm.weight", np.ones((32,), np.int32)))
    with pytest.raises(hf.CheckpointError, match="model.norm.weight.*int32"):
        hf.load_pretrained(str(d))


def test_unexpected_tensor_is_named(saved, tmp_path):
    d = _copy(saved, tmp_path / "u")
    _rewrite(d, lambda t: t.__setitem__("model.layers.0.mystery.weight", np.ones((2,), np.float32)))
    with pytest.raises(hf.CheckpointError, match="model.layers.0.mystery.weight"):
        hf.load_pretrained(str(d))


def test_bad_config_values_are_named(saved, tmp_path):
    d = _copy(saved, tmp_path / "b")
    cfg = json.load(open(d / "config.json"))
    cfg["topk_group"] = 9
    json.dump(cfg, open(d / "config.json", "w"))
    with pytest.raises(hf.CheckpointError, match="topk_group"):
        hf.load_config(str(d))
    cfg["topk_group"] = 2
    cfg["model_type"] = "llama"
    json.dump(cfg, open(d / "config.json", "w"))
    with pytest.raises(hf.CheckpointError, match="model_type"):
        hf.load_config(str(d))


def test_v2_norm_topk_prob_is_rejected():
    with pytest.raises(hf.CheckpointError, match="norm_topk_prob"):
        hf.config_from_hf({"model_type": "deepseek_v2", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
                           "num_hidden_layers": 2, "num_attention_heads": 2, "kv_lora_rank": 4,
                           "qk_nope_head_dim": 4, "qk_rope_head_dim": 2, "v_head_dim": 4, "n_routed_experts": 4,
                           "num_experts_per_tok": 2, "moe_intermediate_size": 4, "norm_topk_prob": True,
                           "topk_method": "greedy"})


def test_hub_and_transformers5_config_formats_agree(saved):
    v5 = json.load(open(saved / "config.json"))
    hub = {k: v for k, v in v5.items() if k not in ("rope_parameters", "head_dim")}
    hub.update(rope_theta=10000.0, rope_scaling=None, scoring_func="sigmoid", topk_method="noaux_tc")
    assert hf.config_from_hf(hub) == hf.config_from_hf(v5)
    v5["some_new_key"] = 1
    with pytest.warns(UserWarning, match="some_new_key"):
        hf.config_from_hf(v5)


def test_sharded_load_matches_single_device(saved):
    from dsjax import sharding as shd
    from dsjax.config import MeshConfig
    mesh = shd.make_mesh(MeshConfig(data=2, expert=2, tensor=2))
    config, variables = hf.load_pretrained(str(saved), mesh=mesh)
    experts = variables["params"]["moe_stack"]["scan"]["layer"]["moe"]["gate"]
    assert experts.sharding.spec[1] == "expert"
    _, single = hf.load_pretrained(str(saved))
    for a, b in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(single)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@functools.lru_cache(maxsize=None)
def _convert_module():
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "convert_hf.py")
    spec = importlib.util.spec_from_file_location("convert_hf", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_convert_hf_round_trip(saved, tmp_path):
    convert = _convert_module()
    convert.hf_to_dsjax(str(saved), str(tmp_path / "run"), "float32")
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "0")
    convert.dsjax_to_hf(str(tmp_path / "run"), str(tmp_path / "back"), fp8=False, step=None, dtype="float32")
    before, _, _ = dsjax_logits(saved)
    after, _, _ = dsjax_logits(tmp_path / "back")
    np.testing.assert_array_equal(after, before)


def test_convert_hf_names_a_truncated_file(saved, tmp_path):
    d = _copy(saved, tmp_path / "t")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-64])
    with pytest.raises(hf.CheckpointError, match=str(f)):
        _convert_module().hf_to_dsjax(str(d), str(tmp_path / "run"), "float32")
