"""The grain input pipeline: documents -> tokens -> chunks -> packed rows -> this process's batches.

Built on grain's dataset API (`MapDataset` / `IterDataset`) rather than `grain.DataLoader`: every
stage is a grain transformation whose iterator state is a small dict of integers (an index into
the document stream, offsets inside the chunker, window shuffle and packer), restored by
replaying from the start of the current packing round. So `get_state()` is JSON, cheap to take,
and `set_state()` resumes exactly: the batches after a restore equal those of an uninterrupted
iterator. The iterator is also an orbax `StatefulCheckpointable` (grain's `save`/`load`).

Train order, per process (`process_index` of `process_count`):

    documents(train)[process_index::process_count]      disjoint shards, one per process
      .shuffle(seed).repeat(num_epochs)                  a new permutation every epoch
      .map(tokenize) -> to_iter_dataset
      -> chunks of <= seq_len pairs -> window shuffle     mixes the chunks of long documents
      -> first-fit packing -> batches of batch_size // process_count rows

The arithmetic stream skips both shuffles: its problems are i.i.d. draws already, and grain's
index shuffle costs 30-200 us an element. The eval iterator reads the held-out split once,
unshuffled, and pads its last batch with empty rows; with `num_batches` it yields exactly that
many batches (empty ones after the shard runs out), so every process of a multi-host eval steps
the same number of times.

`DataIterator` wraps grain's iterator to stamp its state with the settings that fix the batch
sequence, so a state restored into another pipeline (seed, seq_len, batch, shard, corpus size)
fails loudly instead of silently reading other data. With `data.num_workers > 0` batches are
built in grain worker processes (`mp_prefetch`): deterministic, but the order depends on
num_workers, and the state holds one position per worker.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Optional

import grain
import numpy as np

from dsjax.config import ConfigError, DataConfig
from dsjax.data import packing, sources
from dsjax.data.tokenizer import Tokenizer

NUM_PACKING_BINS = 32  # open rows of the first-fit packer: more bins, less padding
CHUNK_SHUFFLE_WINDOW = 512  # chunks mixed per window (train only)
READ_OPTIONS = grain.ReadOptions(num_threads=0)  # per-document work is GIL-bound: use num_workers


class DataIterator(grain.DatasetIterator):
    """Batches of numpy arrays; `get_state()` is a JSON-ready dict, `set_state()` resumes exactly."""

    def __init__(self, parent: grain.DatasetIterator, settings: dict[str, Any], num_batches: Optional[int],
                 empty_batch: dict[str, np.ndarray]):
        super().__init__(parent)
        self._settings = json.loads(json.dumps(settings))  # as it will read back from a checkpoint
        self._num_batches = num_batches
        self._empty_batch = empty_batch
        self._batches = 0

    def __next__(self) -> dict[str, np.ndarray]:
        if self._num_batches is not None and self._batches >= self._num_batches:
            raise StopIteration
        try:
            batch = next(self._parent)
        except StopIteration:
            if self._num_batches is None:
                raise
            batch = copy.deepcopy(self._empty_batch)
        self._batches += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"settings": self._settings, "batches": self._batches, "grain": self._parent.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        saved = state["settings"]
        if saved != self._settings:
            diff = {k: (saved.get(k), self._settings.get(k)) for k in sorted(set(saved) | set(self._settings))
                    if saved.get(k) != self._settings.get(k)}
            raise ValueError(f"data iterator state was saved by another pipeline; (saved, now) differ in {diff}")
        self._parent.set_state(state["grain"])
        self._batches = state["batches"]


def make_train_iterator(data_config: DataConfig, tokenizer: Tokenizer, *, batch_size: int,
                        seq_len: Optional[int] = None, process_index: Optional[int] = None,
                        process_count: Optional[int] = None, num_epochs: Optional[int] = None) -> DataIterator:
    """This process's training batches (endless when num_epochs is None); batch_size is global."""
    return _make_iterator(data_config, tokenizer, "train", batch_size=batch_size, seq_len=seq_len,
                          process_index=process_index, process_count=process_count, num_epochs=num_epochs)


def make_eval_iterator(data_config: DataConfig, tokenizer: Tokenizer, *, batch_size: int,
                       seq_len: Optional[int] = None, process_index: Optional[int] = None,
                       process_count: Optional[int] = None, num_batches: Optional[int] = None) -> DataIterator:
    """This process's held-out batches, one pass in a fixed order; exactly num_batches when given."""
    return _make_iterator(data_config, tokenizer, "heldout", batch_size=batch_size, seq_len=seq_len,
                          process_index=process_index, process_count=process_count, num_epochs=1,
                          num_batches=num_batches)


def _make_iterator(config: DataConfig, tokenizer: Tokenizer, split: str, *, batch_size: int,
                   seq_len: Optional[int], process_index: Optional[int], process_count: Optional[int],
                   num_epochs: Optional[int], num_batches: Optional[int] = None) -> DataIterator:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    seq_len = config.seq_len if seq_len is None else seq_len
    if seq_len < 1:
        raise ConfigError(f"config field 'data.seq_len': must be >= 1, got {seq_len}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is outside [0, process_count={process_count})")
    if batch_size < 1 or batch_size % process_count:
        raise ConfigError(f"config field 'train.batch_size': {batch_size} sequences do not divide over "
                          f"{process_count} processes")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None (endless) or >= 1, got {num_epochs}")
    local_batch = batch_size // process_count
    shuffle = split == "train" and config.source != "arithmetic"

    docs_all = sources.documents(config, split)
    docs = docs_all[process_index::process_count]
    if split == "train" and len(docs) == 0:
        raise ValueError(f"process {process_index} of {process_count} gets no training documents: source "
                         f"{config.source!r} has {len(docs_all)} after holding out data.heldout_size")
    if shuffle:
        docs = docs.shuffle(seed=config.seed % 2**32)
    docs = docs.repeat(num_epochs) if num_epochs != 1 else docs
    chunks = grain.experimental.FlatMapIterDataset(
        docs.map(packing.Tokenize(tokenizer)).to_iter_dataset(READ_OPTIONS), packing.ChunkDocument(seq_len))
    if shuffle:
        chunks = grain.experimental.WindowShuffleIterDataset(
            chunks, window_size=CHUNK_SHUFFLE_WINDOW, seed=(config.seed + 1) % 2**32)
    rows = packing.pack(chunks, seq_len, tokenizer.pad_id, NUM_PACKING_BINS)
    batches = rows.batch(local_batch, drop_remainder=False,
                         batch_fn=packing.StackRows(local_batch, seq_len, tokenizer.pad_id))
    if config.num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside absl.app, use defaults
            flags.FLAGS.mark_as_parsed()
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers))

    settings = {  # what fixes the batch sequence; file paths may move between machines
        "source": config.source, "documents": len(docs_all), "jsonl_field": config.jsonl_field,
        "tokenizer": type(tokenizer).__name__, "vocab_size": tokenizer.vocab_size, "seed": config.seed,
        "special_ids": [tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id],
        "heldout_size": config.heldout_size, "max_operand": config.max_operand, "max_terms": config.max_terms,
        "arithmetic_ops": list(config.arithmetic_ops), "num_workers": config.num_workers, "split": split,
        "seq_len": seq_len, "batch_size": batch_size, "process_index": process_index,
        "process_count": process_count, "num_epochs": num_epochs, "num_batches": num_batches,
    }
    empty = packing.StackRows(local_batch, seq_len, tokenizer.pad_id)([])
    return DataIterator(iter(batches), settings, num_batches, empty)
