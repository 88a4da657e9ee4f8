"""Packing documents into fixed-length rows with segment ids, so attention never crosses documents.

DeepSeek-V3 packs its pretraining data with "document packing" (§4.1, after Ding et al. 2024) and
no cross-sample attention mask; for SFT it masks across samples (§5.1 is silent; its codebase never
shipped). dsjax always masks: every row carries segment ids and restarted positions, and the
model's attention keeps a query to keys of its own segment.

A document is `[bos] + ids + [eos]` (n tokens, n − 1 next-token pairs). Its pairs are cut into
chunks of at most `seq_len` pairs: chunk c has `tokens = doc[c·L : c·L + L]` and
`targets = doc[c·L + 1 : c·L + L + 1]`, i.e. windows of L + 1 tokens overlapping by one, so every
pair of the document is trained on exactly once and no target is taken from the next document.
A chunk after the first starts at position 0 with no context: attention sees one chunk only.
Chunks are packed into rows of `seq_len` by grain's first-fit packer (`FirstFitPackIterDataset`,
`num_packing_bins` open rows, rows emitted in order once a chunk fits none of them).

One row, all int32 [seq_len] but loss_mask (float32):

    tokens       inputs; pad_id on padding
    targets      the next token of the same document (the train step never shifts); pad_id on padding
    loss_mask    1.0 on every real pair, 0.0 on padding; a target never crosses a document boundary
    segment_ids  0 on padding, 1, 2, … per chunk within the row
    positions    0, 1, … within each chunk; 0 on padding
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import grain
import numpy as np

from dsjax.data.tokenizer import Tokenizer, encode_document

BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class Tokenize:
    """text -> int32 [bos] + ids + [eos] (a picklable callable, for grain worker processes)."""

    tokenizer: Tokenizer

    def __call__(self, text: str) -> np.ndarray:
        return encode_document(self.tokenizer, text)


class ChunkDocument(grain.experimental.FlatMapTransform):
    """One tokenized document -> its chunks {"tokens", "targets"} of at most seq_len pairs each."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self.max_fan_out = 2**31 - 1  # unused by the IterDataset flat map: documents may be any length

    def flat_map(self, ids: np.ndarray) -> list[dict[str, np.ndarray]]:
        pairs = len(ids) - 1
        return [{"tokens": ids[start:min(start + self.seq_len, pairs)],
                 "targets": ids[start + 1:min(start + self.seq_len, pairs) + 1]}
                for start in range(0, pairs, self.seq_len)]


def pack(chunks: grain.IterDataset, seq_len: int, pad_id: int, num_packing_bins: int) -> grain.IterDataset:
    """Chunks -> rows in the format above (grain first-fit packing; its state is exact on restore)."""
    packed = grain.experimental.FirstFitPackIterDataset(
        chunks,
        length_struct={"tokens": seq_len, "targets": seq_len},
        num_packing_bins=num_packing_bins,
        shuffle_bins=False,  # documents are shuffled upstream; rows keep their order
        padding_struct={"tokens": pad_id, "targets": pad_id},
    )
    return packed.map(_to_row)


def _to_row(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    segment_ids = packed["tokens_segment_ids"].astype(np.int32)
    return {
        "tokens": packed["tokens"].astype(np.int32),
        "targets": packed["targets"].astype(np.int32),
        "loss_mask": (segment_ids > 0).astype(np.float32),
        "segment_ids": segment_ids,
        "positions": np.where(segment_ids > 0, packed["tokens_positions"], 0).astype(np.int32),
    }


def empty_row(seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """A row of padding only (fills an eval batch that ran out of documents)."""
    return {
        "tokens": np.full((seq_len,), pad_id, np.int32),
        "targets": np.full((seq_len,), pad_id, np.int32),
        "loss_mask": np.zeros((seq_len,), np.float32),
        "segment_ids": np.zeros((seq_len,), np.int32),
        "positions": np.zeros((seq_len,), np.int32),
    }


@dataclasses.dataclass(frozen=True)
class StackRows:
    """grain batch_fn: stacks rows to [batch_size, seq_len], padding a short last batch with empty rows."""

    batch_size: int
    seq_len: int
    pad_id: int

    def __call__(self, rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        rows = list(rows) + [empty_row(self.seq_len, self.pad_id)] * (self.batch_size - len(rows))
        return {key: np.stack([row[key] for row in rows]) for key in BATCH_KEYS}
