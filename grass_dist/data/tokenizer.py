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

    def encode_pair(self, prompt: str, completion: str) -> tuple[list[int], list[int]]: ...

    def vocab(self) -> dict[str, int]: ...

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

    def encode_pair(self, prompt: str, completion: str) -> tuple[list[int], list[int]]:
        """The ids of prompt + completion, split where the completion starts (bytes join
        without changing, so this is each part encoded alone)."""
        return self.encode(prompt), self.encode(completion)

    def vocab(self) -> dict[str, int]:
        return {f"<byte {i}>": i for i in range(256)} | {"<end of text>": 256}

    def spec(self) -> dict[str, Any]:
        return {"kind": "bytes", "vocab_size": self.vocab_size}


class HFTokenizer:
    """A transformers tokenizer: saved in a local directory (`save_pretrained`), or the
    tokenizer object itself."""

    def __init__(self, path: str | Any):
        if isinstance(path, str):
            from grass_dist.models.hf import transformers_module

            self.path = path
            auto = transformers_module().AutoTokenizer
            self._tok = auto.from_pretrained(path, local_files_only=True)
        else:
            self._tok, self.path = path, str(getattr(path, "name_or_path", "") or "")
        self.vocab_size = len(self._tok)
        bos = self._tok.bos_token_id
        self.bos_id = bos if bos is not None else self._tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def encode_pair(self, prompt: str, completion: str) -> tuple[list[int], list[int]]:
        """The ids of the joined text prompt + completion (as the model saw such text in
        training), split before the first token that holds a character of the completion.

        Encoding the parts alone would give other tokens at the seam (byte-level BPE
        merges a prompt's trailing space into the completion's first word). A tokenizer
        without character offsets (not a "fast" one) encodes the parts alone.
        """
        try:
            enc = self._tok(
                prompt + completion, add_special_tokens=False, return_offsets_mapping=True
            )
        except NotImplementedError:
            return self.encode(prompt), self.encode(completion)
        ids, ends = list(enc["input_ids"]), [end for _, end in enc["offset_mapping"]]
        cut = next((j for j, end in enumerate(ends) if end > len(prompt)), len(ids))
        return ids[:cut], ids[cut:]

    def vocab(self) -> dict[str, int]:
        return dict(self._tok.get_vocab())

    def spec(self) -> dict[str, Any]:
        return {"kind": "hf", "path": self.path, "vocab_size": self.vocab_size}


def load_tokenizer(spec: Any = "bytes") -> Tokenizer:
    """'bytes' -> ByteTokenizer; a local directory -> HFTokenizer (cached per process); a
    transformers tokenizer object -> HFTokenizer of it."""
    if isinstance(spec, str):
        return _load(spec)
    if callable(getattr(spec, "get_vocab", None)) and callable(getattr(spec, "decode", None)):
        return HFTokenizer(spec)
    raise ConfigError(
        f"tokenizer={spec!r:.40} ({type(spec).__name__}) is no tokenizer: give 'bytes', a "
        f"local directory holding a tokenizer saved with `save_pretrained`, or a "
        f"transformers tokenizer object"
    )


@lru_cache(maxsize=8)
def _load(spec: str) -> Tokenizer:
    if spec == "bytes":
        return ByteTokenizer()
    if os.path.isdir(spec):
        return HFTokenizer(spec)
    raise ConfigError(
        f"tokenizer={spec!r} is neither 'bytes' nor a local directory holding a tokenizer "
        f"saved with `save_pretrained` (tokenizers are never downloaded)"
    )
