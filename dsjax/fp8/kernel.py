"""Block-scaled FP8 GEMM for Hopper as a Pallas Mosaic GPU kernel (DeepSeek-V3 §3.3.2, DeepGEMM).

    block_scaled_matmul(qa_MK, sa_MJ, qb_NK, sb_JN, out_dtype) -> y [M, N] in out_dtype

    y[m, n] = sum_j (qa[m, chunk j] @ qb[n, chunk j]^T) * sa[m, j] * sb[j, n]

with qa, qb float8_e4m3fn and chunk j the K-columns [128 j, 128 (j+1)). This is dot.py's
`_split_k_matmul` with b given K-major ([N, K], as FP8 WGMMA requires of both operands), and the
one kernel serves all three GEMMs of a linear layer: forward (sb constant over 128-column blocks),
dgrad (the same) and wgrad (contraction over tokens, sa and sb per row / per column).

How it runs (one CTA per SM, persistent over output tiles in a planar snake; jax's
hopper_matmul_mgpu.py is the template for the structure, attention_mgpu.py's backward kernels for
the Lane-semantics idioms: explicit swizzle transforms, 1-D f32 operands pipelined next to the
matrix tiles and loaded with WGMMA row/column layouts, fresh plgpu.ACC per step, register carries):
- a memory warpgroup streams, per 128-K step, the x tile [cta_m, 128], the w^T tile [cta_n, 128]
  (both fp8, 128-byte swizzle = 128 fp8 elements per row) and the two scale vectors sa[j, cta_m],
  sb[j, cta_n] through `max_concurrent_steps` shared-memory stages (TMA);
- each of `num_compute_wgs` compute warpgroups owns a [wg_m, wg_n] slice of the CTA tile (split
  along M or N) and, per step, WGMMAs its slice into a fresh zeroed accumulator, waits for it, and
  promotes it on the CUDA cores: acc_f32 += partial * sa[rows] * sb[cols] (with sb_blocked, forward
  and dgrad, sb is one scalar per warpgroup and step and this is one FMA per element, as in
  DeepGEMM; wgrad's per-column sb costs a multiply more). While one warpgroup promotes, the other's
  WGMMA keeps the tensor cores busy (DeepGEMM's scheme);
- each compute warpgroup stores its slice through shared memory with one TMA store per tile.
Per warpgroup the f32 accumulator and the partial hold 2 * wg_m * wg_n / 128 registers per
thread; `Config.check` admits a tile only if they, REGISTER_HEADROOM and any per-column scales fit
what setmaxnreg gives a compute thread beside the 40-register memory warpgroup (232 with two compute
warpgroups): up to 64 x 192 (or 128 x 96) per warpgroup here (grouped_kernel.py, which can WGMMA a
tile in two column halves, goes to 64 x 256); DeepGEMM's math warpgroups are 64 x N, N <= 160.

Shapes: M and K are zero-padded to the tile (K to whole 128-chunks; zeros add nothing) and N to
cta_n, and the result sliced back. Anything the kernel cannot take (not 2-D, not e4m3, scale shapes
that do not match) raises ValueError from `unfit_reason`-checked callers; dot.py falls back to the
XLA split-K path with one warning per shape.

GPU-only: this module imports Pallas Mosaic GPU at the top, so import it only on a GPU backend
(dot.py imports it lazily inside `_block_matmul` for kernel_backend "pallas_gpu").

Checked on CPU with jax 0.11.2 (the GPU image's version): every config in
scripts/check_fp8_kernel.py lowers through Pallas -> Mosaic GPU for "cuda" (sm_90, shared-memory
budget included; `jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))`), and matches dot.py's
split-K reference in Pallas's Mosaic GPU interpreter (tests/test_fp8_kernel.py,
check_fp8_kernel.py --cpu-interpret). On one H200 (2026-11-29, scripts/check_fp8_kernel.py):
every config matches split-K to 7.5e-8-1.2e-4 relative; 850-1120 TFLOP/s, 1.27-1.62x bf16
(BENCHMARKS.md, FP8).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

BLOCK_K = 128  # DeepSeek's promotion interval and scale-block edge; one pipeline step
FP8 = jnp.float8_e4m3fn
# Registers per thread: the memory warpgroup's setmaxnreg (the kernels' memory_registers), and what a
# compute thread holds besides the accumulator, the partial and per-column scales (row scales, sb
# scalars, shared-memory addresses, WGMMA descriptors, loop, barrier and tile state). The headroom is
# an estimate, less than DeepGEMM leaves (its largest math tiles use 160-190 of 232: 64 x 160
# forward; 64 x 152 wgrad with 38 column-scale registers), so 64 x 192 (224) is the tight case; the
# measurement is ptxas's spill count on the GPU (jaxlib's MOSAIC_GPU_DUMP_PTXAS=1, untried here).
MEMORY_REGISTERS = 40
REGISTER_HEADROOM = 32
SMEM_LIMIT = 232_448  # bytes of shared memory one CTA may use on H100/H200 (Mosaic GPU checks it too)
SMEM_SLACK = 1024  # barriers


@dataclasses.dataclass(frozen=True)
class Config:
    """CTA tile cta_m x cta_n, split between `num_compute_wgs` warpgroups along `wg_dim`."""

    cta_m: int = 128
    cta_n: int = 128
    num_compute_wgs: int = 2
    wg_dim: str = "m"  # "m": warpgroups stacked along rows; "n": side by side along columns
    stages: int = 4  # pipeline stages in shared memory (each: (cta_m + cta_n) * 128 B + scales)
    grid_tile_width: int = 4  # planar-snake band width (in output tiles along N)
    semantics: str = "lane"  # plgpu.LoweringSemantics: "lane" | "warpgroup"
    # 128-K chunks per pipeline step, each WGMMA'd into its own partial: with 2, a warpgroup promotes
    # the first while the second runs (grouped_kernel.py's M-grouped kernel only)
    k_chunks: int = 1
    # A CTA's output tiles chain their K pipelines (Pallas's pipeline_state START / STEADY / STOP), so
    # the memory warpgroup loads the next tile's first stages while the compute warpgroups finish the
    # current one (grouped_kernel.py's M-grouped kernel only; where K steps % stages == 0)
    chain: bool = False

    @property
    def wg_m(self) -> int:
        return self.cta_m // self.num_compute_wgs if self.wg_dim == "m" else self.cta_m

    @property
    def wg_n(self) -> int:
        return self.cta_n // self.num_compute_wgs if self.wg_dim == "n" else self.cta_n

    _SEMANTICS_SPEC = {"lane": "lane", "wg": "warpgroup"}

    @classmethod
    def parse(cls, spec: str) -> Config:
        """A config from its compact spec
        `CTA_MxCTA_N[.wg_dim[.stages[.grid_tile_width[.lane|wg[.kC][.c]]]]]`, e.g. "128x192.m.3.8.wg",
        "128x128.m.2.4.lane.k2" (C = k_chunks) or "128x128.m.4.4.lane.c" (chain); fields left out keep
        their defaults. Not checked: call `check`."""
        fields = spec.split(".")
        try:
            cta_m, cta_n = (int(v) for v in fields[0].split("x"))
            kwargs = dict(cta_m=cta_m, cta_n=cta_n)
            if len(fields) > 1:
                kwargs["wg_dim"] = fields[1]
            if len(fields) > 2:
                kwargs["stages"] = int(fields[2])
            if len(fields) > 3:
                kwargs["grid_tile_width"] = int(fields[3])
            if len(fields) > 4:
                kwargs["semantics"] = cls._SEMANTICS_SPEC[fields[4]]
            rest = fields[5:]
            if rest and rest[0].startswith("k"):
                kwargs["k_chunks"] = int(rest.pop(0)[1:])
            if rest[:1] == ["c"]:
                rest.pop(0)
                kwargs["chain"] = True
            if rest:
                raise ValueError(f"{'.'.join(rest)!r} is not [kC][.c]")
        except (ValueError, KeyError) as e:
            raise ValueError(f"config spec {spec!r} is not CTA_MxCTA_N[.m|n[.stages[.grid_tile_width"
                             f"[.lane|wg[.kC][.c]]]]] ({e})") from None
        return cls(**kwargs)

    @property
    def spec(self) -> str:
        """The compact spec `parse` reads (num_compute_wgs is not part of it)."""
        semantics = {v: k for k, v in self._SEMANTICS_SPEC.items()}[self.semantics]
        chunks = "" if self.k_chunks == 1 else f".k{self.k_chunks}"
        chain = ".c" if self.chain else ""
        return (f"{self.cta_m}x{self.cta_n}.{self.wg_dim}.{self.stages}.{self.grid_tile_width}.{semantics}"
                f"{chunks}{chain}")

    @property
    def m_grouped_only(self) -> bool:
        """Options only grouped_kernel.py's M-grouped kernel implements (k_chunks > 1, chain)."""
        return self.k_chunks > 1 or self.chain

    @property
    def compute_registers(self) -> int:
        """Registers per thread a compute warpgroup gets: emit_pipeline_warp_specialized's setmaxnreg
        (Pallas's pipeline._compute_registers): 65536 per SM = 512 per thread of one warpgroup, less
        the memory warpgroup's MEMORY_REGISTERS, split between the compute warpgroups, at most 256,
        rounded down to 8 (232 for two)."""
        return int(min(256, (512 - MEMORY_REGISTERS) / self.num_compute_wgs) // 8 * 8)

    def registers(self, scale_columns: int = 0, partial_columns: int | None = None) -> int:
        """Estimated registers per compute thread in the K loop: the float32 accumulator (a thread
        holds wg_m * wg_n / 128 of it), the fresh partial of `partial_columns` (default wg_n) columns
        the WGMMA writes (grouped_kernel.py may issue a warpgroup's tile as column slices; one per
        k_chunk),
        `scale_columns` per-column scales live at once (WGMMA's column layout gives a thread 2 of every
        8 columns: one register per 4) and REGISTER_HEADROOM."""
        partial_columns = self.wg_n if partial_columns is None else partial_columns
        return (self.wg_m * (self.wg_n + self.k_chunks * partial_columns) // 128 + scale_columns // 4
                + REGISTER_HEADROOM)

    def check(self, scale_columns: int = 0, partial_columns: int | None = None):
        """Raises ValueError if the kernels cannot take this tiling; `scale_columns` and
        `partial_columns` as in `registers` (0 scale columns: sb is one scalar per 128-column block)."""
        if self.wg_dim not in ("m", "n"):
            raise ValueError(f"wg_dim {self.wg_dim!r} is not 'm' or 'n'")
        if self.semantics not in ("lane", "warpgroup"):
            raise ValueError(f"semantics {self.semantics!r} is not 'lane' or 'warpgroup'")
        if self.k_chunks not in (1, 2):
            raise ValueError(f"k_chunks {self.k_chunks} is not 1 or 2")
        split = self.cta_m if self.wg_dim == "m" else self.cta_n
        if split % self.num_compute_wgs:
            raise ValueError(f"{self} does not split evenly between warpgroups")
        if self.wg_m % 64 or self.wg_n % 8 or self.wg_n > 256:
            raise ValueError(f"{self}: a warpgroup's WGMMA needs wg_m % 64 == 0, wg_n % 8 == 0, "
                             f"wg_n <= 256 (got {self.wg_m} x {self.wg_n})")
        if self.semantics == "lane" and (self.cta_m % 32 or self.cta_n % 32):
            raise ValueError(f"{self}: with Lane semantics a TMA copy moves a multiple of 128 bytes, so the "
                             f"f32 scale vectors need cta_m % 32 == 0 and cta_n % 32 == 0")
        if (regs := self.registers(scale_columns, partial_columns)) > self.compute_registers:
            partial_columns = self.wg_n if partial_columns is None else partial_columns
            raise ValueError(
                f"{self}: a warpgroup tile of wg_m x wg_n = {self.wg_m} x {self.wg_n} (cta_m={self.cta_m}, "
                f"cta_n={self.cta_n} split along wg_dim={self.wg_dim!r} between num_compute_wgs="
                f"{self.num_compute_wgs}) needs ~{regs} registers per thread (accumulator "
                f"{self.wg_m * self.wg_n // 128}, {self.k_chunks} partial(s) of {partial_columns} columns "
                f"{self.wg_m * partial_columns // 128} each, {scale_columns // 4} for {scale_columns} column "
                f"scales, {REGISTER_HEADROOM} headroom) > the {self.compute_registers} a compute warpgroup gets")

    def smem_bytes(self, out_dtype) -> int:
        """Shared memory: the pipeline stages (fp8 tiles and f32 scale vectors of k_chunks 128-K
        chunks each) + the output tile."""
        stage = ((self.cta_m + self.cta_n) * BLOCK_K + 4 * (self.cta_m + self.cta_n)) * self.k_chunks
        return self.stages * stage + self.cta_m * self.cta_n * jnp.dtype(out_dtype).itemsize + SMEM_SLACK


# 128 x 128 CTA tile, two 64 x 128 math warpgroups (DeepGEMM's dense shape), 4 stages: ~200 KB of
# shared memory with a float32 output tile, ~168 KB with bf16.
DEFAULT = Config()
# Forward and dgrad (sb_blocked): 3 stages, an 8-tile snake band and Warpgroup lowering semantics
# measured best overall in scripts/check_fp8_kernel.py on one H200 (2026-11-29): 952 / 889 / 1046
# TFLOP/s on 4096x7168x2048 / 4096x2048x7168 / 16384x7168x7168 vs DEFAULT's 888 / 807 / 1015.
BLOCKED = Config(stages=3, grid_tile_width=8, semantics="warpgroup")


def num_sms() -> int:
    """SMs of the first device: one persistent CTA each (the Pallas Mosaic GPU kernels' grid)."""
    dev = jax.devices()[0]
    return getattr(dev, "core_count", None) or 132  # H100/H200 SXM: 132


def _fp8_transforms():
    # 128-byte swizzle: one 128-element fp8 row of a K-tile is exactly one swizzle span
    # (hopper_matmul_mgpu.py computes the same with plgpu.find_swizzle).
    swizzle = plgpu.find_swizzle(BLOCK_K * 8, "fp8 K-tile")
    return (plgpu.TilingTransform((8, swizzle)), plgpu.SwizzleTransform(swizzle))


def swizzle_transforms(minor: int, dtype):
    """TMA/WGMMA tiling and swizzle for a shared-memory tile whose minor dimension holds `minor`
    elements of `dtype` (the widest swizzle that fits, at most 128 bytes)."""
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = plgpu.find_swizzle(minor * itemsize * 8, "shared-memory tile")
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def _kernel_call(a_MK, b_NK, saT_JM, sb_JN, out_dtype, cfg: Config, sb_blocked: bool, interpret=False,
                 num_ctas=None):
    """The pallas kernel on aligned operands: M % cta_m == N % cta_n == K % 128 == 0.

    sb_blocked: sb is constant over each 128-column block and a warpgroup's columns lie in one
    block, so one scalar of sb per step suffices (one FMA per element to promote, DeepGEMM's cost).
    """
    m, k = a_MK.shape
    n = b_NK.shape[0]
    cta_m, cta_n, wg_m, wg_n = cfg.cta_m, cfg.cta_n, cfg.wg_m, cfg.wg_n
    m_iters, n_iters, k_iters = m // cta_m, n // cta_n, k // BLOCK_K
    split_m = cfg.wg_dim == "m"
    fp8_transforms = _fp8_transforms()
    out_transforms = swizzle_transforms(wg_n, out_dtype)

    def get_pipeline(body, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k_iters,),
            memory_registers=40,
            in_specs=[
                plgpu.BlockSpec((cta_m, BLOCK_K), lambda kk: (0, kk), transforms=fp8_transforms),
                plgpu.BlockSpec((cta_n, BLOCK_K), lambda kk: (0, kk), transforms=fp8_transforms),
                plgpu.BlockSpec((1, cta_m), lambda kk: (kk, 0)),
                plgpu.BlockSpec((1, cta_n), lambda kk: (kk, 0)),
            ],
            wg_axis="wg",
            num_compute_wgs=cfg.num_compute_wgs,
            max_concurrent_steps=cfg.stages,
            compute_context=compute_context,
        )

    def body(a_gmem, b_gmem, sa_gmem, sb_gmem, out_gmem):
        ignore = lambda *_, **__: None  # allocations do not depend on the body (hopper_matmul)

        @functools.partial(
            pl.run_scoped,
            pipeline_allocs=get_pipeline(ignore, ignore).get_allocations(a_gmem, b_gmem, sa_gmem, sb_gmem),
            out_smem=plgpu.SMEM((cfg.num_compute_wgs, wg_m, wg_n), out_dtype, transforms=out_transforms),
            collective_axes="wg",
        )
        def _scope(pipeline_allocs, out_smem):
            wg_idx = lax.axis_index("wg")

            @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
            def _tile_loop(loop_info):
                (lin,) = loop_info.index
                mi, ni = plgpu.planar_snake(lin, (m_iters, n_iters), 1, cfg.grid_tile_width)
                # This warpgroup's rows/columns, relative to the CTA tile and absolute.
                wg_rows = pl.ds(wg_idx * wg_m, wg_m) if split_m else pl.ds(0, wg_m)
                wg_cols = pl.ds(0, wg_n) if split_m else pl.ds(wg_idx * wg_n, wg_n)
                out_rows = pl.ds(mi * cta_m + (wg_idx * wg_m if split_m else 0), wg_m)
                out_cols = pl.ds(ni * cta_n + (0 if split_m else wg_idx * wg_n), wg_n)

                def step(_, a_smem, b_smem, sa_smem, sb_smem, acc):
                    a_wg = a_smem.at[wg_rows] if split_m else a_smem
                    b_wg = b_smem if split_m else b_smem.at[wg_cols]

                    def load_scales():
                        sa = plgpu.load(sa_smem.at[0, wg_rows], layout=plgpu.Layout.WGMMA.reduce(1))
                        if sb_blocked:  # one scalar: sa[row] * sb[block]
                            return sa * sb_smem[0, wg_cols.start], None
                        return sa, plgpu.load(sb_smem.at[0, wg_cols], layout=plgpu.Layout.WGMMA.reduce(0))

                    def chunk_product(partial_ref):  # one 128-K chunk into a fresh accumulator
                        plgpu.wgmma(partial_ref, a_wg, b_wg.transpose((1, 0)))
                        scales = load_scales()  # while the WGMMA runs
                        return partial_ref[...], scales  # reading the accumulator waits for it

                    partial, (row_scale, col_scale) = pl.run_scoped(
                        chunk_product, plgpu.ACC((wg_m, wg_n), jnp.float32))
                    partial = partial * lax.broadcast_in_dim(row_scale, (wg_m, wg_n), [0])
                    if col_scale is not None:  # wgrad: per-column sb, one multiply more
                        partial = partial * lax.broadcast_in_dim(col_scale, (wg_m, wg_n), [1])
                    return acc + partial

                def compute_context(run_pipeline):
                    acc = plgpu.layout_cast(jnp.full((wg_m, wg_n), 0, dtype=jnp.float32), plgpu.Layout.WGMMA)
                    acc = run_pipeline(acc)
                    o_smem = out_smem.at[wg_idx]
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # previous tile's store read o_smem
                    o_smem[...] = acc.astype(out_dtype)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(o_smem, out_gmem.at[out_rows, out_cols])

                get_pipeline(step, compute_context)(
                    a_gmem.at[pl.ds(mi * cta_m, cta_m), :],
                    b_gmem.at[pl.ds(ni * cta_n, cta_n), :],
                    sa_gmem.at[:, pl.ds(mi * cta_m, cta_m)],
                    sb_gmem.at[:, pl.ds(ni * cta_n, cta_n)],
                    allocations=pipeline_allocs,
                )

            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # before out_smem goes out of scope

    semantics = (plgpu.LoweringSemantics.Lane if cfg.semantics == "lane"
                 else plgpu.LoweringSemantics.Warpgroup)
    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(num_ctas or num_sms(),),
        grid_names=("sm",),
        num_threads=cfg.num_compute_wgs + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=semantics),
        **({"interpret": interpret} if interpret else {}),
    )
    return kernel(a_MK, b_NK, saT_JM, sb_JN)


def unfit_reason(qa_MK, sa_MJ, qb_NK, sb_JN) -> str | None:
    """Why block_scaled_matmul cannot take these operands, or None when it can."""
    if qa_MK.ndim != 2 or qb_NK.ndim != 2 or sa_MJ.ndim != 2 or sb_JN.ndim != 2:
        return "operands must be 2-D"
    if qa_MK.dtype != FP8 or qb_NK.dtype != FP8:
        return f"operands {qa_MK.dtype}/{qb_NK.dtype} (the kernel takes float8_e4m3fn)"
    (m, k), (n, k2) = qa_MK.shape, qb_NK.shape
    j = -(-k // BLOCK_K)
    if k2 != k or sa_MJ.shape != (m, j) or sb_JN.shape != (j, n):
        return (f"shapes a {qa_MK.shape}, sa {sa_MJ.shape}, b^T {qb_NK.shape}, sb {sb_JN.shape} "
                f"do not fit a [M, K], sa [M, ceil(K/128)], b^T [N, K], sb [ceil(K/128), N]")
    if min(m, n, k) == 0:
        return "an empty dimension"
    return None


def _pad_to(x, axis, multiple):
    pad = -x.shape[axis] % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def block_scaled_matmul(qa_MK, sa_MJ, qb_NK, sb_JN, out_dtype=jnp.float32, config: Config | None = None,
                        *, sb_blocked: bool = False, interpret=False, num_ctas: int | None = None):
    """y [M, N] (out_dtype) = sum_j (qa[:, chunk j] @ qb[:, chunk j]^T) * sa[:, j, None] * sb[None, j, :].

    qa [M, K] and qb [N, K] float8_e4m3fn (both K-major), sa [M, ceil(K/128)] and sb [ceil(K/128), N]
    float32. Accumulates in float32, promoted every 128 K. Raises ValueError for unfit operands.
    sb_blocked=True promises that sb is constant over each 128-column block (forward and dgrad,
    where b's scales are 128x128 blocks): the kernel then reads one sb per warpgroup and step.
    `interpret` (Pallas's Mosaic GPU interpreter, CPU) and `num_ctas` (default: one per SM) are for
    testing.
    """
    cfg = config or (BLOCKED if sb_blocked else DEFAULT)
    cfg.check()
    if cfg.m_grouped_only:
        raise ValueError(f"{cfg}: block_scaled_matmul takes one 128-K chunk per step (k_chunks=1) and "
                         f"unchained tiles (chain=False)")
    if (smem := cfg.smem_bytes(out_dtype)) > SMEM_LIMIT:
        raise ValueError(f"{cfg} with {jnp.dtype(out_dtype).name} output needs ~{smem} B of shared memory "
                         f"(> {SMEM_LIMIT}); use fewer stages")
    if (reason := unfit_reason(qa_MK, sa_MJ, qb_NK, sb_JN)) is not None:
        raise ValueError(f"block_scaled_matmul cannot take these operands: {reason}")
    m, n = qa_MK.shape[0], qb_NK.shape[0]
    # Zero padding: a padded K column or M/N row is a zero q and adds nothing (its scale is 0 too).
    a = _pad_to(_pad_to(qa_MK, 1, BLOCK_K), 0, cfg.cta_m)
    b = _pad_to(_pad_to(qb_NK, 1, BLOCK_K), 0, cfg.cta_n)
    sa_JM = _pad_to(sa_MJ.astype(jnp.float32).T, 1, cfg.cta_m)
    sb = _pad_to(sb_JN.astype(jnp.float32), 1, cfg.cta_n)
    sb_blocked = sb_blocked and BLOCK_K % cfg.wg_n == 0  # else a warpgroup spans several blocks
    y = _kernel_call(a, b, sa_JM, sb, jnp.dtype(out_dtype), cfg, sb_blocked, interpret, num_ctas)
    if y.shape != (m, n):
        y = y[:m, :n]
    return y
