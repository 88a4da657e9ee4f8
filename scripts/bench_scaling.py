"""Multi-GPU scaling of the train step: tokens/s per device on several meshes, in one run.

    python scripts/bench.py scaling --config=configs/small.py --meshes=1.1.1,1.2.1,2.1.1      # 2 GPUs
    python scripts/bench.py scaling --config=configs/small.py --meshes=1.1.1,1.4.1,2.2.1,4.1.1  # 4 GPUs
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python scripts/bench.py scaling \
        --config=configs/tiny.py --meshes=1.1.1,1.2.1,2.2.1 --steps=2                          # CPU check

Each mesh is data.expert.tensor over the first data·expert·tensor devices of this process. Weak
scaling: the global batch is --per_device_batch × data × expert (the batch axes), so every device
does the same work as in the one-device row, and
    efficiency = (tokens/s per device on the mesh) / (tokens/s of the first mesh, per device).
Expert parallelism (expert > 1) exchanges tokens between devices with the configured all-to-all
(config.moe.expert_parallel) in every MoE layer; data parallelism all-reduces the gradients.
Each row also gives the (token, expert) pairs the MoE layers dropped in the last timed step
(`moe.ep_pair_capacity` under expert parallelism, or capacity dispatch; 0 when dropless).
Writes bench_scaling.json under $OUT (or --out) and prints a table.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py preset", lock_config=True)
_MESHES = flags.DEFINE_list("meshes", ["1.1.1", "1.2.1", "2.1.1"], "data.expert.tensor meshes; the first is the base")
_PER_DEVICE = flags.DEFINE_integer("per_device_batch", None, "sequences per batch-axis device (default: the "
                                   "config's train.batch_size, i.e. its one-device batch)")
_STEPS = flags.DEFINE_integer("steps", 5, "timed steps per mesh")
_OUT = flags.DEFINE_string("out", os.environ.get("OUT", "."), "directory for bench_scaling.json")


def main(argv):
    del argv
    import jax

    from dsjax.config import MeshConfig, from_config_dict, replace, validate
    from dsjax.timing import step_seconds
    from dsjax.train import flops

    base = from_config_dict(_CONFIG.value)
    per_device = _PER_DEVICE.value or base.train.batch_size
    t = base.data.seq_len
    use_mtp = base.model.mtp.num_nextn_predict_layers > 0 and base.train.mtp_weight > 0
    moe_layers = base.model.num_moe_layers + (base.model.mtp.num_nextn_predict_layers if use_mtp else 0)
    pairs_per_token = base.model.moe.num_experts_per_tok * moe_layers  # routed (token, expert) pairs
    rows, result = [], {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "devices": jax.device_count(),
                        "per_device_batch": per_device, "seq_len": t, "meshes": {}}
    for spec in _MESHES.value:
        d, e, tp = (int(v) for v in spec.split("."))
        n = d * e * tp
        if n > jax.device_count():
            print(f"mesh {spec}: needs {n} devices, this process has {jax.device_count()}; skipped", flush=True)
            continue
        batch = per_device * d * e
        config = validate(replace(base, mesh=MeshConfig(d, e, tp, base.mesh.fsdp), **{"train.batch_size": batch}), n)
        try:
            seconds, compile_s, metrics = step_seconds(config, _STEPS.value)
        except Exception as err:  # a mesh that does not fit or compile is recorded, not fatal
            result["meshes"][spec] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
            print(f"mesh {spec}: FAILED {result['meshes'][spec]['error']}", flush=True)
            continue
        per_dev = batch * t / seconds / n
        pairs = batch * t * pairs_per_token
        row = {"devices": n, "batch": batch, "step_seconds": seconds, "tokens_per_s": batch * t / seconds,
               "tokens_per_s_per_device": per_dev, "compile_seconds": compile_s, "loss": metrics["loss"],
               "dropped_pairs": metrics.get("dropped_pairs", 0), "routed_pairs": pairs,
               "mfu": flops.mfu(config.model, batch, t, use_mtp, seconds, config.train.peak_tflops, n)}
        rows.append(row)
        row["efficiency"] = per_dev / rows[0]["tokens_per_s_per_device"]
        result["meshes"][spec] = row
        print(f"mesh {spec:8s} {n} devices  batch {batch:4d}  {seconds * 1e3:8.1f} ms/step  "
              f"{row['tokens_per_s']:10,.0f} tokens/s  {per_dev:9,.0f} per device  "
              f"efficiency {row['efficiency']:6.1%}  MFU {row['mfu']:.1%}  "
              f"dropped {row['dropped_pairs']:,} of {pairs:,} pairs (last step)", flush=True)
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "bench_scaling.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
