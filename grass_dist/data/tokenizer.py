"""Local tokenizers: UTF-8 bytes (built in, nothing to download) or a local HF directory."""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache
from typing import Any, Protocol

from grass_dist.errors import ConfigError


class Tokenizer(Protocol):
    """What the text datasets need from a tokenizer."""

    vocab_size: int
    bos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def spec(self) -> dict[str, Any]: ...


class ByteTokenizer:
    """Token ids 0..255 are the UTF-8 bytes of the text; 256 is the end-of-text token.

    The end-of-text token also opens every document (as GPT-2 does), so that the first
    byte of a document has a context and a loss.
    """

    vocab_size = 257
    bos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def spec(self) -> dict[str, Any]:
        return {"kind": "bytes", "vocab_size": self.vocab_size}


class HFTokenizer:
    """A transformers tokenizer saved in a local directory (`save_pretrained`)."""

    def __init__(self, path: str):
        from grass_dist.models.hf import transformers_module

        self.path = path
        self._tok = transformers_module().AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.vocab_size = len(self._tok)
        bos = self._tok.bos_token_id
        self.bos_id = bos if bos is not None else self._tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    def spec(self) -> dict[str, Any]:
        return {"kind": "hf", "path": self.path, "vocab_size": self.vocab_size}


@lru_cache(maxsize=8)
def load_tokenizer(spec: str = "bytes") -> Tokenizer:
    """'bytes' -> ByteTokenizer; a local directory -> HFTokenizer (cached per process)."""
    if spec == "bytes":
        return ByteTokenizer()
    if os.path.isdir(spec):
        return HFTokenizer(spec)
    raise ConfigError(
        f"tokenizer={spec!r} is neither 'bytes' nor a local directory holding a tokenizer "
        f"saved with `save_pretrained` (tokenizers are never downloaded)"
    )
