"""LLaVA-style conversations: parsing and validation of one sample's `conversations` list.

A sample's JSON holds `{"conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt",
"value": "..."}, ...]}`. Turns alternate user/assistant, starting with the user and ending with the
assistant. Problems are reported as `SampleError`s with a short reason code: the loader counts them per
reason and skips the sample (never silently).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..conventions import IMAGE_MARKER

_ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class SampleError(Exception):
    """One sample cannot be used. `reason` is a short code for counting; the message explains."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):
        # Pickling an exception re-creates it from `args` (the message alone), which this __init__ refuses:
        # the shard builder sends SampleErrors (broken JSONL lines) to its worker processes.
        return type(self), (self.reason, str(self)), self.__dict__


@dataclass(frozen=True)
class Turn:
    role: Literal["user", "assistant"]
    text: str


def parse_conversation(raw: object) -> list[Turn]:
    """Validate a LLaVA `conversations` list and return its turns."""
    if not isinstance(raw, list) or not raw:
        raise SampleError("bad_conversation", "'conversations' must be a non-empty list of turns")
    turns: list[Turn] = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict) or "from" not in item or "value" not in item:
            raise SampleError("bad_conversation", f"turn {index} must be a mapping with 'from' and 'value'")
        role = _ROLE_ALIASES.get(str(item["from"]).lower())
        if role is None:
            raise SampleError(
                "bad_conversation", f"turn {index} has unknown speaker {item['from']!r} (use 'human' or 'gpt')"
            )
        if not isinstance(item["value"], str):
            raise SampleError("bad_conversation", f"turn {index}: 'value' must be a string")
        expected = "user" if index % 2 == 0 else "assistant"
        if role != expected:
            raise SampleError(
                "bad_conversation", f"turn {index} is from the {role}, expected the {expected} (turns must alternate)"
            )
        turns.append(Turn(role, item["value"]))
    if turns[-1].role != "assistant":
        raise SampleError("bad_conversation", "the conversation ends with a user turn that nothing answers")
    for index, turn in enumerate(turns):
        if turn.role == "assistant" and not turn.text.strip():
            raise SampleError("empty_answer", f"assistant turn {index} is empty")
        if turn.role == "assistant" and IMAGE_MARKER in turn.text:
            raise SampleError("image_marker_mismatch", f"assistant turn {index} contains {IMAGE_MARKER}")
    return turns


def count_image_markers(turns: list[Turn]) -> int:
    return sum(turn.text.count(IMAGE_MARKER) for turn in turns)


def check_image_markers(turns: list[Turn], has_image: bool | None = None, *, images: int | None = None) -> None:
    """One `<image>` marker per image or video, in the user's turns: `images` of them (or one when `has_image`,
    none when not). A mismatch is an `image_marker_mismatch` (at build time a rejection, in training a skip),
    never a model that gets more features than places for them."""
    expected = images if images is not None else int(bool(has_image))
    markers = count_image_markers(turns)
    if markers == expected:
        return
    if expected == 0:
        raise SampleError(
            "image_marker_mismatch", f"the sample has no image but its text holds {markers} {IMAGE_MARKER} marker(s)"
        )
    what = "an image" if expected == 1 else f"{expected} images/videos"
    raise SampleError(
        "image_marker_mismatch",
        f"the sample has {what} but {markers} {IMAGE_MARKER} markers (expected {expected}: one per image or video)",
    )
