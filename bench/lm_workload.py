"""The benchmark language model and corpus, shared by bench_vs_bergson.py and lm_floor.py.

A seeded GPT-2 saved with `save_pretrained` next to a byte-level BPE tokenizer trained
offline on `pydoc_data.topics`, and a JSONL corpus of documents made of single-token words,
so every tool that reads them tokenizes each document to exactly `tokens` tokens.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

END_OF_TEXT = "<|endoftext|>"
N_POSITIONS = 1024  # bergson refuses a token batch longer than the model's context


@dataclass(frozen=True)
class Size:
    """The model and corpus of one benchmark."""

    docs: int
    tokens: int
    blocks: int
    width: int
    heads: int
    vocab: int
    seed: int = 0


def train_tokenizer(vocab: int):
    """A byte-level BPE of `vocab` tokens trained on `pydoc_data.topics` (no download),
    as a PreTrainedTokenizerFast whose encode opens every document with <|endoftext|>
    (GPT-2's convention; grass_dist prepends the same start token itself)."""
    import pydoc_data.topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(pydoc_data.topics.topics.values()), trainer)
    bos = tok.token_to_id(END_OF_TEXT)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{END_OF_TEXT} $A", special_tokens=[(END_OF_TEXT, bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        model_max_length=N_POSITIONS,
    )


def single_token_words(tokenizer) -> list[str]:
    """' word' strings (letters only) that the tokenizer encodes as exactly one token, so a
    run of them tokenizes to one token per word whatever the neighbours."""
    words = []
    for piece, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        text = tokenizer.convert_tokens_to_string([piece])
        word = text.startswith(" ") and text[1:].isascii() and text[1:].isalpha()
        if word and tokenizer(text, add_special_tokens=False)["input_ids"] == [i]:
            words.append(text)
    if len(words) < 100:
        raise SystemExit(f"the tokenizer has only {len(words)} single-token words; raise --vocab")
    return words


def documents(size: Size, words: list[str]) -> list[str]:
    """`size.docs` seeded documents of `size.tokens - 1` words (plus the start token)."""
    rng = random.Random(size.seed)
    return ["".join(rng.choices(words, k=size.tokens - 1)) for _ in range(size.docs)]


def save_model(size: Size, tokenizer, out: Path) -> None:
    """A seeded GPT-2 of `size` saved with its tokenizer in `out`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=N_POSITIONS,
        n_embd=size.width,
        n_layer=size.blocks,
        n_head=size.heads,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(size.seed)
    GPT2LMHeadModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


def write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def build_workload(size: Size, workdir: Path) -> tuple[Path, Path]:
    """(model directory, corpus JSONL) in `workdir`."""
    model_dir, corpus = workdir / "model", workdir / "corpus.jsonl"
    tokenizer = train_tokenizer(size.vocab)
    save_model(size, tokenizer, model_dir)
    words = single_token_words(tokenizer)
    texts = documents(size, words)
    write_jsonl(corpus, [{"id": f"doc{i}", "text": t} for i, t in enumerate(texts)])
    return model_dir, corpus


def grass_dist_token_ids(model_dir: Path, corpus: Path, tokens: int) -> list[list[int]]:
    """The rows grass_dist's own data path (data=text_files) makes of the corpus, each
    checked to be `tokens` long."""
    from grass_dist.data.text import text_files

    data = text_files([str(corpus)], tokenizer=str(model_dir), max_length=tokens)
    ids = [data[i]["input_ids"].tolist() for i in range(len(data))]
    lengths = {len(row) for row in ids}
    if lengths != {tokens}:
        raise SystemExit(
            f"grass_dist made rows of lengths {sorted(lengths)} from the corpus; expected "
            f"every row {tokens} tokens"
        )
    return ids


def checked_token_ids(model_dir: Path, corpus: Path, size: Size) -> list[list[int]]:
    """`grass_dist_token_ids`, checked to be one row per document."""
    ids = grass_dist_token_ids(model_dir, corpus, size.tokens)
    if len(ids) != size.docs:
        raise SystemExit(f"grass_dist made {len(ids)} rows of {size.docs} documents")
    return ids
