"""Document sources: `documents(config, split)` is a grain MapDataset of strings, one per document.

DeepSeek-V3 pretrains on 14.8T tokens of its own corpus (§4.1); dsjax ships two corpora that need
no download and reads user files:

- "arithmetic" (the default): the synthetic R1-format task of `arithmetic.py`. Training documents
  are problems 0, 1, 2, … of the `data.seed` stream (a stream of 2^31 − 1, endless in practice);
  the held-out split is problems [0, `data.heldout_size`) of the fixed held-out stream.
- "stdlib": the .py files of the running interpreter's standard library (site-packages and test
  suites excluded; 734 files, 12 MB on CPython 3.11), sorted by relative path, one file per
  document. Real code: a small model's loss stays above 1 nat/byte for a long while.
- "text": each file of `data.paths` is one document (UTF-8).
- "jsonl": each non-blank line of each file is a JSON object whose `data.jsonl_field` is a document.
  The files are parsed once up front, so a bad line fails at start-up naming file and line; then
  only byte offsets are kept and records are re-read on access (memory stays O(documents)).
- "arrayrecord": each record of the ArrayRecord files is one UTF-8 document (grain's
  ArrayRecordDataSource); the format for corpora too large to scan at start-up.

`data.paths` entries may be glob patterns (sorted). For every source but arithmetic the held-out
split is `data.heldout_size` documents picked by a fixed permutation (grain's index shuffle with
`SPLIT_SEED`, O(1) memory), the same whatever `data.seed` is; training gets the rest.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import sysconfig

import grain
import numpy as np

from dsjax.config import ConfigError, DataConfig
from dsjax.data import arithmetic

SPLITS = ("train", "heldout")
SPLIT_SEED = 20250101  # fixes which documents are held out, independent of data.seed
ARITHMETIC_TRAIN_LENGTH = 2**31 - 1  # index_shuffle works on 32-bit indices
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


def documents(config: DataConfig, split: str) -> grain.MapDataset:
    """The documents (str) of `split` ("train" or "heldout") of `config.source`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if config.source == "arithmetic":
        arithmetic.train_problem(config, 0)  # validates the difficulty fields now, not inside grain
        size = ARITHMETIC_TRAIN_LENGTH if split == "train" else config.heldout_size
        return grain.MapDataset.range(size).map(functools.partial(_arithmetic_text, config, split))
    if config.source == "stdlib":
        root = stdlib_root()
        paths = [os.path.join(root, p) for p in stdlib_files()]
        docs = grain.MapDataset.source(paths).map(functools.partial(_read_text, errors="replace"))
    elif config.source == "text":
        docs = grain.MapDataset.source(_expand(config.paths, "text")).map(_read_text)
    elif config.source == "jsonl":
        docs = grain.MapDataset.source(JsonlDocuments(_expand(config.paths, "jsonl"), config.jsonl_field))
    elif config.source == "arrayrecord":
        paths = _expand(config.paths, "arrayrecord")
        docs = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(paths))
        docs = docs.map(functools.partial(_decode_record, paths))
    else:
        raise ConfigError(f"config field 'data.source': unknown source {config.source!r}")
    return _split(docs, config.heldout_size, split, config.source)


def _arithmetic_text(config: DataConfig, split: str, index: int) -> str:
    get = arithmetic.train_problem if split == "train" else arithmetic.heldout_problem
    return get(config, int(index)).text


def _split(docs: grain.MapDataset, heldout_size: int, split: str, source: str) -> grain.MapDataset:
    n = len(docs)
    if not 0 <= heldout_size < n:
        raise ConfigError(f"config field 'data.heldout_size': {heldout_size} of the {n} documents of "
                          f"source {source!r} leaves none for training")
    permuted = docs.shuffle(seed=SPLIT_SEED)
    return permuted[:heldout_size] if split == "heldout" else permuted[heldout_size:]


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


@functools.cache
def stdlib_files() -> tuple[str, ...]:
    """Sorted paths (relative to `stdlib_root()`) of the standard library's .py files."""
    root = stdlib_root()
    found = []
    for folder, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in STDLIB_EXCLUDED_DIRS]
        found += [os.path.relpath(os.path.join(folder, f), root) for f in files if f.endswith(".py")]
    if not found:
        raise FileNotFoundError(f"no .py files under the standard library folder {root!r}")
    return tuple(sorted(found))


def _expand(patterns: tuple[str, ...], source: str) -> list[str]:
    if not patterns:
        raise ConfigError(f"config field 'data.paths': source {source!r} needs at least one file")
    paths = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
            if not matches:
                raise FileNotFoundError(f"data.paths: no file matches {pattern!r}")
            paths += matches
        elif not os.path.isfile(pattern):
            raise FileNotFoundError(f"data.paths: file {pattern!r} does not exist")
        else:
            paths.append(pattern)
    return paths


def _read_text(path: str, errors: str = "strict") -> str:
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 at byte {e.start}") from e


def _decode_record(paths: list[str], record: bytes) -> str:
    try:
        return record.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"an ArrayRecord record of {paths} is not valid UTF-8 at byte {e.start}") from e


class JsonlDocuments:
    """Random access to `field` of every non-blank line of JSONL files (validated up front)."""

    def __init__(self, paths: list[str], field: str):
        self.paths, self.field = list(paths), field
        file_ids, starts, lengths, line_numbers = [], [], [], []
        for file_id, path in enumerate(self.paths):
            offset = 0
            with open(path, "rb") as f:
                for line_number, line in enumerate(f, start=1):
                    if line.strip():
                        self._parse(line, path, line_number)
                        file_ids.append(file_id)
                        starts.append(offset)
                        lengths.append(len(line))
                        line_numbers.append(line_number)
                    offset += len(line)
        self._file_ids = np.asarray(file_ids, np.int32)
        self._starts = np.asarray(starts, np.int64)
        self._lengths = np.asarray(lengths, np.int64)
        self._line_numbers = np.asarray(line_numbers, np.int64)

    def _parse(self, line: bytes, path: str, line_number: int) -> str:
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}:{line_number}: not valid JSON ({e})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
        if self.field not in record:
            raise ValueError(f"{path}:{line_number}: no field {self.field!r} (data.jsonl_field); "
                             f"the record has {sorted(record)[:10]}")
        text = record[self.field]
        if not isinstance(text, str):
            raise ValueError(f"{path}:{line_number}: field {self.field!r} is a {type(text).__name__}, "
                             "expected a string")
        return text

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, index: int) -> str:
        path = self.paths[self._file_ids[index]]
        with open(path, "rb") as f:
            f.seek(int(self._starts[index]))
            line = f.read(int(self._lengths[index]))
        return self._parse(line, path, int(self._line_numbers[index]))

    def __repr__(self) -> str:
        return f"JsonlDocuments({self.paths!r}, field={self.field!r})"
