"""Conversation templates: a conversation becomes token ids and labels.

A template lays a conversation out as segments of text, each marked supervised (the answers) or not.
The segments are joined into one string, which is tokenized once, exactly as a Hugging Face processor
or a chat template tokenizes a prompt at inference (BOS from the tokenizer, `</s>` written as text and
read as the special token). A token is supervised when it lies in an answer's characters; a token that
reaches from template text into an answer may only do so with whitespace (Llama's `▁red` covers the
space before `red`), anything else is a `template_mismatch` and the sample is skipped and counted, never
silently masked. Then each `<image>` id becomes `num_image_tokens` placeholder ids, into which the model
scatters projector outputs.

Generation tokenizes the same segments up to the assistant's answer (`prompt_segments`), so a prompt
at inference equals the training prefix.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass

from ..conventions import IGNORE_INDEX, IMAGE_MARKER
from ..errors import DataError
from .conversation import SampleError, Turn

VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


@dataclass(frozen=True)
class Segment:
    text: str
    supervised: bool


@dataclass
class TokenizedConversation:
    input_ids: list[int]
    labels: list[int]


def render(segments: list[Segment]) -> tuple[str, list[tuple[int, int]]]:
    """The conversation's text and the character spans of its supervised segments."""
    text, spans, position = [], [], 0
    for segment in segments:
        if segment.supervised and segment.text:
            spans.append((position, position + len(segment.text)))
        text.append(segment.text)
        position += len(segment.text)
    return "".join(text), spans


class TemplateTokenizer:
    """Tokenizes rendered conversations; each `<image>` becomes `num_image_tokens` image ids."""

    def __init__(self, tokenizer, image_token_id: int, num_image_tokens: int):
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens

    def encode(self, segments: list[Segment], image_tokens: list[int] | None = None) -> TokenizedConversation:
        """Ids and labels; the k-th `<image>` becomes `image_tokens[k]` placeholders (AnyRes: each image's
        own count, data/anyres.py), or `num_image_tokens` each when not given. A count of markers other than
        `len(image_tokens)` is an `image_marker_mismatch` (never a model that gets more features than places)."""
        text, spans = render(segments)
        try:
            encoded = self.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        except NotImplementedError:
            raise DataError(f"tokenizer {self.tokenizer.name_or_path} gives no character offsets; use a fast tokenizer") from None
        input_ids: list[int] = []
        labels: list[int] = []
        span_index = 0
        markers = 0
        for token_id, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
            while span_index < len(spans) and spans[span_index][1] <= start:
                span_index += 1
            supervised = False
            if span_index < len(spans) and end > start:
                span_start, span_end = spans[span_index]
                if start < span_end and end > span_start:  # the token overlaps an answer
                    if text[start:span_start].strip() or text[span_end:end].strip():
                        raise SampleError(
                            "template_mismatch",
                            f"token {text[start:end]!r} joins template text and answer text; the labels "
                            "cannot follow the answer exactly",
                        )
                    supervised = True
            if token_id == self.image_token_id:
                if image_tokens is not None and markers >= len(image_tokens):
                    markers += 1
                    continue
                count = self.num_image_tokens if image_tokens is None else image_tokens[markers]
                markers += 1
                input_ids.extend([token_id] * count)
                labels.extend([IGNORE_INDEX] * count)
            else:
                input_ids.append(token_id)
                labels.append(token_id if supervised else IGNORE_INDEX)
        if image_tokens is not None and markers != len(image_tokens):
            raise SampleError(
                "image_marker_mismatch",
                f"the template's text holds {markers} {IMAGE_MARKER} marker(s) for {len(image_tokens)} image(s) or video(s)",
            )
        return TokenizedConversation(input_ids, labels)


class ConversationTemplate(ABC):
    """How a conversation is laid out as text segments."""

    name: str
    # Text that ends an answer during generation besides EOS (the plain template's newline).
    stop_text: str | None = None

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos_text: str | None = tokenizer.eos_token
        self.eos_token_id: int | None = tokenizer.eos_token_id

    @functools.cached_property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Token ids that end an answer in generation: EOS and, for chat formats, the end-of-turn token
        (a base Llama 3 tokenizer's EOS is <|end_of_text|>, while the answers were trained to end with
        <|eot_id|>). Found once per template: `chat_template` renders a probe to find it."""
        end_of_turn = self._end_of_turn_id()
        ids = [i for i in (self.eos_token_id, end_of_turn) if i is not None]
        return tuple(dict.fromkeys(ids))

    def _end_of_turn_id(self) -> int | None:
        return None

    @abstractmethod
    def segments(self, turns: list[Turn], has_image: bool) -> list[Segment]:
        """The full conversation, answers supervised."""

    @abstractmethod
    def prompt_segments(self, turns: list[Turn], has_image: bool) -> list[Segment]:
        """Everything before the answer to the last user turn (`turns` ends with that user turn)."""


class PlainTemplate(ConversationTemplate):
    """LLaVA's `plain` alignment template: `<image>`, then the caption and a newline.

    As in LLaVA, the user's words are dropped (alignment data pairs a generic instruction with a
    caption); only the image and the caption remain, and the caption with its newline is supervised.
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
        return self.prompt_segments(turns[:1], has_image) + [Segment(turns[1].text + "\n", True)]

    def prompt_segments(self, turns: list[Turn], has_image: bool) -> list[Segment]:
        return [Segment(IMAGE_MARKER, False)]


class RoundTemplate(ConversationTemplate):
    """Templates written round by round: a user part (ending where generation starts), then the answer."""

    @abstractmethod
    def _user(self, index: int, turn: Turn) -> Segment:
        """The unsupervised text of user turn `index` (0 for the first, which may carry a system part)."""

    @abstractmethod
    def _answer(self, turn: Turn) -> list[Segment]:
        """The answer's segments, its supervised text first."""

    def segments(self, turns: list[Turn], has_image: bool) -> list[Segment]:
        segments = []
        for index in range(0, len(turns), 2):
            segments.append(self._user(index, turns[index]))
            segments += self._answer(turns[index + 1])
        return segments

    def prompt_segments(self, turns: list[Turn], has_image: bool) -> list[Segment]:
        return self.segments(turns[:-1], has_image) + [self._user(len(turns) - 1, turns[-1])]


class VicunaV1Template(RoundTemplate):
    """LLaVA-1.5's `vicuna_v1`: `SYSTEM USER: q ASSISTANT: a</s>USER: q ASSISTANT: a</s>`.

    Each user part ends with `ASSISTANT:` (the generation prompt ends there, as in LLaVA); the answer,
    with the space before it, and its `</s>` are supervised.
    """

    name = "vicuna_v1"

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        if self.eos_text is None:
            raise DataError("the vicuna_v1 template ends every answer with EOS, but the tokenizer has no eos_token")

    def _user(self, index: int, turn: Turn) -> Segment:
        prefix = f"{VICUNA_SYSTEM} USER: " if index == 0 else "USER: "
        return Segment(f"{prefix}{turn.text} ASSISTANT:", False)

    def _answer(self, turn: Turn) -> list[Segment]:
        return [Segment(f" {turn.text}{self.eos_text}", True)]


class HeaderTemplate(RoundTemplate):
    """Chat formats that wrap each turn in a role header and an end-of-turn token.

    The answer and its end-of-turn token are supervised; the header before it is not. BOS is the
    tokenizer's (not written here), as at inference.
    """

    turn_start: str  # format with {role}
    turn_end: str
    special_tokens: tuple[str, ...]  # what the tokenizer must have as single tokens
    system: str | None = None

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        for token in self.special_tokens:
            if token not in tokenizer.get_vocab():
                raise DataError(
                    f"the {self.name} template writes {token}, which tokenizer {tokenizer.name_or_path} does not have as a "
                    "token; use the tokenizer of the model family, or template: chat_template"
                )

    def _end_of_turn_id(self) -> int | None:
        return self.tokenizer.convert_tokens_to_ids(self.turn_end.strip())

    def _header(self, role: str) -> str:
        return self.turn_start.format(role=role)

    def _user(self, index: int, turn: Turn) -> Segment:
        system = f"{self._header('system')}{self.system}{self.turn_end}" if index == 0 and self.system else ""
        return Segment(f"{system}{self._header('user')}{turn.text}{self.turn_end}{self._header('assistant')}", False)

    def _answer(self, turn: Turn) -> list[Segment]:
        # The end-of-turn token is supervised; whitespace after it (ChatML's newline) is not.
        end = self.turn_end.rstrip()
        trailing = self.turn_end[len(end):]
        return [Segment(f"{turn.text}{end}", True)] + ([Segment(trailing, False)] if trailing else [])


class Llama3Template(HeaderTemplate):
    """Llama 3's chat format: `<|start_header_id|>role<|end_header_id|>\n\n text<|eot_id|>`."""

    name = "llama3"
    turn_start = "<|start_header_id|>{role}<|end_header_id|>\n\n"
    turn_end = "<|eot_id|>"
    special_tokens = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


class Qwen2Template(HeaderTemplate):
    """Qwen2's ChatML: `<|im_start|>role\ntext<|im_end|>\n`, with Qwen's default system message."""

    name = "qwen2"
    turn_start = "<|im_start|>{role}\n"
    turn_end = "<|im_end|>\n"
    system = "You are a helpful assistant."
    special_tokens = ("<|im_start|>", "<|im_end|>")


class TokenizerChatTemplate(ConversationTemplate):
    """The tokenizer's own `chat_template` (Jinja), rendered by transformers.

    Answer spans are found by rendering growing prefixes of the conversation: an answer is what
    rendering up to and including it adds to rendering up to its question with the generation prompt
    (trailing whitespace excluded). That needs a template whose renderings of a prefix are a prefix of
    the full rendering, which holds for the usual chat templates and is checked for every sample (a
    sample that breaks it is a `template_mismatch`, skipped and counted).
    """

    name = "chat_template"

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"template: chat_template, but tokenizer {tokenizer.name_or_path} has no chat_template")
        bos = tokenizer.bos_token
        # Strip a BOS the template writes when the tokenizer adds one itself (else it would appear twice).
        self.strip_bos = bool(bos) and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [tokenizer.bos_token_id]

    def _end_of_turn_id(self) -> int | None:
        """The special token the template writes right after an answer, if there is one."""
        probe = [Turn("user", "Hi."), Turn("assistant", "Hello.")]
        try:
            answer = next(s for s in self.segments(probe, has_image=False) if s.supervised).text
        except (SampleError, StopIteration):
            return None
        suffix = answer.split("Hello.", 1)[-1].strip()
        ids = self.tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix else []
        special = set(self.tokenizer.all_special_ids) | set(self.tokenizer.added_tokens_decoder)
        return ids[0] if len(ids) == 1 and ids[0] in special else None

    def _render(self, turns: list[Turn], generation_prompt: bool) -> str:
        messages = [{"role": t.role, "content": t.text} for t in turns]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        if self.strip_bos and text.startswith(self.tokenizer.bos_token):
            text = text[len(self.tokenizer.bos_token):]
        return text

    def segments(self, turns: list[Turn], has_image: bool) -> list[Segment]:
        full = self._render(turns, False)
        segments, position = [], 0
        for index in range(1, len(turns), 2):
            before = self._render(turns[:index], True)
            through = self._render(turns[: index + 1], False).rstrip()
            if not (full.startswith(through) and through.startswith(before) and len(before) >= position):
                raise SampleError(
                    "template_mismatch",
                    "the tokenizer's chat_template does not render this conversation's prefixes as prefixes of the whole",
                )
            segments += [Segment(full[position:len(before)], False), Segment(through[len(before):], True)]
            position = len(through)
        if position < len(full):
            segments.append(Segment(full[position:], False))
        return segments

    def prompt_segments(self, turns: list[Turn], has_image: bool) -> list[Segment]:
        return [Segment(self._render(turns, True), False)]


TEMPLATES: dict[str, type[ConversationTemplate]] = {
    t.name: t for t in (PlainTemplate, VicunaV1Template, Llama3Template, Qwen2Template, TokenizerChatTemplate)
}


def make_template(name: str, tokenizer) -> ConversationTemplate:
    if name not in TEMPLATES:
        raise DataError(f"unknown template {name!r}; available: {', '.join(TEMPLATES)}")
    return TEMPLATES[name](tokenizer)


def check_template_tokenizer(template: ConversationTemplate, encoder: TemplateTokenizer) -> None:
    """Fail at start-up when the tokenizer cannot represent what the template writes.

    A probe conversation must tokenize to ids that decode back to the same characters (whitespace
    aside), and its answers must be labelled: a tokenizer that lowercases, drops characters or maps
    them to <unk> would otherwise train on text the template never meant.
    """
    tokenizer = encoder.tokenizer
    probe = [Turn("user", f"{IMAGE_MARKER}\nWhat is shown?"), Turn("assistant", "A red circle.")]
    segments = template.segments(probe, has_image=True)
    text, _ = render(segments)
    try:
        tokens = encoder.encode(segments)
    except SampleError as exc:
        raise DataError(f"template {template.name!r} and tokenizer {tokenizer.name_or_path} disagree: {exc}") from None
    ids = [i for i in tokens.input_ids if i != encoder.image_token_id]
    decoded = tokenizer.decode(ids, skip_special_tokens=False)
    if tokenizer.bos_token and decoded.startswith(tokenizer.bos_token):
        decoded = decoded[len(tokenizer.bos_token):]
    expected = text.replace(IMAGE_MARKER, "")
    if "".join(decoded.split()) != "".join(expected.split()):
        raise DataError(
            f"template {template.name!r} and tokenizer {tokenizer.name_or_path} disagree: the text "
            f"{expected!r} decodes back as {decoded!r}; use a tokenizer that covers the template's text"
        )
    answer = "".join(tokenizer.decode([t for t in tokens.labels if t != IGNORE_INDEX], skip_special_tokens=True).split())
    if answer != "".join(probe[1].text.split()):
        raise DataError(
            f"template {template.name!r} with tokenizer {tokenizer.name_or_path}: the labelled tokens of the probe "
            f"answer {probe[1].text!r} decode as {answer!r}"
        )
