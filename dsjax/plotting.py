"""PNG plots of a run's metrics.jsonl (loss curves, GRPO reward and accuracy)."""

from __future__ import annotations

import json
import os
from typing import Sequence


def read_metrics(path: str) -> list[dict]:
    """Rows of metrics.jsonl; a step logged twice (a crash between log and checkpoint) keeps the last."""
    rows: dict[int, dict] = {}
    if not os.path.exists(path):
        return []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                row = json.loads(line)
                rows[int(row["step"])] = row
    return [rows[k] for k in sorted(rows)]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(rows: list, key: str) -> list:
    """(step, value) of every row that logged `key` as a number."""
    return [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]


def _save(fig, out_png: str, title: str) -> str:
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    _pyplot().close(fig)
    return out_png


def plot_metrics(metrics_path: str, keys: Sequence[str], out_png: str, title: str = "") -> str | None:
    """One panel per key present in the log; returns the PNG path (None if nothing to plot)."""
    plt = _pyplot()
    rows = read_metrics(metrics_path)
    keys = [k for k in keys if any(isinstance(r.get(k), (int, float)) for r in rows)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = _series(rows, key)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 40 else None)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    return _save(fig, out_png, title)


def plot_overlay(runs: dict, key: str, out_png: str, title: str = "") -> str | None:
    """One panel: `key` against step for several runs ({label: metrics rows}) on shared axes, and
    below it each later run's relative difference to the first (how closely they track)."""
    plt = _pyplot()
    curves = {label: _series(rows, key) for label, rows in runs.items()}
    curves = {label: pts for label, pts in curves.items() if pts}
    if not curves:
        return None
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.5, 5.2), sharex=True, gridspec_kw={"height_ratios": [3, 1.4]})
    for label, pts in curves.items():
        top.plot([p[0] for p in pts], [p[1] for p in pts], label=label)
    base_label, base = next(iter(curves.items()))
    base_at = dict(base)
    for label, pts in list(curves.items())[1:]:
        common = [(s, v) for s, v in pts if s in base_at and base_at[s]]
        bottom.plot([s for s, _ in common], [100 * (v - base_at[s]) / base_at[s] for s, v in common], label=label)
    top.set_ylabel(key)
    top.legend()
    top.grid(alpha=0.3)
    bottom.axhline(0, color="gray", lw=0.8)
    bottom.set_ylabel(f"% vs {base_label}")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    return _save(fig, out_png, title)
