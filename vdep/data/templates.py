"""Conversation templates: a conversation becomes token ids and labels, turn by turn.

A template lays a conversation out as a list of segments (text or special token ids), each marked
supervised or not. Every segment is tokenized on its own and the ids are concatenated, so the labels
line up with the input ids by construction: there is no re-tokenization step that could drift and
silently mask a sample (LLaVA's "tokenization mismatch"). `<image>` markers inside a segment become
`num_image_tokens` placeholder ids; the model scatters projector outputs into them.

Generation uses the same segments up to the assistant's answer (`encode_prompt`), so a prompt at
inference is tokenized exactly as in training.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from ..errors import DataError
from .conversation import IMAGE_MARKER, SampleError, Turn

IGNORE_INDEX = -100

VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


@dataclass(frozen=True)
class TextSegment:
    text: str
    supervised: bool


@dataclass(frozen=True)
class TokenSegment:
    token_id: int
    supervised: bool


Segment = TextSegment | TokenSegment


@dataclass
class TokenizedConversation:
    input_ids: list[int]
    labels: list[int]


class TemplateTokenizer:
    """Tokenizes template text; each `<image>` becomes `num_image_tokens` copies of the image id."""

    def __init__(self, tokenizer, image_token_id: int, num_image_tokens: int):
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens

    def encode_text(self, text: str) -> list[int]:
        pieces = text.split(IMAGE_MARKER)
        ids: list[int] = []
        for index, piece in enumerate(pieces):
            if index:
                ids.extend([self.image_token_id] * self.num_image_tokens)
            if piece:
                ids.extend(self.tokenizer(piece, add_special_tokens=False).input_ids)
        return ids

    def encode_segments(self, segments: list[Segment]) -> TokenizedConversation:
        input_ids: list[int] = []
        labels: list[int] = []
        for segment in segments:
            ids = [segment.token_id] if isinstance(segment, TokenSegment) else self.encode_text(segment.text)
            input_ids.extend(ids)
            labels.extend(ids if segment.supervised else [IGNORE_INDEX] * len(ids))
        return TokenizedConversation(input_ids, labels)


class ConversationTemplate(ABC):
    """How a conversation is laid out as segments."""

    name: str
    # The text that ends an answer during generation: the EOS token, or a separator string.
    stop_text: str | None = None

    def __init__(self, tokenizer):
        self.bos_id: int | None = tokenizer.bos_token_id
        self.eos_id: int | None = tokenizer.eos_token_id

    @abstractmethod
    def segments(self, turns: list[Turn], has_image: bool) -> list[Segment]:
        """The full conversation, answers supervised."""

    @abstractmethod
    def prompt_segments(self, turns: list[Turn], has_image: bool) -> list[Segment]:
        """Everything before the answer to the last user turn (`turns` ends with that user turn)."""

    def _bos(self) -> list[Segment]:
        return [TokenSegment(self.bos_id, False)] if self.bos_id is not None else []


class PlainTemplate(ConversationTemplate):
    """LLaVA's `plain` alignment template: `<image>` then the caption and a newline, nothing else.

    As in LLaVA, the user's words are dropped (alignment data pairs a generic instruction with a
    caption); only the image and the caption remain, and the caption plus its newline is supervised.
    """

    name = "plain"
    stop_text = "\n"

    def segments(self, turns: list[Turn], has_image: bool) -> list[Segment]:
        if not has_image:
            raise SampleError("template_mismatch", "the plain template needs an image; this sample has none")
        if len(turns) != 2:
            raise SampleError(
                "template_mismatch", f"the plain template takes one question and one answer, got {len(turns)} turns"
            )
        return self.prompt_segments(turns[:1], has_image) + [TextSegment(turns[1].text + "\n", True)]

    def prompt_segments(self, turns: list[Turn], has_image: bool) -> list[Segment]:
        return self._bos() + [TextSegment(IMAGE_MARKER, False)]


class VicunaV1Template(ConversationTemplate):
    """LLaVA-1.5's `vicuna_v1`: `SYSTEM USER: q ASSISTANT: a</s>USER: q ASSISTANT: a</s>`.

    The user part of each round is one unsupervised segment ending with `ASSISTANT:`; the answer and
    its `</s>` are supervised.
    """

    name = "vicuna_v1"

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        if self.eos_id is None:
            raise DataError("the vicuna_v1 template ends every answer with EOS, but the tokenizer has no eos_token")

    def _user(self, index: int, turn: Turn) -> TextSegment:
        prefix = f"{VICUNA_SYSTEM} USER: " if index == 0 else "USER: "
        return TextSegment(f"{prefix}{turn.text} ASSISTANT:", False)

    def segments(self, turns: list[Turn], has_image: bool) -> list[Segment]:
        segments = self._bos()
        for index in range(0, len(turns), 2):
            segments.append(self._user(index, turns[index]))
            segments.append(TextSegment(turns[index + 1].text, True))
            segments.append(TokenSegment(self.eos_id, True))
        return segments

    def prompt_segments(self, turns: list[Turn], has_image: bool) -> list[Segment]:
        segments = self.segments(turns[:-1], has_image) if len(turns) > 1 else self._bos()
        segments.append(self._user(len(turns) - 1, turns[-1]))
        return segments


TEMPLATES: dict[str, type[ConversationTemplate]] = {t.name: t for t in (PlainTemplate, VicunaV1Template)}


def make_template(name: str, tokenizer) -> ConversationTemplate:
    if name not in TEMPLATES:
        raise DataError(f"unknown template {name!r}; available: {', '.join(TEMPLATES)}")
    return TEMPLATES[name](tokenizer)


def check_template_tokenizer(template: ConversationTemplate, encoder: TemplateTokenizer) -> None:
    """Fail at start-up when the tokenizer cannot represent what the template writes.

    Each text segment of a probe conversation must tokenize to something that decodes back to the
    same characters (whitespace aside): a tokenizer that lowercases, drops characters or maps them to
    <unk> would otherwise train on text the template never meant.
    """
    tokenizer = encoder.tokenizer
    probe = [Turn("user", f"{IMAGE_MARKER}\nWhat is shown?"), Turn("assistant", "A red circle.")]
    probe_ids = tokenizer("a", add_special_tokens=False).input_ids
    if tokenizer.bos_token_id is not None and probe_ids[:1] == [tokenizer.bos_token_id]:
        raise DataError(f"tokenizer {tokenizer.name_or_path} adds BOS even with add_special_tokens=False")
    for segment in template.segments(probe, has_image=True):
        if isinstance(segment, TokenSegment):
            continue
        text = segment.text.replace(IMAGE_MARKER, "")
        ids = encoder.encode_text(text)
        decoded = tokenizer.decode(ids, skip_special_tokens=False)
        if "".join(decoded.split()) != "".join(text.split()):
            raise DataError(
                f"template {template.name!r} and tokenizer {tokenizer.name_or_path} disagree: the segment "
                f"{text!r} decodes back as {decoded!r}; use a tokenizer that covers the template's text"
            )
