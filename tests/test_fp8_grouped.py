"""FP8 block-scaled grouped GEMM (dsjax/fp8/grouped.py, grouped_kernel.py): pairs that must agree.

- gmm_block's reference path (xla_cpu) vs a per-expert loop of dot.py's dense block-mode dot on each
  group's rows: y, dx and dw to float32 rounding (same tiles, same scales, same E4M3 values), with
  uneven groups, empty experts and groups that are not multiples of 128 rows;
- the same vs the float32 unquantized grouped product: within FP8 error;
- rows past sum(group_sizes) are zero, and so are their dx;
- where JAX ships Pallas's Mosaic GPU interpreter (jax >= 0.11): the M-grouped (forward, dgrad) and
  K-grouped (wgrad) kernels vs the reference path on the same quantized operands, in the default
  tiling and in wider ones (64 x 192, 64 x 256 as two WGMMAs, 128 x 96 warpgroups, ...), and both
  kernels lower for CUDA (sm_90) on CPU in the default tiling and every grouped_kernel.SWEEP_CONFIGS
  candidate;
- kernel.Config's register estimate and compact spec.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax import fp8
from mgpu_interpreter import interpreter_params, needs_interpreter
from dsjax.fp8 import grouped
from dsjax.fp8.quantize import quantize_blocks

F32_RTOL = 2e-5  # float32 rounding of a different summation order
FP8_RTOL = 5e-2  # relative Frobenius error of the FP8 recipe vs unquantized float32
KERNEL_RTOL = 1e-5  # kernel vs reference on the same quantized operands

# K, N, group sizes, M (rows past the groups are padding): 300 and 5 are not multiples of 128,
# two experts are empty, and the last case has an empty first expert and 20 trailing rows.
CASES = [
    (256, 384, (300, 0, 5, 160), 465),
    (200, 136, (0, 131, 129, 0), 280),
]


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _operands(K, N, sizes, M, seed=0):
    kx, kw, ks, kd = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(kx, (M, K)) * jnp.exp(jax.random.normal(ks, (M, 1)))  # per-row scales matter
    w = jax.random.normal(kw, (len(sizes), K, N)) * 0.05
    dy = jax.random.normal(kd, (M, N))
    return x, w, jnp.asarray(sizes, jnp.int32), dy


def _vjp(f, x, w, dy):
    y, vjp = jax.vjp(f, x, w)
    return (y, *vjp(dy))


def _per_expert_dense(x, w, sizes, dy):
    """y, dx, dw from dot.py's block-mode dot, one call per nonempty expert on its own rows."""
    dot = fp8.make_dot("block", "xla_cpu")
    M, N = x.shape[0], w.shape[2]
    y, dx, dw = np.zeros((M, N), np.float32), np.zeros(x.shape, np.float32), np.zeros(w.shape, np.float32)
    start = 0
    for g, s in enumerate(sizes):
        if s:
            rows = slice(start, start + s)
            y[rows], dx[rows], dw[g] = _vjp(dot, x[rows], w[g], dy[rows])
        start += s
    return y, dx, dw


@pytest.mark.parametrize("K,N,sizes,M", CASES)
def test_reference_matches_per_expert_dense_dot(K, N, sizes, M):
    x, w, gs, dy = _operands(K, N, sizes, M)
    got = jax.jit(lambda x, w, dy: _vjp(lambda x, w: grouped.gmm_block(x, w, gs, "xla_cpu"), x, w, dy))(x, w, dy)
    want = _per_expert_dense(x, w, sizes, dy)
    for name, g, r in zip(("y", "dx", "dw"), got, want):
        assert g.dtype == jnp.float32, name
        assert _rel(g, r) < F32_RTOL, (name, _rel(g, r))
    total = sum(sizes)
    assert not np.asarray(got[0][total:]).any() and not np.asarray(got[1][total:]).any()
    for g, s in enumerate(sizes):
        if not s:
            assert not np.asarray(got[2][g]).any()


@pytest.mark.parametrize("K,N,sizes,M", CASES[:1])
def test_reference_within_fp8_error_of_f32(K, N, sizes, M):
    x, w, gs, dy = _operands(K, N, sizes, M, seed=1)

    def f32(x, w):
        return jax.lax.ragged_dot(x, w, gs, precision=jax.lax.Precision.HIGHEST,
                                  preferred_element_type=jnp.float32)

    got = _vjp(lambda x, w: grouped.gmm_block(x, w, gs, "xla_cpu"), x, w, dy)
    want = _vjp(f32, x, w, dy)
    for name, g, r in zip(("y", "dx", "dw"), got, want):
        assert _rel(g, r) < FP8_RTOL, (name, _rel(g, r))


def test_dtypes_bf16_x_f32_w():
    x, w, gs, dy = _operands(128, 128, (70, 0, 58), 140)
    x = x.astype(jnp.bfloat16)
    y, dx, dw = _vjp(lambda x, w: grouped.gmm_block(x, w, gs, "xla_cpu"), x, w, dy.astype(jnp.bfloat16))
    assert (y.dtype, dx.dtype, dw.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)


def test_gmm_block_takes_weights_to_concatenate():
    """w as a tuple (the experts' gate and up as one GEMM) gives exactly the GEMM of their
    concatenation along N — output, dx — and the concatenation's dw, split back per weight."""
    x, w, gs, dy = _operands(128, 384, (70, 0, 58), 140)
    w_a, w_b = w[:, :, :128], w[:, :, 128:]
    y, dx, dw = _vjp(lambda x, w: grouped.gmm_block(x, w, gs, "xla_cpu"), x, w, dy)
    y2, dx2, (dw_a, dw_b) = _vjp(lambda x, ws: grouped.gmm_block(x, ws, gs, "xla_cpu"), x, (w_a, w_b), dy)
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_array_equal(dx2, dx)
    np.testing.assert_array_equal(np.concatenate([dw_a, dw_b], axis=2), dw)
    with pytest.raises(ValueError, match="tuple of"):
        grouped.gmm_block(x, (w_a, w_b[:, :64]), gs, "xla_cpu")


def test_wgrad_tiles_start_at_each_group():
    """quantize_wgrad's tiles are quantize_blocks' 128x1 tiles of each group's own rows."""
    x, _, gs, _ = _operands(64, 8, (130, 0, 3), 140)
    q_DP, s_DT = grouped.quantize_wgrad(x, gs)
    (q0, s0), (q2, s2) = quantize_blocks(x[:130], (128, 1)), quantize_blocks(x[130:133], (128, 1))
    np.testing.assert_array_equal(np.asarray(q_DP[:, :130].T, np.float32), np.asarray(q0, np.float32))
    np.testing.assert_array_equal(np.asarray(s_DT[:, :2].T), np.asarray(s0))
    np.testing.assert_array_equal(np.asarray(q_DP[:, 256:259].T, np.float32), np.asarray(q2, np.float32))
    np.testing.assert_array_equal(np.asarray(s_DT[:, 2:3].T), np.asarray(s2))
    assert not np.asarray(q_DP[:, 130:256], np.float32).any() and not np.asarray(q_DP[:, 259:], np.float32).any()


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU/TPU error")
def test_pallas_gpu_off_gpu_raises_clear_error():
    imported_before = "dsjax.fp8.grouped_kernel" in sys.modules
    x, w, gs, _ = _operands(128, 128, (8, 8), 16)
    with pytest.raises(ValueError, match="pallas_gpu.*default backend is"):
        grouped.gmm_block(x, w, gs, "pallas_gpu")
    if not imported_before:
        assert "dsjax.fp8.grouped_kernel" not in sys.modules  # CPU paths never import Mosaic GPU


def test_sampled_groups_check_of_the_gpu_script_can_fail():
    """scripts/check_fp8_grouped.py's checks of the kernels at the timed shapes (per-group
    dequantized products: `sampled_groups_error` for forward and dgrad, `sampled_wgrad_error` for
    wgrad) against the reference path's outputs: ~0 for them, and large once one sampled group is
    wrong (the last group, where offsets are largest)."""
    from check_fp8_grouped import TOL, sampled_groups_error, sampled_wgrad_error  # scripts/ is on the path (conftest.py)

    fwd, dgrad, wgrad = _quantized(200, 136, (300, 0, 5, 160), 465)
    for args in (fwd, dgrad):
        y = grouped._m_grouped(*args, "xla_cpu", jnp.bfloat16)
        assert sampled_groups_error(y, *args) < TOL  # the script's pass bound (measured: 1e-6, 4e-5)
        last = slice(305, 465)
        assert sampled_groups_error(y.at[last].multiply(1.5), *args) > 0.1
    qa, sa, qb, sb, gs = wgrad
    dw = grouped._k_grouped(qa, sa, qb, sb, gs, "xla_cpu", jnp.float32)
    _, tile_start, tiles = grouped.group_tiles(gs, 0)
    assert sampled_wgrad_error(dw, qa, sa, qb, sb, tile_start, tiles) < TOL
    assert sampled_wgrad_error(dw.at[3].multiply(1.5), qa, sa, qb, sb, tile_start, tiles) > 0.1


# ---- kernels, in Pallas's Mosaic GPU interpreter -------------------------------------------------

def _quantized(K, N, sizes, M, seed=0):
    """The quantized operands of all three GEMMs, as gmm_block's custom_vjp builds them."""
    x, w, gs, dy = _operands(K, N, sizes, M, seed)
    qx, sx = quantize_blocks(x, (1, 128))
    qw, sw = quantize_blocks(w, (128, 128))
    qdy, sdy = quantize_blocks(dy, (1, 128))
    fwd = (qx, sx, qw.transpose(0, 2, 1), grouped._per_column(sw, N), gs)
    dgrad = (qdy, sdy, qw, grouped._per_column(sw.transpose(0, 2, 1), K), gs)
    wgrad = (*grouped.quantize_wgrad(x, gs), *grouped.quantize_wgrad(dy, gs), gs)
    return fwd, dgrad, wgrad


# (128, 256, ...) is aligned; (200, 136, ...) pads K and N, 465 pads M; a group of 300 rows spans
# three tiles, one of 5 sits inside a tile shared with two neighbours.
KERNEL_CASES = [(256, 256, (100, 0, 5, 200, 15), 330), (200, 136, (300, 0, 5, 160), 465)]
# Wider tilings than the default's two 64 x 128 warpgroups (kernel.Config fields): two 64 x 192
# (sb in three 64-column chunks; wgrad's column scales 32 at a time after the WGMMA), two 128 x 96
# side by side (32-column chunks; the second warpgroup starts 96 columns into a scale block) and
# 64 x 256 (two 64 x 128 WGMMAs and partials per step). (64 x 160 and 176 columns ran here in the
# interpreter; 160 crashed the GPU, so check_config refuses cta_n % 64 != 0.)
WIDE_TILES = {
    "128x192m": dict(cta_n=192),
    "128x192n": dict(cta_n=192, wg_dim="n", stages=3),
    "128x256m": dict(cta_n=256, stages=3),
}
# N = 384: the second 192-column tile starts 64 columns into a scale block (so does dgrad's, N = 256).
WIDE_CASE = (256, 384, (100, 0, 5, 200, 15), 330)
TILED_CASES = ([pytest.param(*case, {}, id="-".join(map(str, case[:2]))) for case in KERNEL_CASES]
               + [pytest.param(*WIDE_CASE, tiles, id=name) for name, tiles in WIDE_TILES.items()])


def _config(tiles, monkeypatch):
    """kernel.Config(**tiles), or None (the default) for no fields. The interpreter has no shared
    memory limit, so the kernels may write float32 where its output tile would not fit on the GPU
    (128 x 256): the comparison stays at KERNEL_RTOL (test_kernels_lower_for_cuda checks the budget
    with bf16 outputs)."""
    from dsjax.fp8 import grouped_kernel

    if not tiles:
        return None
    monkeypatch.setattr(grouped_kernel, "SMEM_LIMIT", float("inf"))
    return grouped_kernel.Config(**tiles)


@needs_interpreter
@pytest.mark.parametrize("K,N,sizes,M,tiles", TILED_CASES)
def test_m_grouped_kernel_matches_reference_in_interpreter(K, N, sizes, M, tiles, monkeypatch):
    from dsjax.fp8 import grouped_kernel

    config = _config(tiles, monkeypatch)
    interpret = interpreter_params()()
    for args in _quantized(K, N, sizes, M)[:2]:
        want = grouped._m_grouped(*args, "xla_cpu", jnp.float32)
        got = grouped_kernel.m_grouped_matmul(*args, jnp.float32, config, sb_blocked=True, interpret=interpret,
                                              num_ctas=2)
        assert _rel(got, want) < KERNEL_RTOL, _rel(got, want)
        assert not np.asarray(got[sum(sizes):]).any()


@needs_interpreter
@pytest.mark.parametrize("K,N,sizes,M,tiles", TILED_CASES[1:])
def test_k_grouped_kernel_matches_reference_in_interpreter(K, N, sizes, M, tiles, monkeypatch):
    from dsjax.fp8 import grouped_kernel

    config = _config(tiles, monkeypatch)
    qa, sa, qb, sb, gs = _quantized(K, N, sizes, M)[2]
    want = grouped._k_grouped(qa, sa, qb, sb, gs, "xla_cpu", jnp.float32)
    _, tile_start, tiles_G = grouped.group_tiles(gs, 0)
    got = grouped_kernel.k_grouped_matmul(qa, sa, qb, sb, tile_start, tiles_G, jnp.float32, config,
                                          interpret=interpreter_params()(), num_ctas=2)
    assert got.shape == (len(sizes), K, N)
    assert _rel(got, want) < KERNEL_RTOL, _rel(got, want)


# The M-grouped kernel's own options (kernel.Config). Two 128-K chunks per step (k_chunks=2): K = 256
# is one step, 200 pads to one, 640 to three (its last chunk all zeros). Chained tiles (chain): K =
# 256 and 200 are 2 steps, 512 is 4, whole rounds of 2 stages, so every CTA's tiles chain; 640 (5
# steps) does not divide and runs unchained.
_CASE_512, _CASE_640 = ((k, 256, (100, 0, 5, 200, 15), 330) for k in (512, 640))
M_ONLY_CASES = ([pytest.param(dict(k_chunks=2), "not per-column sb", *case, id=f"k2-{case[0]}")
                 for case in (*KERNEL_CASES, _CASE_640)]
                + [pytest.param(dict(chain=True), "chain", *case, id=f"chain-{case[0]}")
                   for case in (*KERNEL_CASES, _CASE_512, _CASE_640)]
                # M_GROUPED's lowering and band width (the default's own cases do not chain: 4 stages)
                + [pytest.param(dict(chain=True, semantics="warpgroup", grid_tile_width=64), "chain", *_CASE_512,
                                id="chain-wg-512")])


@needs_interpreter
@pytest.mark.parametrize("options,refusal,K,N,sizes,M", M_ONLY_CASES)
def test_m_grouped_only_options_match_reference_in_interpreter(options, refusal, K, N, sizes, M):
    """k_chunks=2: both chunks' WGMMAs issued, then each partial promoted after its own wait. chain:
    two CTAs, each running several tiles (some empty: the groups end before M) as one chain of
    pipelines, then a dropped STOP tile. Either way the same sums, nothing past the groups written,
    and the K-grouped kernel refuses the option."""
    from dsjax.fp8 import grouped_kernel

    config = grouped_kernel.Config(stages=2, **options)
    for args in _quantized(K, N, sizes, M)[:2]:
        want = grouped._m_grouped(*args, "xla_cpu", jnp.float32)
        got = grouped_kernel.m_grouped_matmul(*args, jnp.float32, config, sb_blocked=True,
                                              interpret=interpreter_params()(), num_ctas=2)
        assert _rel(got, want) < KERNEL_RTOL, _rel(got, want)
        assert not np.asarray(got[sum(sizes):]).any()
    with pytest.raises(ValueError, match=refusal):
        grouped_kernel.k_grouped_matmul(*_quantized(K, N, sizes, M)[2][:4], jnp.zeros(5, jnp.int32),
                                        jnp.zeros(5, jnp.int32), jnp.float32, config)


@needs_interpreter
@pytest.mark.parametrize("spec,K", [("128x128.m.2.4.lane.k2", 640), ("128x128.m.4.4.lane.c", 512)])
def test_m_grouped_only_options_lower_for_cuda(spec, K):
    """Through Pallas -> Mosaic GPU for sm_90, bf16 output (the shared-memory budget). k2: the chunk
    slices of the swizzled tiles, wgmma_accumulator_load's waits, two accumulators. chain (K = 512:
    4 steps, one round of 4 stages): the START / STEADY / STOP pipelines."""
    from dsjax.fp8 import grouped_kernel

    fwd = _quantized(K, 256, (100, 0, 5, 200, 15), 330)[0]
    config = grouped_kernel.Config.parse(spec)
    fn = jax.jit(lambda *a: grouped_kernel.m_grouped_matmul(*a, jnp.bfloat16, config, sb_blocked=True, num_ctas=132))
    assert "mosaic_gpu" in fn.trace(*fwd).lower(lowering_platforms=("cuda",)).as_text()


def _lower_for_cuda(config, k_dtype):
    """Pallas -> Mosaic GPU lowering for sm_90 on CPU (no PTX) of both kernels: tiling, transforms,
    layouts, smem budget (M-grouped with bf16 output)."""
    from dsjax.fp8 import grouped_kernel

    fwd, _, wgrad = _quantized(640, 256, (100, 0, 5, 200, 15), 330)  # 5 K-steps: all 4 stages allocated
    _, tile_start, tiles = grouped.group_tiles(wgrad[-1], 0)
    m_fn = jax.jit(lambda *a: grouped_kernel.m_grouped_matmul(*a, jnp.bfloat16, config, sb_blocked=True,
                                                              num_ctas=132))
    k_fn = jax.jit(lambda *a: grouped_kernel.k_grouped_matmul(*a, k_dtype, config, num_ctas=132))
    for fn, args in ((m_fn, fwd), (k_fn, (*wgrad[:4], tile_start, tiles))):
        text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert "mosaic_gpu" in text


@needs_interpreter
def test_kernels_lower_for_cuda():
    """The default tiling, with the outputs gmm_block asks for (wgrad f32: float32 master weights)."""
    _lower_for_cuda(None, jnp.float32)


@needs_interpreter
def test_sweep_configs_lower_for_cuda():
    """Every grouped_kernel.SWEEP_CONFIGS candidate, with the bf16 outputs check_fp8_grouped.py times."""
    from dsjax.fp8 import grouped_kernel

    for spec in grouped_kernel.SWEEP_CONFIGS:
        _lower_for_cuda(grouped_kernel.Config.parse(spec), jnp.bfloat16)


def test_config_registers_and_spec():
    """kernel.Config's register estimate against setmaxnreg's 232 per compute thread, what it admits
    in the grouped kernels, and the compact spec of scripts/check_fp8_grouped.py --configs."""
    from dsjax.fp8 import grouped_kernel
    from dsjax.fp8.kernel import Config

    assert Config().compute_registers == 232 and Config().registers() == 128 + 32
    Config(cta_n=192).check()  # two 64 x 192 warpgroups: 96 + 96 + 32
    Config(cta_n=192, wg_dim="n").check()  # two 128 x 96
    with pytest.raises(ValueError, match=r"64 x 256 \(cta_m=128, cta_n=256 split along wg_dim='m'"):
        Config(cta_n=256, stages=3).check()  # the dense kernel WGMMAs a warpgroup's tile at once
    grouped_kernel.check_config(Config(cta_n=256, stages=3), jnp.bfloat16, sb_blocked=True)  # in halves
    grouped_kernel.check_config(Config(cta_n=256, stages=3), jnp.bfloat16, sb_blocked=False)
    with pytest.raises(ValueError, match="shared memory"):
        grouped_kernel.check_config(Config(cta_n=256, stages=3), jnp.float32, sb_blocked=False)
    # 64 x 200: one WGMMA and one sb scalar per block fit (232); wgrad's column scales do not, and
    # 200 does not halve into WGMMA widths
    wide = Config(cta_n=200, stages=3, semantics="warpgroup")
    wide.check(0, 200)
    with pytest.raises(ValueError, match="8 column scales"):
        wide.check(8, 200)  # what check_config asks with per-column sb (8 at a time)
    with pytest.raises(ValueError, match="cta_n % 64 == 0"):
        grouped_kernel.check_config(Config(cta_n=160, semantics="warpgroup"), jnp.bfloat16, sb_blocked=True)
    with pytest.raises(ValueError, match="cta_n % 32 == 0"):
        Config(cta_n=176).check()  # Lane semantics: 704-byte scale copies
    Config(cta_n=176, semantics="warpgroup").check()

    cfg = Config.parse("128x192.m.3.8.wg")
    assert cfg == Config(cta_n=192, stages=3, grid_tile_width=8, semantics="warpgroup")
    assert Config.parse(cfg.spec) == cfg and Config.parse("128x160") == Config(cta_n=160)
    assert Config.parse("128x128.m.2.4.lane.k2") == Config(stages=2, k_chunks=2)
    assert Config(stages=2, k_chunks=2).spec == "128x128.m.2.4.lane.k2" and Config().spec == "128x128.m.4.4.lane"
    assert Config.parse("128x128.m.4.4.lane.c") == Config(chain=True) == Config.parse(Config(chain=True).spec)
    assert Config.parse("128x128.m.2.4.lane.k2.c") == Config(stages=2, k_chunks=2, chain=True)
    assert Config(k_chunks=2).registers() == 64 + 2 * 64 + 32
    with pytest.raises(ValueError, match="shared memory"):  # 3 stages of two chunks beside a bf16 tile
        grouped_kernel.check_config(Config(stages=3, k_chunks=2), jnp.bfloat16, sb_blocked=True)
    for bad in ("128", "128x192.m.3.8.tc", "128x192.m.3.8.wg.1", "128x128.m.2.4.lane.k2.x", "128x128.m.4.4.lane.c.k2"):
        with pytest.raises(ValueError, match="is not CTA_MxCTA_N"):
            Config.parse(bad)
    for spec in grouped_kernel.SWEEP_CONFIGS:
        for sb_blocked in (True, False):
            grouped_kernel.check_config(Config.parse(spec), jnp.bfloat16, sb_blocked)
    # The M-grouped kernel's swizzled second output buffer: beside the default's 4 stages with the
    # bf16 outputs gmm_block asks for, not with float32 (the interpreter tests' default cases then
    # store every slice through the ladder); with 2 stages (the M-grouped-only cases) it fits float32.
    assert grouped_kernel._swizzled_full_fits(grouped_kernel.M_GROUPED, jnp.bfloat16)
    assert not grouped_kernel._swizzled_full_fits(grouped_kernel.M_GROUPED, jnp.float32)
    assert grouped_kernel._swizzled_full_fits(Config(stages=2), jnp.float32)


@needs_interpreter
def test_gmm_block_pallas_gpu_matches_reference_in_interpreter(monkeypatch):
    """The whole custom_vjp with backend "pallas_gpu" (all three GEMMs and the fused quantizations in
    the kernels, run by the interpreters) vs xla_cpu; also with the weights given as a tuple (the
    weights' kernel reading two inputs)."""
    from dsjax.fp8 import interpret

    x, w, gs, dy = _operands(256, 256, (70, 0, 150, 9), 240)
    want = _vjp(lambda x, w: grouped.gmm_block(x, w, gs, "xla_cpu"), x, w, dy)
    interpret.use_interpreters(monkeypatch.setattr)
    got = _vjp(lambda x, w: grouped.gmm_block(x, w, gs, "pallas_gpu"), x, w, dy)
    y2, dx2, dws = _vjp(lambda x, ws: grouped.gmm_block(x, ws, gs, "pallas_gpu"), x, (w[..., :128], w[..., 128:]), dy)
    for name, g, r in zip(("y", "dx", "dw"), got, want):
        assert _rel(g, r) < KERNEL_RTOL, (name, _rel(g, r))
    for name, g, r in zip(("y", "dx", "dw"), (y2, dx2, jnp.concatenate(dws, axis=2)), got):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(r), err_msg=name)
