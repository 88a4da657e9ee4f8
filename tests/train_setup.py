"""Shared tiny training setup for the training tests (and their subprocess children)."""

from __future__ import annotations

import numpy as np

import presets
from dsjax.config import Config, MeshConfig, replace


def tiny_config(mesh=(1, 1, 1), **overrides) -> Config:
    c = presets.load("tiny")
    c = replace(c, mesh=MeshConfig(*mesh), **{"data.seq_len": 64, "train.batch_size": 8, "train.log_every": 1})
    return replace(c, **overrides) if overrides else c


def random_batch(seed: int, b: int = 8, t: int = 64, vocab: int = 259) -> dict:
    """A packed-looking batch: two documents per row, positions restarting, no loss across them."""
    r = np.random.RandomState(seed)
    tokens = r.randint(0, vocab, (b, t + 1)).astype(np.int32)
    cut = t // 2
    seg = np.where(np.arange(t) < cut, 1, 2).astype(np.int32)[None].repeat(b, 0)
    pos = np.concatenate([np.arange(cut), np.arange(t - cut)]).astype(np.int32)[None].repeat(b, 0)
    mask = np.ones((b, t), np.float32)
    mask[:, cut - 1] = 0.0  # the target of the last token of document 1 belongs to document 2
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask, "segment_ids": seg,
            "positions": pos}
