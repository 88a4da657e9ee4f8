"""FP8 (DeepSeek-V3 §3.3): quantize_blocks vs a numpy transcription of DeepSeek's act_quant and
128x128 weight scaling; the fp8 dot (and both gradients) vs dequantize-then-multiply from the same
quantized operands (in float64), and within FP8 error of the unquantized product."""

import functools
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dsjax import fp8

SAME_OPERANDS_RTOL = 1e-5  # xla_cpu fp8 dot vs dequantize-then-f64 of the same q: f32 sums only
# (H200 FP8 tensor cores, backend xla_gpu, measured 0.5-1.3e-4: see dsjax/fp8/dot.py)
FP8_REL_ERR = 5e-2  # relative Frobenius error vs unquantized f32 on N(0, 1) data (~3.7% expected)
E4M3_HALF_ULP = 2.0**-4  # round-to-nearest: |x - x_hat| <= 2^-4 |x| for normal E4M3 values
E4M3_HALF_SUBNORMAL = 2.0**-10  # ... and <= 2^-10 * scale below E4M3's smallest normal, 2^-6
SCALE_MAX_ULP = 1  # XLA computes amax * fl(1/448): at most one float32 ulp off amax / 448
NEAR_MIDPOINT = 2.0**-21  # q may differ only where x / scale is this close (relative) to a tie
E4M3 = ml_dtypes.float8_e4m3fn


def _np_quantize(x: np.ndarray, block: tuple[int, int], pow2: bool = False):
    """DeepSeek's act_quant (block (1, 128)) / 128x128 weight scaling, one block per program id,
    with dsjax's rules: partial edge blocks, a zero block gets scale 1."""
    x = np.asarray(x, np.float32)
    (M, K), (bm, bk) = x.shape, block
    y = np.zeros(x.shape, E4M3)
    s = np.zeros((math.ceil(M / bm), math.ceil(K / bk)), np.float32)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            tile = x[i * bm:(i + 1) * bm, j * bk:(j + 1) * bk]
            amax = np.max(np.abs(tile))
            sc = amax / np.float32(448.0)
            if pow2:  # scale_fmt == "ue8m0"
                sc = np.exp2(np.ceil(np.log2(sc))).astype(np.float32) if amax > 0 else sc
            sc = sc if amax > 0 else np.float32(1.0)
            y[i * bm:(i + 1) * bm, j * bk:(j + 1) * bk] = (tile / sc).astype(E4M3)
            s[i, j] = sc
    return y, s


def _data(shape, seed, zero_blocks=False):
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    x *= np.exp(np.random.default_rng(seed + 1).uniform(-3, 3, shape[:-1] + (1,))).astype(np.float32)
    if zero_blocks:
        x[..., :130, 128:256] = 0.0  # a whole 128x128 block (and 1x128 tiles) of zeros
    return x


def _bits(q):
    return np.asarray(q).view(np.uint8)


def _assert_matches_transcription(x, q, s, q_ref, s_ref, block):
    """Scales within SCALE_MAX_ULP; q bit-equal except next to an E4M3 rounding midpoint, where
    XLA's reciprocal multiply may round the other way (quantize.py's docstring)."""
    x = np.asarray(x, np.float32).reshape(q_ref.shape)
    s, q = np.asarray(s).reshape(s_ref.shape), np.asarray(q).reshape(q_ref.shape)
    np.testing.assert_array_max_ulp(s, s_ref, maxulp=SCALE_MAX_ULP)
    differ = _bits(q) != _bits(q_ref)
    s_full = np.repeat(np.repeat(s_ref, block[0], 0), block[1], 1)[: x.shape[0], : x.shape[1]]
    v = x[differ].astype(np.float64) / s_full[differ]
    midpoint = (q[differ].astype(np.float64) + q_ref[differ].astype(np.float64)) / 2
    assert np.all(np.abs(v - midpoint) <= NEAR_MIDPOINT * np.abs(v)), (v, midpoint)
    return int(differ.sum())


@functools.partial(jax.jit, static_argnums=1)
def _quantize_dequantize(a, block):
    return fp8.dequantize_blocks(*fp8.quantize_blocks(a, block), block)


def _deq(a, block):
    return np.asarray(_quantize_dequantize(a, tuple(block)), np.float64)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ---- quantize_blocks --------------------------------------------------------------------------

@pytest.mark.parametrize("block", [(1, 128), (128, 128), (128, 1)])
@pytest.mark.parametrize("shape", [(200, 300), (256, 384)])
def test_quantize_matches_deepseek_transcription(shape, block):
    x = _data(shape, seed=0, zero_blocks=True)
    q, s = jax.jit(fp8.quantize_blocks, static_argnums=1)(x, block)
    q_ref, s_ref = _np_quantize(x, block)
    assert q.dtype == jnp.float8_e4m3fn and q.shape == x.shape
    assert s.dtype == jnp.float32 and s.shape == s_ref.shape
    n_ties = _assert_matches_transcription(x, q, s, q_ref, s_ref, block)
    print(f"\n{shape} {block}: {n_ties} of {x.size} q differ next to a rounding midpoint")
    # The zero block: scale 1, q 0 (DeepSeek's 2024 kernel gives NaN here).
    assert np.all(np.asarray(s)[: 128 // block[0], 128 // block[1]: 256 // block[1]] == 1.0)
    assert np.all(np.asarray(q, np.float32)[:128, 128:256] == 0.0)


def test_quantize_leading_dims_are_blocks_of_one():
    x = _data((2, 3, 50, 300), seed=1)
    x16 = jnp.asarray(x, jnp.bfloat16)
    q, s = jax.jit(fp8.quantize_blocks, static_argnums=1)(x16, (1, 128))
    x16 = np.asarray(x16, np.float32).reshape(300, 300)
    assert s.shape == (2, 3, 50, 3)
    _assert_matches_transcription(x16, q, s, *_np_quantize(x16, (1, 128)), (1, 128))
    w = _data((3, 200, 300), seed=2)  # stacked expert weights: 128x128 blocks per expert
    q, s = jax.jit(fp8.quantize_blocks, static_argnums=1)(w, (128, 128))
    assert s.shape == (3, 2, 3)
    for e in range(3):
        _assert_matches_transcription(w[e], q[e], s[e], *_np_quantize(w[e], (128, 128)), (128, 128))


@pytest.mark.parametrize("block", [(1, 128), (128, 128)])
def test_dequantize_round_trip_error_bounded(block):
    x = _data((200, 300), seed=3, zero_blocks=True)
    q, s = fp8.quantize_blocks(x, block)
    x_hat = np.asarray(fp8.dequantize_blocks(q, s, block))
    s_full = np.repeat(np.repeat(np.asarray(s), block[0], 0), block[1], 1)[:200, :300]
    bound = E4M3_HALF_ULP * np.abs(x) + E4M3_HALF_SUBNORMAL * s_full
    assert x_hat.dtype == np.float32
    assert np.all(np.abs(x_hat - x) <= bound), np.max(np.abs(x_hat - x) - bound)
    print(f"\nround trip {block}: rel Frobenius error {_rel(x_hat, x):.4f}")


def test_round_trip_inside_one_jit_still_rounds():
    """dequantize(quantize(x)) in one jit must equal the fp8 round trip, not x (XLA:GPU folds
    f32 -> f8 -> f32 conversion chains unless quantize_blocks keeps them apart)."""
    x = _data((64, 256), seed=5)
    got = np.asarray(_quantize_dequantize(x, (1, 128)))
    q, s = fp8.quantize_blocks(x, (1, 128))
    want = np.asarray(q).astype(np.float32) * np.repeat(np.asarray(s), 128, 1)
    np.testing.assert_array_equal(got, want)
    assert _rel(got, x) > 1e-2


def test_pow2_scales():
    x = _data((200, 300), seed=4, zero_blocks=True)
    x[130, 0] = 448.0 * 2.0**-3  # this tile's amax / 448 is exactly a power of two: kept, not doubled
    x[130, 1:128] = 0.01
    x[131, 0] = np.nextafter(np.float32(448.0 * 2.0**-3), np.float32(np.inf))  # one ulp more: doubled
    x[131, 1:128] = 0.01
    q, s = fp8.quantize_blocks(x, (1, 128), pow2_scale=True)
    q_ref, s_ref = _np_quantize(x, (1, 128), pow2=True)
    s = np.asarray(s)
    mantissa, _ = np.frexp(s)
    assert np.all(mantissa == 0.5), "scales must be powers of two"
    assert s[130, 0] == 2.0**-3 and s[131, 0] == 2.0**-2
    np.testing.assert_array_equal(s, s_ref)  # powers of two: no ulp slack
    _assert_matches_transcription(x, q, s, q_ref, s_ref, (1, 128))
    q = np.asarray(q, np.float32)
    assert np.all(np.isfinite(q)) and np.max(np.abs(q)) <= 448.0
    amax = np.stack([np.abs(x[:, j * 128:(j + 1) * 128]).max(1) for j in range(3)], 1)
    nonzero = amax > 0
    assert np.all(s[nonzero] >= amax[nonzero] / 448.0) and np.all(s[nonzero] < amax[nonzero] / 224.0)


# ---- fp8 dot ----------------------------------------------------------------------------------

def _dot_and_grads(dot, x, w, dy, **kw):
    def f(x, w, dy):
        y, vjp = jax.vjp(lambda x, w: dot(x, w, **kw), x, w)
        return (y, *vjp(dy))
    return jax.jit(f)(x, w, dy)


def _problem(x_shape, w_shape, seed):
    """N(0, 1) activations, N(0, 1/K) weights (K = x's last dim)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = (rng.standard_normal(w_shape) / np.sqrt(x_shape[-1])).astype(np.float32)
    return x, w


def _block_reference(x_MK, w_KN, dy_MN):
    """Dequantize-then-f64 from the same quantized operands the block recipe uses."""
    w_hat = _deq(w_KN, (128, 128))
    y = _deq(x_MK, (1, 128)) @ w_hat
    dx = _deq(dy_MN, (1, 128)) @ w_hat.T
    dw = _deq(x_MK, (128, 1)).T @ _deq(dy_MN, (128, 1))
    return y, dx, dw


def _tensor_reference(x_MK, w_KN, dy_MN):
    x, w, dy = (_deq(a, a.shape) for a in (x_MK, w_KN, dy_MN))
    return x @ w, dy @ w.T, x.T @ dy


def _check_same_operands(name, got, ref):
    for g, r, what in zip(got, ref, ("y", "dx", "dw")):
        g = np.asarray(g, np.float64)
        assert np.max(np.abs(g - r)) <= SAME_OPERANDS_RTOL * np.max(np.abs(r)), (name, what)
        assert _rel(g, r) <= SAME_OPERANDS_RTOL, (name, what)


def _check_fp8_error(name, got, x_MK, w_KN, dy_MN):
    x, w, dy = (np.asarray(a, np.float64) for a in (x_MK, w_KN, dy_MN))
    errs = [_rel(g, r) for g, r in zip(got, (x @ w, dy @ w.T, x.T @ dy))]
    print(f"\n{name}: rel Frobenius error vs f32  y {errs[0]:.4f}  dx {errs[1]:.4f}  dw {errs[2]:.4f}")
    assert max(errs) < FP8_REL_ERR, (name, errs)


@pytest.mark.parametrize("M,K,N", [(96, 320, 200), (200, 384, 136)])
def test_block_dot_matches_dequantized_reference(M, K, N):
    x, w = _problem((M, K), (K, N), seed=5)
    dy = np.random.default_rng(6).standard_normal((M, N)).astype(np.float32)
    got = _dot_and_grads(fp8.make_dot("block", "xla_cpu"), x, w, dy)
    assert [g.shape for g in got] == [(M, N), (M, K), (K, N)]
    _check_same_operands("block", got, _block_reference(x, w, dy))
    _check_fp8_error(f"block M={M} K={K} N={N}", got, x, w, dy)


def test_block_dot_multi_dim_x_and_w():
    """x [B, T, K] @ w [K, H, D]: tokens and output dims flatten, blocks over (K, H*D)."""
    x, w = _problem((2, 48, 320), (320, 4, 50), seed=7)
    dy = np.random.default_rng(8).standard_normal((2, 48, 4, 50)).astype(np.float32)
    y, dx, dw = _dot_and_grads(fp8.make_dot("block", "xla_cpu"), x, w, dy)
    assert y.shape == (2, 48, 4, 50) and dx.shape == x.shape and dw.shape == w.shape
    got = (np.asarray(y).reshape(96, 200), np.asarray(dx).reshape(96, 320), np.asarray(dw).reshape(320, 200))
    ref = _block_reference(x.reshape(96, 320), w.reshape(320, 200), dy.reshape(96, 200))
    _check_same_operands("block [B,T,K]x[K,H,D]", got, ref)


@pytest.mark.parametrize("mode", ["block", "tensor"])
def test_batched_expert_dot(mode):
    E, C, K, N = 2, 40, 200, 72
    x, w = _problem((E, C, K), (E, K, N), seed=9)
    dy = np.random.default_rng(10).standard_normal((E, C, N)).astype(np.float32)
    y, dx, dw = _dot_and_grads(fp8.make_dot(mode, "xla_cpu"), x, w, dy, batched=True)
    assert y.shape == (E, C, N) and dx.shape == x.shape and dw.shape == w.shape
    for e in range(E):
        got = (y[e], dx[e], dw[e])
        if mode == "block":
            _check_same_operands(f"block expert {e}", got, _block_reference(x[e], w[e], dy[e]))
        else:
            _check_same_operands(f"tensor expert {e}", got, _tensor_reference(x[e], w[e], dy[e]))
        _check_fp8_error(f"{mode} expert {e}", got, x[e], w[e], dy[e])


def test_tensor_dot():
    M, K, N = 96, 320, 200
    x, w = _problem((M, K), (K, N), seed=11)
    dy = np.random.default_rng(12).standard_normal((M, N)).astype(np.float32)
    got = _dot_and_grads(fp8.make_dot("tensor", "xla_cpu"), x, w, dy)
    _check_same_operands("tensor", got, _tensor_reference(x, w, dy))
    _check_fp8_error("tensor", got, x, w, dy)


def test_none_dot_is_plain_dot():
    x, w = _problem((2, 48, 320), (320, 200), seed=13)
    dy = np.random.default_rng(14).standard_normal((2, 48, 200)).astype(np.float32)
    got = _dot_and_grads(fp8.make_dot("none", "xla_cpu"), x, w, dy)
    want = _dot_and_grads(jnp.dot, x, w, dy)
    for g, r in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(r))


@pytest.mark.parametrize("mode", ["none", "tensor", "block"])
def test_dtypes(mode):
    x, w = _problem((96, 320), (320, 200), seed=17)
    x = jnp.asarray(x, jnp.bfloat16)
    dy = jnp.ones((96, 200), jnp.bfloat16)
    y, dx, dw = _dot_and_grads(fp8.make_dot(mode, "xla_cpu"), x, w, dy, out_dtype=jnp.bfloat16)
    assert (y.dtype, dx.dtype, dw.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)
    assert fp8.make_dot(mode, "xla_cpu")(x, w).dtype == jnp.bfloat16  # out_dtype defaults to x's


def test_bad_config_and_shapes_raise():
    with pytest.raises(ValueError, match="fp8 mode"):
        fp8.make_dot("e5m2", "xla_cpu")
    with pytest.raises(ValueError, match="kernel_backend"):
        fp8.make_dot("block", "cuda")
    with pytest.raises(ValueError, match="one K"):
        fp8.make_dot("block", "xla_cpu")(jnp.ones((4, 8)), jnp.ones((9, 2)))
    with pytest.raises(ValueError, match="scale has shape"):
        fp8.dequantize_blocks(jnp.ones((4, 200), jnp.float8_e4m3fn), jnp.ones((4, 1)), (1, 128))
