"""Tokenizers: raw bytes (the default, no files needed) or a local Hugging Face tokenizer.json.

DeepSeek-V3 uses a byte-level BPE with a 128K vocabulary (§4.1) loaded from the released
`tokenizer.json`; dsjax reads such a file through the `tokenizers` library (`HFTokenizer`). For
CPU runs and tests the default is `ByteTokenizer`: ids 0..255 are the UTF-8 bytes of the text and
three specials follow (pad 256, bos 257, eos 258; vocab_size 259), so a model config needs
`vocab_size >= 259`, `bos_token_id = 257`, `eos_token_id = 258`.

Every tokenizer answers the same small protocol (`Tokenizer`): `encode(str) -> list[int]` (no
specials added), `decode(list[int]) -> str` (specials dropped, invalid UTF-8 replaced), and the
integer attributes `vocab_size`, `bos_id`, `eos_id`, `pad_id`. A training document is
`[bos] + encode(text) + [eos]` (`encode_document`); `bos_id` may be None for a tokenizer without
one, and then no bos is prepended. `eos_id` is required: it is how generation ends.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Protocol, runtime_checkable

import numpy as np

# Names under which tokenizer.json files commonly carry their specials, most specific first
# (DeepSeek's use the fullwidth bar U+FF5C and U+2581). Consulted only when no
# tokenizer_config.json beside the file names them.
_BOS_NAMES = ("<｜begin▁of▁sentence｜>", "<|begin_of_text|>", "<|bos|>", "<bos>", "<s>", "<|startoftext|>", "[CLS]")
_EOS_NAMES = ("<｜end▁of▁sentence｜>", "<|end_of_text|>", "<|eos|>", "<eos>", "</s>", "<|endoftext|>", "[SEP]")
_PAD_NAMES = ("<｜▁pad▁｜>", "<|pad|>", "<pad>", "[PAD]")


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    bos_id: Optional[int]
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255; pad 256, bos 257, eos 258."""

    vocab_size = 259
    pad_id = 256
    bos_id = 257
    eos_id = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A local Hugging Face `tokenizer.json` through the `tokenizers` library.

    bos/eos/pad come from a `tokenizer_config.json` in the same folder when it names them (as
    every HF model folder does), else from well-known special-token names in the vocabulary.
    """

    def __init__(self, path: str):
        import tokenizers

        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"tokenizer file {self.path!r} does not exist "
                                    "(data.tokenizer takes 'byte' or a path to a tokenizer.json)")
        try:
            self._tok = tokenizers.Tokenizer.from_file(self.path)
        except Exception as e:  # the Rust side raises plain Exception subclasses
            raise ValueError(f"tokenizer file {self.path!r} is not a valid tokenizer.json: {e}") from e
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        named = self._config_specials()
        self.bos_id = self._find("bos", named.get("bos_token"), _BOS_NAMES)
        eos = self._find("eos", named.get("eos_token"), _EOS_NAMES)
        if eos is None:
            raise ValueError(f"tokenizer file {self.path!r} has no end-of-sequence token (looked for "
                             f"tokenizer_config.json's eos_token, then {', '.join(_EOS_NAMES)})")
        self.eos_id = eos
        pad = self._find("pad", named.get("pad_token"), _PAD_NAMES)
        self.pad_id = eos if pad is None else pad  # padding never carries loss, any id will do

    def _config_specials(self) -> dict[str, str]:
        config_path = os.path.join(os.path.dirname(self.path), "tokenizer_config.json")
        if not os.path.isfile(config_path):
            return {}
        try:
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"tokenizer config {config_path!r} is not valid JSON: {e}") from e
        out = {}
        for key in ("bos_token", "eos_token", "pad_token"):
            value = config.get(key)
            if isinstance(value, dict):  # {"content": "<s>", "lstrip": ..., ...}
                value = value.get("content")
            if isinstance(value, str):
                out[key] = value
        return out

    def _find(self, what: str, configured: Optional[str], names: tuple[str, ...]) -> Optional[int]:
        if configured is not None:
            token_id = self._tok.token_to_id(configured)
            if token_id is None:
                raise ValueError(f"tokenizer_config.json beside {self.path!r} names {what}_token "
                                 f"{configured!r}, which is not in the vocabulary")
            return token_id
        for name in names:
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r})"


def make_tokenizer(spec: str) -> Tokenizer:
    """`data.tokenizer`: "byte", or a path to a local tokenizer.json (a folder holding one works)."""
    if spec == "byte":
        return ByteTokenizer()
    path = os.path.join(spec, "tokenizer.json") if os.path.isdir(spec) else spec
    return HFTokenizer(path)


def encode_document(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """int32 [bos] + encode(text) + [eos]: one training document."""
    ids = tokenizer.encode(text)
    head = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    return np.asarray(head + ids + [tokenizer.eos_id], dtype=np.int32)
