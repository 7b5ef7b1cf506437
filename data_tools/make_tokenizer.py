"""`vdep make-tokenizer`: train a small SentencePiece tokenizer on the texts of shard directories or remote prefixes.

For tiny models (tests, the demo) that have no pretrained tokenizer. The result is a Hugging Face
tokenizer folder (a Llama-style BPE tokenizer with byte fallback, BOS `<s>`, EOS `</s>`, UNK `<unk>`)
that `AutoTokenizer.from_pretrained` loads; `vdep train` adds `<image>` and `<pad>` on top.
"""

from __future__ import annotations

import io
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import sentencepiece as spm

from vdep.atomic import atomic_folder
from vdep.conventions import IMAGE_MARKER
from vdep.data.remote import RemoteSettings
from vdep.data.shards import discover_shards
from vdep.data.tar_reader import iterate_samples, open_shard
from vdep.data.templates import VICUNA_SYSTEM
from vdep.errors import DataError

# Byte fallback needs 256 byte pieces plus the characters seen plus the special tokens.
MIN_VOCAB_SIZE = 300
# Text every template writes, so the tokenizer covers it even if the shards never contain it.
TEMPLATE_TEXTS = [VICUNA_SYSTEM + " USER: ASSISTANT:"] * 10


def shard_samples(shard_dir: str) -> Iterator[dict]:
    """Every raw sample of a shard folder or remote prefix, in order."""
    settings = RemoteSettings()
    for shard in discover_shards([shard_dir], settings):
        with open_shard(shard.path, settings) as stream:
            yield from iterate_samples(stream, shard.path, 0)


def shard_texts(shard_dir: str) -> Iterator[str]:
    for sample in shard_samples(shard_dir):
        if "json" not in sample:
            continue
        try:
            conversations = json.loads(sample["json"]).get("conversations", [])
        except (json.JSONDecodeError, AttributeError):
            continue
        for turn in conversations:
            if isinstance(turn, dict) and isinstance(turn.get("value"), str):
                yield turn["value"].replace(IMAGE_MARKER, "").strip()


def make_tokenizer(shard_dirs: list[str], vocab_size: int, out: Path) -> Path:
    """Train the tokenizer and write a Hugging Face tokenizer folder to `out`, a new or empty folder
    (a tokenizer is never overwritten: runs and shards made with it would no longer match it)."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(f"--vocab-size {vocab_size} is too small: byte fallback needs at least {MIN_VOCAB_SIZE}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(
            f"--out {out} already exists and is not an empty folder; make-tokenizer does not overwrite it "
            "(remove it first, or choose another --out)"
        )
    texts = [t for d in shard_dirs for t in shard_texts(d) if t] + TEMPLATE_TEXTS
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=model,
            vocab_size=vocab_size,
            model_type="bpe",
            character_coverage=1.0,
            byte_fallback=True,
            split_digits=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            normalization_rule_name="identity",
            hard_vocab_limit=False,
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise DataError(f"SentencePiece training failed: {exc}") from None
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as tmp, atomic_folder(out) as folder:  # complete, or not there at all
        (Path(tmp) / "tokenizer.model").write_bytes(model.getvalue())
        # Like Llama/Vicuna's tokenizer, it adds BOS to every encoded text (templates rely on the tokenizer for it).
        tokenizer = LlamaTokenizer.from_pretrained(tmp, add_bos_token=True, add_eos_token=False)
        tokenizer.save_pretrained(str(folder))
        (folder / "tokenizer.model").write_bytes(model.getvalue())
    return out
