"""Tokenizer setup: add `<image>` and a pad token, and record the result in the run directory.

The prepared tokenizer is saved once per run (RUN_DIR/tokenizer) and every stage, rank and the exporter
load that copy, so token ids never depend on the machine. With a Vicuna/Llama tokenizer of 32000 tokens
this gives `<image>` = 32000 and `<pad>` = 32001, as in the published llava-hf checkpoints.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..conventions import IMAGE_MARKER
from ..errors import ConfigError

PAD_TOKEN = "<pad>"
# Embedding matrices are padded to a multiple of this many rows (tensor-core friendly, as llava-hf).
VOCAB_MULTIPLE = 64


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load a tokenizer from {path}: {exc}") from None


def prepare_tokenizer(source: str | Path) -> PreTrainedTokenizerBase:
    """The source tokenizer with `<image>` (one special token) and a pad token added when missing."""
    tokenizer = load_tokenizer(source)
    if IMAGE_MARKER not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_MARKER], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer


def image_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_MARKER)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ConfigError(f"tokenizer {tokenizer.name_or_path} has no {IMAGE_MARKER} token; was it prepared by vdep?")
    return token_id


def padded_vocab_size(tokenizer: PreTrainedTokenizerBase) -> int:
    return -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
