"""Where device time goes: run a function under jax.profiler and total its kernels by XLA op.

    p = profile(step, state, batch, repeat=3)
    print(p.table(top=25))       # op, calls per run, ms per run, share of busy time
    p.busy_s, p.wall_s           # device-busy vs wall seconds per run: launch gaps show as the difference

Reads the trace JAX writes (an XSpace protobuf) with `jax.profiler.ProfileData`, so it needs no
TensorBoard. On GPU the events are the CUPTI kernel and memcpy records of every stream of
/device:GPU:*; each is attributed to its `hlo_op` stat (the fusion, custom call or copy that
launched it) or, without one, to the kernel name. On CPU (tests, dry runs) XLA's thunks run on
host threads and carry the same `hlo_op` stat, so the same summary comes out; busy time there is
the union of those intervals. Busy time is the union of event intervals over all streams, so
concurrent streams are not double-counted; per-op totals are plain sums.
"""

from __future__ import annotations

import glob
import os
import re
import tempfile
import time
from collections import defaultdict
from typing import NamedTuple

import jax


class OpTime(NamedTuple):
    name: str
    calls: float  # per run
    seconds: float  # per run
    source: str = ""  # the framework op behind it (the trace's tf_op / long_name stat), when recorded


class Profile(NamedTuple):
    wall_s: float  # per run
    busy_s: float  # per run: union of kernel intervals
    kernels: float  # kernel launches per run
    ops: list  # OpTime, longest first

    def table(self, top: int = 25) -> str:
        lines = [f"wall {self.wall_s * 1e3:9.3f} ms   device busy {self.busy_s * 1e3:9.3f} ms "
                 f"({self.busy_s / max(self.wall_s, 1e-12):.0%})   {self.kernels:,.0f} kernels per run",
                 f"{'op':70s} {'calls':>7s} {'ms':>9s} {'share':>6s}"]
        for op in self.ops[:top]:
            lines.append(f"{op.name[:70]:70s} {op.calls:7.1f} {op.seconds * 1e3:9.3f} "
                         f"{op.seconds / max(self.busy_s, 1e-12):6.1%}  {op.source[-90:]}")
        rest = sum(op.seconds for op in self.ops[top:])
        if rest:
            lines.append(f"{'(' + str(len(self.ops) - top) + ' more ops)':70s} {'':7s} {rest * 1e3:9.3f}")
        lines.append("by kind (op names without their numeric suffix): " + ", ".join(
            f"{kind} {seconds * 1e3:.1f} ms" for kind, seconds in self.kinds()[:12]))
        return "\n".join(lines)

    def kinds(self) -> list:
        """(kind, seconds per run), longest first: ops grouped by name without the ".N" suffix."""
        totals = defaultdict(float)
        for op in self.ops:
            totals[re.sub(r"[._]\d+$", "", op.name)] += op.seconds
        return sorted(totals.items(), key=lambda kv: -kv[1])

    def as_dict(self, top: int = 40) -> dict:
        return {"wall_s": self.wall_s, "busy_s": self.busy_s, "kernels": self.kernels,
                "kinds": dict(self.kinds()), "ops": [op._asdict() for op in self.ops[:top]]}


CONTAINERS = ("while", "conditional", "call")  # CPU thunks that span the ops they run


SOURCE_STATS = ("long_name", "tf_op")  # what the trace says an HLO op came from (empty "XlaModule:" skipped)


def _source(stats: dict) -> str:
    return next((str(stats[k]) for k in SOURCE_STATS if stats.get(k) and not str(stats[k]).endswith(":")), "")


def _events(space_path: str):
    """(op name, start ns, duration ns, source) of every device kernel in the trace, or of every
    XLA thunk on the host when the trace has no device plane (CPU)."""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(space_path)
    planes = list(data.planes)
    device = [p for p in planes if p.name.startswith("/device:")]
    out = []
    for plane in device:
        for line in plane.lines:
            if not (line.name.startswith("Stream") or line.name == "XLA Ops"):
                continue
            for e in line.events:
                stats = dict(e.stats)
                out.append((str(stats.get("hlo_op") or e.name), e.start_ns, e.duration_ns, _source(stats)))
    if out:
        return out
    for plane in planes:
        if plane.name.startswith("/host:CPU"):
            for line in plane.lines:
                for e in line.events:
                    stats = dict(e.stats)
                    op = stats.get("hlo_op")
                    if op and not str(op).lower().startswith(CONTAINERS):
                        out.append((str(op), e.start_ns, e.duration_ns, _source(stats)))
    return out


def _union_ns(intervals) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def summarize(space_path: str, runs: int, wall_s: float) -> Profile:
    events = _events(space_path)
    by_op = defaultdict(lambda: [0, 0.0, ""])
    for name, _, dur, source in events:
        by_op[name][0] += 1
        by_op[name][1] += dur
        by_op[name][2] = by_op[name][2] or source
    ops = sorted((OpTime(n, c / runs, ns * 1e-9 / runs, src) for n, (c, ns, src) in by_op.items()),
                 key=lambda o: -o.seconds)
    busy = _union_ns((s, s + d) for _, s, d, _ in events) * 1e-9 / runs
    return Profile(wall_s, busy, len(events) / runs, ops)


def profile(fn, *args, repeat: int = 3, trace_dir: str | None = None) -> Profile:
    """Calls `fn(*args)` once untraced (compile, warm-up), then `repeat` times under the profiler,
    waiting for the outputs; per-run figures. The trace stays in `trace_dir` when one is given
    (open it in TensorBoard or Perfetto for the timeline)."""
    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as tmp:
        where = trace_dir or tmp
        jax.profiler.start_trace(where)
        try:
            t0 = time.perf_counter()
            for _ in range(repeat):
                out = fn(*args)
                jax.block_until_ready(out)
            wall = (time.perf_counter() - t0) / repeat
        finally:
            jax.profiler.stop_trace()
        spaces = sorted(glob.glob(os.path.join(where, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
        if not spaces:
            raise RuntimeError(f"jax.profiler wrote no trace under {where}")
        return summarize(spaces[-1], repeat, wall)
