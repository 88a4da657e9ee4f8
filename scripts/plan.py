"""Per-device memory, all-to-all bytes and FLOPs of a training step on a mesh, with no weights and no
accelerator: analytically (dsjax/plan.py), and checked against XLA's compiled step on fake CPU devices.

    # the 671B preset on a 64-device mesh; --check compiles the real step at reduced depth and
    # prints analytic and compiled bytes side by side
    python scripts/plan.py --config=configs/deepseek_v3.py --config.mesh.data=2 \
        --config.mesh.expert=16 --config.mesh.tensor=2 --config.train.batch_size=32 --check

    # every data x expert x tensor mesh of 2,048 80-GB GPUs for V3's 15,360 x 4K batch: which fit,
    # with which knobs; --check compiles the chosen one on 2,048 fake devices
    python scripts/plan.py --config=configs/deepseek_v3.py --devices=2048 --global_batch=15360 --check

--check sets XLA_FLAGS=--xla_force_host_platform_device_count=<mesh size> before jax loads (unless
XLA_FLAGS already names a device count). Sizes are GiB (2^30 bytes).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py preset", lock_config=True)
_CHECK = flags.DEFINE_bool("check", False, "also compile the real step on fake CPU devices and compare")
_CHECK_MOE_LAYERS = flags.DEFINE_integer("check_moe_layers", 2, "MoE layers kept for --check (-1: full depth); "
                                         "2 keeps the MoE scan a loop (XLA inlines a 1-trip loop)")
_DEVICES = flags.DEFINE_integer("devices", 0, "search every mesh over this many devices (0: use config.mesh)")
_DEVICE_GIB = flags.DEFINE_float("device_gib", 80.0, "memory per device, GiB")
_USABLE = flags.DEFINE_float("usable_fraction", 0.9, "share of device memory the step may plan on "
                             "(the rest: CUDA context, NCCL buffers, fragmentation)")
_MAX_TENSOR = flags.DEFINE_integer("max_tensor", 8, "largest tensor axis (one NVLink node)")
_GLOBAL_BATCH = flags.DEFINE_integer("global_batch", 0, "sequences per step for --devices (0: train.batch_size)")
_TOP = flags.DEFINE_integer("top", 12, "meshes shown by --devices")
_JSON = flags.DEFINE_string("json", None, "also write the figures to this JSON file")

GIB = 2**30


def gib(x: float) -> str:
    return f"{x / GIB:9.2f}"


def _mesh_name(mesh) -> str:
    return f"data {mesh[0]} x expert {mesh[1]} x tensor {mesh[2]}"


def _describe(config) -> str:
    m, t = config.model, config.train
    return (f"{m.num_hidden_layers} layers ({m.num_dense_layers} dense) + {m.mtp.num_nextn_predict_layers} MTP, "
            f"batch {t.batch_size} x {config.data.seq_len} in {t.microbatches} microbatch(es), remat {m.remat}, "
            f"fsdp {config.mesh.fsdp}, moments {'bf16/bf16' if t.bf16_moments else 'f32/f32'}, "
            f"dispatch {m.moe.dispatch}, grouped_gemm {m.moe.grouped_gemm}, attention {m.attention}")


def print_plan(plan, config, budget):
    print(f"\n{_mesh_name(plan.mesh)}: {_describe(config)}")
    s = plan.state
    rows = [("parameters", s.params), ("gradients", plan.gradients),
            ("gradient accumulator (microbatches > 1)", plan.accumulator), ("optimizer state", s.opt_state),
            ("router bias + batch + scalars", s.router + plan.batch + s.scalars)]
    rows += [(f"activations: {k}", v) for k, v in plan.activations.items()]
    for name, value in rows:
        print(f"  {name:42s}{gib(value)} GiB")
    verdict = "fits" if plan.total <= budget else "does NOT fit"
    largest = max(rows, key=lambda r: r[1])[0]
    print(f"  {'total':42s}{gib(plan.total)} GiB   {verdict} in {gib(budget).strip()} GiB; largest: {largest}")
    a = plan.all_to_all
    if plan.moe_layers and a.fixed:
        print(f"  all-to-all sent per device per MoE layer per step: fixed buffers {gib(a.fixed).strip()} GiB, "
              f"ragged <= {gib(a.ragged_worst).strip()} GiB (uniform routing {gib(a.ragged_uniform).strip()} GiB); "
              f"{a.off_device:.0%} leaves the device; x {plan.moe_layers} MoE layers = "
              f"{plan.moe_layers * a.fixed / 2**40:.2f} TiB fixed, {plan.moe_layers * a.ragged_uniform / 2**40:.2f} "
              f"TiB ragged (uniform) per step")
    print(f"  model FLOPs per token {plan.flops_per_token / 1e9:.1f} G; per device per step "
          f"{plan.flops_per_token * plan.tokens_per_device / 1e15:.2f} PFLOP "
          f"({plan.tokens_per_device} tokens)")


def compare(config, mesh) -> dict:
    """Analytic vs compiled for `config` (already reduced and CPU-compilable) on `mesh`."""
    from dsjax import plan as plan_lib

    ana = plan_lib.analytic(config)
    comp = plan_lib.compiled(config, mesh)
    print(f"\nanalytic vs XLA:CPU compiled, {_mesh_name(ana.mesh)}: {_describe(config)}")
    print(f"  {'per device, GiB':40s}{'analytic':>10s}{'compiled':>10s}{'ratio':>8s}")
    rows = [("parameters", ana.state.params, comp.params),
            ("gradients", ana.gradients, comp.gradients),
            ("optimizer state", ana.state.opt_state, comp.opt_state),
            ("step arguments (state + batch)", ana.state.params + ana.state.opt_state + ana.state.router
             + ana.state.scalars + ana.batch, comp.step_arguments),
            ("activations (+ accumulator): grad temp", ana.activation_total + ana.accumulator, comp.grads_temp),
            ("activations + grads (step temp)", ana.activation_total + ana.gradients + ana.accumulator,
             comp.step_temp),
            ("step peak", ana.total, comp.step_peak)]
    for name, a, c in rows:
        print(f"  {name:40s}{gib(a):>10s}{gib(c):>10s}{c / a if a else float('nan'):8.3f}")
    for name, value in ana.activations.items():
        print(f"    analytic {name:28s}{gib(value)}")
    print(f"  gradients with their layout left to XLA: {gib(comp.gradients_xla_layout).strip()} GiB")
    print(f"  compile: step {comp.step_compile_s:.1f} s, gradients {comp.grads_compile_s:.1f} s")
    return {"analytic": _plan_json(ana), "compiled": comp._asdict()}


def _plan_json(plan) -> dict:
    out = dataclasses.asdict(plan)
    out["state"] = plan.state._asdict()
    out["all_to_all"] = plan.all_to_all._asdict()
    out["total"] = plan.total
    return out


def search(config, budget) -> tuple:
    """Every mesh over --devices, each with the fewest knobs that fit; returns the chosen config."""
    from dsjax import plan as plan_lib

    batch = _GLOBAL_BATCH.value or config.train.batch_size
    results = []
    for mesh in plan_lib.meshes(config, _DEVICES.value, _MAX_TENSOR.value):
        base = plan_lib.on_mesh(config, mesh, batch)
        labels, fitted, plan = plan_lib.fit(base, budget)
        what_if = plan_lib.analytic(fitted, ep_buffers="expected").total
        results.append((plan.total > budget, len(labels), plan.total, mesh, labels, plan, fitted, what_if))
    results.sort(key=lambda r: r[:3])
    print(f"\n{_DEVICES.value} devices of {_DEVICE_GIB.value:g} GiB (plan on {gib(budget).strip()} GiB), "
          f"global batch {batch} x {config.data.seq_len}, 1 row per device per microbatch; knobs tried in order: "
          + ", ".join(label for label, _ in plan_lib.KNOBS))
    print("  (GiB per device; 'EP what-if': the same with expert-parallel buffers sized at capacity_factor x "
          "their mean instead of the worst case, which dsjax does not implement)")
    print(f"  {'mesh':36s}{'params':>8s}{'grads':>8s}{'optim':>8s}{'activ':>8s}{'total':>8s}  fits"
          f"{'EP what-if':>12s}  knobs")
    for bad, _, total, mesh, labels, plan, _, what_if in results[:_TOP.value]:
        s, grads = plan.state, plan.gradients + plan.accumulator
        print(f"  {_mesh_name(mesh):36s}{s.params / GIB:8.1f}{grads / GIB:8.1f}{s.opt_state / GIB:8.1f}"
              f"{plan.activation_total / GIB:8.1f}{total / GIB:8.1f}  {'no ' if bad else 'yes'}"
              f"{what_if / GIB:12.1f}  {', '.join(labels) or '-'}")
    bad, _, _, mesh, labels, plan, chosen, _ = results[0]
    print_plan(plan, chosen, budget)
    print(f"\nverdict: {'NO mesh fits' if bad else 'fits'}: best {_mesh_name(mesh)} with "
          f"{', '.join(labels) or 'the config as is'}")
    if bad:
        best = min(results, key=lambda r: r[7])
        labels, fitted, what_if = plan_lib.fit(plan_lib.on_mesh(config, best[3], batch), budget, "expected")
        print(f"  with expert-parallel buffers sized at capacity_factor x their mean (not in dsjax) the best is "
              f"{_mesh_name(best[3])} with {', '.join(labels) or 'the config as is'}: {what_if.total / GIB:.1f} GiB "
              f"({'fits' if what_if.total <= budget else 'still does not fit'})")
        print_plan(what_if, fitted, budget)
    return chosen, [{"mesh": r[3], "fits": not r[0], "knobs": r[4], "total": r[2], "ep_what_if_total": r[7]}
                    for r in results]


def main(argv):
    del argv
    from dsjax.config import from_config_dict

    config = from_config_dict(_CONFIG.value)
    if _CHECK.value and "device_count" not in os.environ.get("XLA_FLAGS", ""):
        count = _DEVICES.value or config.mesh.data * config.mesh.expert * config.mesh.tensor
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={count}").strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from dsjax import plan as plan_lib
    from dsjax import sharding as shd

    budget = _DEVICE_GIB.value * GIB * _USABLE.value
    out: dict = {}
    if _DEVICES.value:
        config, out["meshes"] = search(config, budget)
    else:
        plan = plan_lib.analytic(config)
        print_plan(plan, config, budget)
        out["plan"] = _plan_json(plan)
    if _CHECK.value:
        import jax

        reduced = config if _CHECK_MOE_LAYERS.value < 0 else plan_lib.reduced_depth(config, _CHECK_MOE_LAYERS.value)
        reduced = plan_lib.cpu_compilable(reduced)
        mesh = shd.make_mesh(reduced.mesh, jax.devices())
        out["check"] = compare(reduced, mesh)
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
