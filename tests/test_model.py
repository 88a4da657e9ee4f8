"""Model pieces that must agree with an independent reference: MTP vs numpy, MoE dispatch
backends vs the dense reference, router semantics, and the 671B parameter count."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import presets
from dsjax.config import ModelConfig, replace
from dsjax.model import Transformer
from dsjax.model import dispatch, router

F32_ATOL = 1e-5


def tiny_dense_mtp():
    return replace(ModelConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                               dtype="float32", initializer_range=0.3),
                   **{"moe.n_routed_experts": 0, "mtp.num_nextn_predict_layers": 1, "mla.q_lora_rank": None,
                      "mla.num_attention_heads": 2, "mla.kv_lora_rank": 8, "mla.qk_nope_head_dim": 4,
                      "mla.qk_rope_head_dim": 4, "mla.v_head_dim": 4})


def np_rms(x, w, eps):
    return w * x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)


def np_rope(x, pos, theta):  # interleaved pairs, x [..., T, (H,) R]
    r = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, r, 2) / r)
    ang = pos[:, None] * inv  # [T, R/2]
    if x.ndim == 3:
        ang = ang[:, None]
    c, s = np.cos(ang), np.sin(ang)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = x1 * c - x2 * s, x2 * c + x1 * s
    return out


def np_layer(p, x, c):
    """One dense decoder layer (MLA with direct q + SwiGLU) for one sequence x [T, D]."""
    m = c.mla
    t = x.shape[0]
    k, r = m.qk_nope_head_dim, m.qk_rope_head_dim
    a = p["attn"]
    hx = np_rms(x, p["attn_norm"]["scale"], c.rms_norm_eps)
    q = np.einsum("TD,DHX->THX", hx, a["q"]["kernel"])
    kv = hx @ a["kv_a"]["kernel"]
    ckv = np_rms(kv[:, :m.kv_lora_rank], a["kv_a_norm"]["scale"], c.rms_norm_eps)
    pos = np.arange(t, dtype=np.float64)
    q_rope = np_rope(q[..., k:], pos, c.rope.rope_theta)
    k_rope = np_rope(kv[:, m.kv_lora_rank:], pos, c.rope.rope_theta)
    kvb = np.einsum("TC,CHX->THX", ckv, a["kv_b"])
    scores = (np.einsum("THK,SHK->HTS", q[..., :k], kvb[..., :k]) + np.einsum("THR,SR->HTS", q_rope, k_rope))
    scores = scores / np.sqrt(k + r) + np.where(np.tril(np.ones((t, t))) > 0, 0, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    att = np.einsum("HTS,SHO->THO", probs, kvb[..., k:])
    x = x + np.einsum("THO,HOD->TD", att, a["o"]["kernel"])
    hx = np_rms(x, p["mlp_norm"]["scale"], c.rms_norm_eps)
    g, u = hx @ p["mlp"]["gate"]["kernel"], hx @ p["mlp"]["up"]["kernel"]
    return x + (g / (1 + np.exp(-g)) * u) @ p["mlp"]["down"]["kernel"]


def test_mtp_module_matches_numpy_reference():
    c = tiny_dense_mtp()
    tokens = np.random.RandomState(0).randint(0, c.vocab_size, (1, 9))
    variables = nn.unbox(Transformer(c).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32)))
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables["params"])
    out = Transformer(c).apply(variables, jnp.asarray(tokens), return_mtp=True, full_output=True)

    emb = p["embed"]["embedding"]
    main = np_layer(jax.tree_util.tree_map(lambda a: a[0], p["dense_stack"]["scan"]["layer"]), emb[tokens[0]], c)
    h = np_rms(main, p["final_norm"]["scale"], c.rms_norm_eps)  # MTP input: after the final norm
    np.testing.assert_allclose(out.logits[0], h @ p["head"]["kernel"], atol=F32_ATOL)
    q = p["mtp_0"]
    nxt = np.concatenate([tokens[0, 1:], [0]])  # t_{i+1}
    joined = np.concatenate([np_rms(emb[nxt], q["enorm"]["scale"], c.rms_norm_eps),
                             np_rms(h, q["hnorm"]["scale"], c.rms_norm_eps)], -1)
    mtp_h = np_layer(q["layer"], joined @ q["eh_proj"]["kernel"], c)
    want = np_rms(mtp_h, q["norm"]["scale"], c.rms_norm_eps) @ p["head"]["kernel"]
    np.testing.assert_allclose(out.mtp_logits[0][0], want, atol=F32_ATOL)


def _experts(seed, n=40, d=8, f=12, e=6, k=2, skew=False):
    r = np.random.RandomState(seed)
    x = r.randn(n, d).astype(np.float32)
    ids = np.stack([r.choice(e, k, replace=False) for _ in range(n)]).astype(np.int32)
    if skew:  # expert 0 takes almost everything, expert e-1 nothing
        ids[:, 0] = 0
        ids[:, 1] = np.where(ids[:, 1] == 0, 1, ids[:, 1])
        ids[ids == e - 1] = 1
    w = r.rand(n, k).astype(np.float32)
    ws = [r.randn(e, d, f).astype(np.float32) * 0.3, r.randn(e, d, f).astype(np.float32) * 0.3,
          r.randn(e, f, d).astype(np.float32) * 0.3]
    return x, ids, w, ws


@pytest.mark.parametrize("skew", [False, True])
def test_dispatch_backends_agree_with_dense_reference(skew):
    x, ids, w, ws = _experts(0, skew=skew)
    want, _ = dispatch.dense(x, ids, w, *ws)
    got, dropped = dispatch.dropless(x, ids, w, *ws)
    np.testing.assert_allclose(got, want, atol=F32_ATOL)
    assert int(dropped) == 0
    got, dropped = dispatch.capacity(x, ids, w, *ws, capacity_factor=float(ws[0].shape[0]))
    np.testing.assert_allclose(got, want, atol=F32_ATOL)
    assert int(dropped) == 0
    probe = np.random.RandomState(1).randn(*want.shape).astype(np.float32)  # a non-uniform cotangent
    grads = {name: jax.grad(lambda a, g, ws: (fn(a, ids, g, *ws)[0] * probe).sum(), argnums=(0, 1, 2))(x, w, ws)
             for name, fn in (("dense", dispatch.dense), ("dropless", dispatch.dropless))}
    for g_got, g_want in zip(jax.tree_util.tree_leaves(grads["dropless"]), jax.tree_util.tree_leaves(grads["dense"])):
        np.testing.assert_allclose(g_got, g_want, atol=F32_ATOL)


def test_capacity_drops_exactly_the_overflow():
    # 4 tokens, k=1, 2 experts, capacity ceil(0.5 * 4 / 2) = 1: expert 0 gets tokens 0, 1, 3.
    x = np.arange(8, dtype=np.float32).reshape(4, 2) + 1
    ids = np.array([[0], [0], [1], [0]], np.int32)
    w = np.ones((4, 1), np.float32)
    ws = [np.ones((2, 2, 3), np.float32), np.ones((2, 2, 3), np.float32), np.ones((2, 3, 2), np.float32)]
    y, dropped = dispatch.capacity(x, ids, w, *ws, capacity_factor=0.5)
    y = np.asarray(y)
    want = np.asarray(dispatch.dense(x, ids, w, *ws)[0])
    assert int(dropped) == 2
    np.testing.assert_allclose(y[[0, 2]], want[[0, 2]], atol=F32_ATOL)  # first of each expert kept
    np.testing.assert_array_equal(y[[1, 3]], 0.0)  # later tokens of expert 0 dropped


def test_router_bias_selects_but_never_weights():
    c = ModelConfig()
    c = replace(c, **{"moe.n_routed_experts": 4, "moe.n_group": 1, "moe.topk_group": 1,
                      "moe.num_experts_per_tok": 1, "moe.norm_topk_prob": False, "moe.routed_scaling_factor": 2.0})
    scores = jnp.array([[0.9, 0.8, 0.1, 0.2]])
    bias = jnp.array([0.0, 0.5, 0.0, 0.0])
    ids = router.select(scores, bias, c)
    assert ids.tolist() == [[1]]  # bias moved the choice
    np.testing.assert_allclose(router.gate_weights(scores, ids, c), [[1.6]])  # unbiased 0.8 × 2


def test_group_limited_routing_masks_dropped_groups():
    c = replace(ModelConfig(), **{"moe.n_routed_experts": 8, "moe.n_group": 4, "moe.topk_group": 1,
                                  "moe.num_experts_per_tok": 2})
    # group 1 (experts 2,3) has the best top-2 sum although expert 6 has the single best score
    scores = jnp.array([[0.1, 0.1, 0.7, 0.7, 0.1, 0.1, 0.9, 0.0]])
    assert sorted(router.select(scores, jnp.zeros(8), c)[0].tolist()) == [2, 3]


def test_deepseek_v3_parameter_count():
    from dsjax.train import flops

    c = presets.load("deepseek_v3").model
    shapes = nn.unbox(jax.eval_shape(Transformer(c).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    total = sum(x.size for x in jax.tree_util.tree_leaves(shapes["params"]))
    mtp = sum(x.size for x in jax.tree_util.tree_leaves(shapes["params"]["mtp_0"]))
    active = flops.active_params(c, with_mtp=False) + c.vocab_size * c.hidden_size  # + embedding row
    print(f"DeepSeek-V3: {(total - mtp) / 1e9:.1f}B without MTP, {total / 1e9:.1f}B with MTP, "
          f"{active / 1e9:.1f}B activated per token")
    assert round((total - mtp) / 1e9, 1) == 671.0
    assert round(total / 1e9, 1) == 682.6
    assert 36e9 <= active <= 38e9


@pytest.mark.parametrize("remat,expected", [("none", 9), ("minimal", 9), ("dots", 9), ("full", 12)])
def test_remat_saves_the_expert_gemms(remat, expected):
    """Gradient of one MoE layer: forward 3 + backward 6 grouped GEMMs; "minimal"/"dots" keep the
    expert GEMM outputs (named in dispatch.ffn_grouped), "full" re-runs the forward's 3."""
    config = replace(presets.load("tiny").model, remat=remat, num_hidden_layers=1,
                     **{"moe.first_k_dense_replace": 0, "moe.dispatch": "dropless", "mtp.num_nextn_predict_layers": 0})
    tokens = jnp.zeros((2, 16), jnp.int32)
    variables = jax.eval_shape(lambda: nn.unbox(Transformer(config).init(jax.random.PRNGKey(0), tokens)))
    loss = lambda p: Transformer(config).apply({**variables, "params": p}, tokens).sum()  # noqa: E731
    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(variables["params"]))
    assert jaxpr.count("ragged_dot_general") == expected


def _fp8_passes_run(monkeypatch, remat: str, grad: bool = True) -> tuple[int, int, int]:
    """(FP8 GEMMs, quantizations of x or dy, quantizations of w) executed by one gradient (or, with
    grad=False, one forward) of a 2-layer model: every dense and expert GEMM, all three passes."""
    from dsjax.fp8 import dot as fp8_dot, grouped as fp8_grouped

    monkeypatch.undo()  # count through the real functions, not an earlier call's wrappers
    runs = {"gemm": 0, "x": 0, "w": 0}

    def counted(fn, kind):
        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)

            def tick(*v):  # one callback through all outputs: it runs if any of them is used
                runs[kind] += 1
                return v
            flat = out if isinstance(out, tuple) else (out,)
            flat = jax.pure_callback(tick, tuple(jax.ShapeDtypeStruct(v.shape, v.dtype) for v in flat), *flat)
            return tuple(flat) if isinstance(out, tuple) else flat[0]
        return wrapper

    for module, name, kind in ((fp8_dot, "_block_matmul", "gemm"), (fp8_grouped, "_m_grouped", "gemm"),
                               (fp8_grouped, "_k_grouped", "gemm"), (fp8_dot, "_quantize_both", "x"),
                               (fp8_grouped, "quantize_activation", "x"), (fp8_dot, "weight_blocks", "w"),
                               (fp8_grouped, "weight_blocks", "w")):
        monkeypatch.setattr(module, name, counted(getattr(module, name), kind))
    config = replace(presets.load("tiny").model, remat=remat, num_hidden_layers=2, fp8="block",
                     **{"moe.first_k_dense_replace": 1, "moe.dispatch": "dropless", "mtp.num_nextn_predict_layers": 0})
    tokens = jnp.zeros((2, 128), jnp.int32)
    variables = nn.unbox(Transformer(config).init(jax.random.PRNGKey(0), tokens))
    loss = lambda p: Transformer(config).apply({**variables, "params": p}, tokens)[0].astype(jnp.float32).sum()  # noqa: E731
    jax.block_until_ready(jax.jit(jax.grad(loss) if grad else loss)(variables["params"]))
    return runs["gemm"], runs["x"], runs["w"]


def test_remat_saves_the_fp8_gemms_and_operands(monkeypatch):
    """With FP8 on, "minimal" keeps the forward GEMMs' outputs and their quantized operands
    (dsjax.remat_names): it runs exactly the GEMMs and quantizations "none" runs, and a gradient
    quantizes each weight once, as the forward alone does (the backward reuses the forward's
    blocks); "full" re-runs the forward GEMMs and the forward's activation quantizations."""
    (none, none_x, none_w), minimal, (full, full_x, full_w) = (
        _fp8_passes_run(monkeypatch, remat) for remat in ("none", "minimal", "full"))
    forward_w = _fp8_passes_run(monkeypatch, "none", grad=False)[2]
    print(f"FP8 GEMMs / x quantizations / w quantizations per gradient: none {none}/{none_x}/{none_w}, "
          f"minimal {minimal}, full {full}/{full_x}/{full_w}; forward alone quantizes {forward_w} weights")
    assert minimal == (none, none_x, none_w)
    assert none_w == forward_w
    assert full > none and full_x > none_x


def test_cudnn_packed_runs_from_segment_ids():
    """The packed layout cuDNN attention gets: each row's runs of equal segment ids (padding is a
    run), lengths and starts in order, -1 after the last; rows with too many runs are flagged."""
    from dsjax.model.cudnn_attention import runs

    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0],
                     [1, 1, 1, 1, 1, 1, 1, 1],
                     [1, 2, 3, 4, 5, 0, 0, 0]], jnp.int32)
    lengths, offsets, fits = runs(seg, max_runs=4)
    np.testing.assert_array_equal(lengths[:2], [[3, 2, 1, 2], [8, -1, -1, -1]])
    np.testing.assert_array_equal(offsets[:2], [[0, 3, 5, 6, -1], [0, -1, -1, -1, -1]])
    assert not bool(fits)  # row 2 has 6 runs
    lengths, offsets, fits = runs(seg, max_runs=6)
    np.testing.assert_array_equal(lengths[2], [1, 1, 1, 1, 1, 3])
    np.testing.assert_array_equal(offsets[2], [0, 1, 2, 3, 4, 5, -1])
    assert bool(fits)


def test_fp8_block_runs_the_expert_gemms_in_fp8():
    """fp8 'block' reaches the routed experts: their three grouped GEMMs take E4M3 operands (the
    output is within FP8 error of, and not equal to, the compute-dtype experts': one E4M3 GEMM with
    this tiling is ~3.7% relative on random normal data, three chained independently ~sqrt(3) x that)."""
    config = replace(presets.load("tiny").model, fp8="block")
    n, d, f, e, k = 64, 128, 256, 4, 2
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (n, d))
    ids = jax.random.randint(keys[1], (n, k), 0, e)
    weights = jax.nn.softmax(jax.random.normal(keys[2], (n, k)), -1)
    w_gate, w_up = (jax.random.normal(kk, (e, d, f)) * 0.1 for kk in jax.random.split(keys[3]))
    w_down = jax.random.normal(keys[4], (e, f, d)) * 0.1
    args = (x, ids, weights, w_gate, w_up, w_down)
    exact, _ = dispatch.dropless(*args)
    fp8_fn = lambda *a: dispatch.dropless(*a, fp8=dispatch.fp8_backend(config))[0]  # noqa: E731
    got = fp8_fn(*args)
    assert "f8_e4m3fn" in str(jax.make_jaxpr(fp8_fn)(*args))
    err = float(jnp.linalg.norm(got - exact) / jnp.linalg.norm(exact))
    assert 1e-4 < err < 0.1, err


def test_cudnn_attention_runs_per_device_on_a_mesh(monkeypatch):
    """On a (2, 2, 2) mesh the attention core gets one device's rows and heads (so cuDNN's packed
    offsets are local); the result equals the one-device call. The core is swapped for the XLA
    math here (cuDNN needs a GPU); the wrapper's specs are what is tested."""
    from dsjax import sharding as shd
    from dsjax.config import MeshConfig
    from dsjax.model import cudnn_attention
    from dsjax.model.mla import attention_mask

    seen = []

    def core(q_nope, q_rope, k_nope, k_rope, v, seg, *, scale):
        seen.append((q_nope.shape, k_rope.shape, seg.shape))
        pos = jnp.broadcast_to(jnp.arange(seg.shape[1]), seg.shape)
        s = (jnp.einsum("BTHK,BSHK->BHTS", q_nope, k_nope) + jnp.einsum("BTHR,BSR->BHTS", q_rope, k_rope)) * scale
        p = jax.nn.softmax(jnp.where(attention_mask(pos, seg)[:, None], s, -1e30), axis=-1)
        return jnp.einsum("BHTS,BSHO->BTHO", p, v)

    monkeypatch.setattr(cudnn_attention, "_attend", core)
    b, t, h = 8, 16, 4
    keys = jax.random.split(jax.random.key(0), 5)
    args = (jax.random.normal(keys[0], (b, t, h, 8)), jax.random.normal(keys[1], (b, t, h, 4)),
            jax.random.normal(keys[2], (b, t, h, 8)), jax.random.normal(keys[3], (b, t, 4)),
            jax.random.normal(keys[4], (b, t, h, 6)), jnp.where(jnp.arange(t) < 10, 1, 2)[None].repeat(b, 0))
    expected = cudnn_attention.attention(*args, 0.3)
    mesh = shd.make_mesh(MeshConfig(2, 2, 2))
    with jax.set_mesh(mesh):
        got = jax.jit(lambda *a: cudnn_attention.attention(*a, 0.3))(*args)
    assert seen[-1] == ((2, t, 2, 8), (2, t, 4), (2, t))  # 8 rows / (data 2 x expert 2), 4 heads / tensor 2
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)


def test_fp8_gate_and_up_as_one_gemm_equal_two():
    """With F a multiple of 128 the FP8 experts run gate and up as one [E, D, 2F] GEMM; outputs and
    every gradient equal two separate FP8 GEMMs (same blocks and tiles) to float32 rounding."""
    n, d, f, e = 96, 128, 128, 3
    keys = jax.random.split(jax.random.key(1), 5)
    x = jax.random.normal(keys[0], (n, d))
    sizes = jnp.array([40, 0, 56], jnp.int32)
    w_gate, w_up = jax.random.normal(keys[1], (e, d, f)) * 0.1, jax.random.normal(keys[2], (e, d, f)) * 0.1
    w_down = jax.random.normal(keys[3], (e, f, d)) * 0.1
    ct = jax.random.normal(keys[4], (n, d))

    def separate(x, wg, wu, wd):
        from dsjax.fp8 import gmm_block
        h = jax.nn.silu(gmm_block(x, wg, sizes)) * gmm_block(x, wu, sizes)
        return (gmm_block(h, wd, sizes) * ct).sum()

    fused = lambda *a: (dispatch.ffn_grouped(a[0], sizes, *a[1:], fp8="xla_cpu") * ct).sum()  # noqa: E731
    args = (x, w_gate, w_up, w_down)
    (v1, g1), (v2, g2) = (jax.value_and_grad(fn, argnums=(0, 1, 2, 3))(*args) for fn in (separate, fused))
    np.testing.assert_allclose(v2, v1, rtol=1e-5)
    for a, b in zip(g2, g1):
        assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < 1e-5
