"""Templates and labels: token ids built turn by turn, supervised spans, and what is rejected."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import pytest
import sentencepiece as spm

from vdep.conventions import IGNORE_INDEX
from vdep.data.conversation import SampleError, Turn, check_image_markers, parse_conversation
from vdep.data.dataset import truncate
from vdep.data.templates import (
    VICUNA_SYSTEM,
    TemplateTokenizer,
    TokenizedConversation,
    check_template_tokenizer,
    make_template,
)
from vdep.errors import DataError
from vdep.model.tokenizer import image_token_id

N_IMAGE = 5


@pytest.fixture
def encoder(tokenizer) -> TemplateTokenizer:
    return TemplateTokenizer(tokenizer, image_token_id(tokenizer), N_IMAGE)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def supervised(tokens: TokenizedConversation) -> list[int]:
    return [label for label in tokens.labels if label != IGNORE_INDEX]


def expand(ids: list[int], image: int) -> list[int]:
    return [i for token in ids for i in ([token] * N_IMAGE if token == image else [token])]


def test_plain_is_image_then_supervised_caption_and_newline(tokenizer, encoder):
    turns = [Turn("user", "<image>\nDescribe it."), Turn("assistant", "a red circle.")]
    tokens = encoder.encode(make_template("plain", tokenizer).segments(turns, has_image=True))
    image = image_token_id(tokenizer)
    # The user's words are dropped, as in LLaVA: BOS, the image, then the caption and its newline.
    assert tokens.input_ids == expand(tokenizer("<image>a red circle.\n").input_ids, image)
    assert tokens.input_ids[: 1 + N_IMAGE] == [tokenizer.bos_token_id] + [image] * N_IMAGE
    assert tokens.labels[: 1 + N_IMAGE] == [IGNORE_INDEX] * (1 + N_IMAGE)
    assert supervised(tokens) == tokens.input_ids[1 + N_IMAGE:]
    assert tokenizer.decode(supervised(tokens)) == "a red circle.\n"


def test_vicuna_ids_equal_the_whole_prompt_tokenized_and_answers_are_supervised(tokenizer, encoder):
    turns = parse_conversation([
        {"from": "human", "value": "<image>\nWhat color is the shape?"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "What shape is it?"},
        {"from": "gpt", "value": "circle"},
    ])
    tokens = encoder.encode(make_template("vicuna_v1", tokenizer).segments(turns, has_image=True))
    image = image_token_id(tokenizer)
    text = (f"{VICUNA_SYSTEM} USER: <image>\nWhat color is the shape? ASSISTANT: red</s>"
            "USER: What shape is it? ASSISTANT: circle</s>")
    # Exactly what a Hugging Face processor gives for the rendered prompt (BOS from the tokenizer).
    assert tokens.input_ids == expand(tokenizer(text).input_ids, image)
    assert tokens.input_ids[0] == tokenizer.bos_token_id
    # Labels sit on their tokens, and only the answers with their </s> are supervised.
    assert all(label == token for label, token in zip(tokens.labels, tokens.input_ids) if label != IGNORE_INDEX)
    assert tokenizer.decode(supervised(tokens)).replace(" ", "") == "red</s>circle</s>"
    assert tokens.labels.count(tokenizer.eos_token_id) == 2


def test_generation_prompt_is_the_training_prefix(tokenizer, encoder):
    template = make_template("vicuna_v1", tokenizer)
    turns = [Turn("user", "<image>\nWhat shape is it?"), Turn("assistant", "square")]
    full = encoder.encode(template.segments(turns, has_image=True)).input_ids
    prompt = encoder.encode(template.prompt_segments(turns[:1], has_image=True)).input_ids
    assert full[: len(prompt)] == prompt
    assert tokenizer.decode(full[len(prompt):]).strip() == "square</s>"


def test_text_only_vicuna_sample_has_no_image_tokens(tokenizer, encoder):
    turns = [Turn("user", "What is two plus two?"), Turn("assistant", "four")]
    tokens = encoder.encode(make_template("vicuna_v1", tokenizer).segments(turns, has_image=False))
    assert image_token_id(tokenizer) not in tokens.input_ids
    assert tokenizer.decode(supervised(tokens)).strip() == "four</s>"


def test_a_token_joining_template_and_answer_text_is_refused(tokenizer, encoder):
    """A token made of template characters and answer characters: a counted skip, never a guess."""
    from vdep.data.templates import Segment

    word = next(
        piece[1:] for piece in sorted(tokenizer.get_vocab())
        if piece.startswith("▁") and len(piece) >= 3 and piece[1:].isalpha()
        and tokenizer(piece[1:], add_special_tokens=False).input_ids == [tokenizer.convert_tokens_to_ids(piece)]
    )
    with pytest.raises(SampleError, match="joins template text and answer text") as error:
        encoder.encode([Segment(word[0], False), Segment(word[1:], True)])  # one token across the boundary
    assert error.value.reason == "template_mismatch"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ([], "bad_conversation"),
        ([{"from": "gpt", "value": "hi"}], "bad_conversation"),
        ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], "bad_conversation"),
        ([{"from": "human", "value": "a"}], "bad_conversation"),
        ([{"from": "robot", "value": "a"}, {"from": "gpt", "value": "b"}], "bad_conversation"),
        ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "  "}], "empty_answer"),
        ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "<image> b"}], "image_marker_mismatch"),
    ],
)
def test_malformed_conversations_are_rejected_with_a_reason(raw, reason):
    with pytest.raises(SampleError) as error:
        parse_conversation(raw)
    assert error.value.reason == reason


def test_image_markers_must_match_the_image():
    with_marker = [Turn("user", "<image>\nq"), Turn("assistant", "a")]
    without = [Turn("user", "q"), Turn("assistant", "a")]
    check_image_markers(with_marker, has_image=True)
    check_image_markers(without, has_image=False)
    for turns, has_image in ((without, True), (with_marker, False), ([Turn("user", "<image><image>"), Turn("assistant", "a")], True)):
        with pytest.raises(SampleError, match="marker") as error:
            check_image_markers(turns, has_image)
        assert error.value.reason == "image_marker_mismatch"


def test_plain_template_rejects_what_it_cannot_lay_out(tokenizer):
    plain = make_template("plain", tokenizer)
    with pytest.raises(SampleError, match="needs an image"):
        plain.segments([Turn("user", "q"), Turn("assistant", "a")], has_image=False)
    with pytest.raises(SampleError, match="one question and one answer"):
        plain.segments([Turn("user", "<image>q"), Turn("assistant", "a"), Turn("user", "q"), Turn("assistant", "a")], True)


def test_truncation_cuts_text_but_never_the_image():
    image = 99
    tokens = TokenizedConversation([1, image, image, 5, 6, 7, 8], [-100, -100, -100, 5, 6, 7, 8])
    cut = truncate(tokens, 5, image)
    assert cut.input_ids == [1, image, image, 5, 6] and cut.labels == [-100, -100, -100, 5, 6]
    assert truncate(tokens, 7, image) is tokens
    with pytest.raises(SampleError, match="would cut the image") as error:
        truncate(tokens, 2, image)
    assert error.value.reason == "too_long"


def test_template_and_tokenizer_consistency_check(tokenizer, encoder):
    for name in ("plain", "vicuna_v1"):
        check_template_tokenizer(make_template(name, tokenizer), encoder)
    # A real tokenizer without byte fallback that never saw capitals maps the template's "USER:" to
    # <unk>: training on that would teach text the template never wrote, so it is refused at start.
    from transformers import LlamaTokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["a chat between a curious human and an assistant. what is shown? a red circle."] * 20),
        model_writer=model, vocab_size=60, model_type="bpe", byte_fallback=False, character_coverage=1.0,
        minloglevel=2, hard_vocab_limit=False,
    )
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "tokenizer.model").write_bytes(model.getvalue())
        lowercase = LlamaTokenizer.from_pretrained(folder)
        lowercase.add_tokens(["<image>"], special_tokens=True)
        lowercase_encoder = TemplateTokenizer(lowercase, lowercase.convert_tokens_to_ids("<image>"), N_IMAGE)
        with pytest.raises(DataError, match="disagree"):
            check_template_tokenizer(make_template("vicuna_v1", lowercase), lowercase_encoder)


# ------------------------------------------------------------------ chat formats of other model families
TWO_ROUNDS = [Turn("user", "<image>\nWhat color is the shape?"), Turn("assistant", "The shape is red."),
              Turn("user", "Describe the image briefly."), Turn("assistant", "A red square on grey.")]


@pytest.mark.parametrize("family, expected_text, answers", [
    ("llama3",
     ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat color is the shape?<|eot_id|>"
      "<|start_header_id|>assistant<|end_header_id|>\n\nThe shape is red.<|eot_id|><|start_header_id|>user<|end_header_id|>"
      "\n\nDescribe the image briefly.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA red square on grey.<|eot_id|>"),
     ["The shape is red.<|eot_id|>", "A red square on grey.<|eot_id|>"]),
    ("qwen2",
     ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nWhat color is the shape?"
      "<|im_end|>\n<|im_start|>assistant\nThe shape is red.<|im_end|>\n<|im_start|>user\nDescribe the image briefly."
      "<|im_end|>\n<|im_start|>assistant\nA red square on grey.<|im_end|>\n"),
     ["The shape is red.<|im_end|>", "A red square on grey.<|im_end|>"]),
])
def test_llama3_and_qwen2_layouts_label_each_answer_with_its_end_of_turn(request, family, expected_text, answers):
    tokenizer = request.getfixturevalue(f"{family}_tokenizer")
    image = image_token_id(tokenizer)
    encoder = TemplateTokenizer(tokenizer, image, N_IMAGE)
    template = make_template(family, tokenizer)
    check_template_tokenizer(template, encoder)
    tokens = encoder.encode(template.segments(TWO_ROUNDS, has_image=True))
    assert tokenizer.decode([t for t in tokens.input_ids if t != image]) == expected_text.replace("<image>", "")
    assert tokens.input_ids.count(image) == N_IMAGE
    # The labels are exactly the two answers with their end-of-turn tokens, as contiguous runs.
    runs, current = [], []
    for label in tokens.labels:
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    if current:
        runs.append(current)
    assert [tokenizer.decode(run) for run in runs] == answers
    # Generation prompts end with the assistant header; training text continues from there.
    prompt = encoder.encode(template.prompt_segments(TWO_ROUNDS[:3], has_image=True)).input_ids
    assert tokens.input_ids[: len(prompt)] == prompt


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_the_tokenizers_own_chat_template_gives_the_same_ids_and_labels(request, family):
    tokenizer = request.getfixturevalue(f"{family}_tokenizer")
    encoder = TemplateTokenizer(tokenizer, image_token_id(tokenizer), N_IMAGE)
    ours = encoder.encode(make_template(family, tokenizer).segments(TWO_ROUNDS, has_image=True))
    chat = make_template("chat_template", tokenizer)
    check_template_tokenizer(chat, encoder)
    theirs = encoder.encode(chat.segments(TWO_ROUNDS, has_image=True))
    assert theirs.input_ids == ours.input_ids and theirs.labels == ours.labels
    prompt = encoder.encode(chat.prompt_segments(TWO_ROUNDS[:3], has_image=True)).input_ids
    assert prompt == encoder.encode(make_template(family, tokenizer).prompt_segments(TWO_ROUNDS[:3], True)).input_ids


def test_a_family_template_needs_the_familys_special_tokens(tokenizer, qwen2_tokenizer):
    with pytest.raises(DataError, match="<\\|start_header_id\\|>.*does not have"):
        make_template("llama3", tokenizer)
    with pytest.raises(DataError, match="has no chat_template"):
        make_template("chat_template", tokenizer)


def test_generation_stops_at_eos_and_at_the_formats_end_of_turn(tokenizer, base_llama3_tokenizer, qwen2_tokenizer):
    ids = base_llama3_tokenizer.convert_tokens_to_ids
    assert make_template("llama3", base_llama3_tokenizer).stop_token_ids == (ids("<|end_of_text|>"), ids("<|eot_id|>"))
    # The tokenizer's own template: the special token written right after an answer.
    assert make_template("chat_template", base_llama3_tokenizer).stop_token_ids == (ids("<|end_of_text|>"), ids("<|eot_id|>"))
    # Qwen2's EOS here is already the end of turn: listed once.
    assert make_template("qwen2", qwen2_tokenizer).stop_token_ids == (qwen2_tokenizer.convert_tokens_to_ids("<|im_end|>"),)
    assert make_template("chat_template", qwen2_tokenizer).stop_token_ids == (qwen2_tokenizer.convert_tokens_to_ids("<|im_end|>"),)
    for name in ("vicuna_v1", "plain"):
        assert make_template(name, tokenizer).stop_token_ids == (tokenizer.eos_token_id,)
