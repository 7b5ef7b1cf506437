"""Procedural image–text data for the demo and the tests.

Each image shows one coloured shape in one quadrant of a noisy background, at a random size and
aspect ratio (so LLaVA's pad-to-square matters). Captions describe it; questions ask for its colour,
shape or position, which only the image can answer. Text-only arithmetic conversations are mixed into
the instruction data so the text-only path is exercised as well. A text corpus (write_text_corpus) asks
the same questions of scenes described in words, for the recipe whose LLM is pretrained on text first.
Everything is a pure function of the seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 200, 30),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
QUESTIONS = {
    "colour": ("What color is the shape?", COLOURS),
    "shape": ("What shape is it?", SHAPES),
    "position": ("Where is the shape?", POSITIONS),
}
CAPTIONS = (
    "a {colour} {shape} in the {position}.",
    "A {colour} {shape} at the {position} of the picture.",
    "The image shows a {colour} {shape} in the {position} corner.",
)
ALIGN_PROMPT = "<image>\nDescribe the image briefly."
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    position: str

    def answer(self, kind: str) -> str:
        return {"colour": self.colour, "shape": self.shape, "position": self.position}[kind]


def chance_accuracy() -> float:
    """Expected accuracy of guessing uniformly, over the evaluation's even mix of question kinds."""
    return sum(1 / len(options) for _, options in QUESTIONS.values()) / len(QUESTIONS)


def draw_scene(scene: Scene, rng: random.Random) -> Image.Image:
    width, height = rng.choice(((80, 64), (64, 80), (72, 72), (96, 72)))
    noise = np.random.default_rng(rng.getrandbits(64)).integers(200, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(noise, "RGB")
    draw = ImageDraw.Draw(image)
    size = rng.randint(min(width, height) // 4, min(width, height) // 3)
    right = scene.position.endswith("right")
    bottom = scene.position.startswith("bottom")
    x0 = rng.randint(width // 2 + 2, width - size - 2) if right else rng.randint(2, width // 2 - size - 2)
    y0 = rng.randint(height // 2 + 2, height - size - 2) if bottom else rng.randint(2, height // 2 - size - 2)
    box = (x0, y0, x0 + size, y0 + size)
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif scene.shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x0 + size / 2, y0), (x0, y0 + size), (x0 + size, y0 + size)], fill=fill)
    return image


def object_mask(picture: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 picture drawn by `draw_scene` (also resized or padded) → (H, W) bool: the shape's
    pixels. The shapes are painted in saturated colours (channels 130 or more apart), the background is
    pale noise (channels at most 55 apart) and padding is grey."""
    channels = picture.astype(np.int16)
    return (channels.max(axis=2) - channels.min(axis=2)) > 80  # between the two, for blended edges and JPEG


def random_scene(rng: random.Random) -> Scene:
    return Scene(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(POSITIONS))


def _save_image(image: Image.Image, folder: Path, name: str, rng: random.Random) -> str:
    # Mostly PNG, some JPEG: both paths of the decoder get used.
    filename = f"{name}.jpg" if rng.random() < 0.25 else f"{name}.png"
    image.save(folder / filename, quality=95) if filename.endswith(".jpg") else image.save(folder / filename)
    return filename


def text_only_conversation(rng: random.Random) -> list[dict]:
    a, b = rng.randint(0, 5), rng.randint(0, 5)
    return [
        {"from": "human", "value": f"What is {NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]}?"},
        {"from": "gpt", "value": NUMBER_WORDS[a + b]},
    ]


def scene_in_words(scene: Scene) -> str:
    return f"Scene: {scene.colour} {scene.shape}, {scene.position}."


def text_corpus_conversation(rng: random.Random) -> list[dict]:
    """The image data's tasks, on a scene given in words instead of an image: captions (as align asks
    for them) and questions (as finetune asks them), plus the arithmetic. The text-only pretraining that
    gives the tiny LLM the words, the formats and the answers before it sees an image; align then has to
    make the projector say to the frozen LLM what the words said."""
    draw = rng.random()
    if draw < 0.1:
        return text_only_conversation(rng)
    scene = random_scene(rng)
    if draw < 0.4:
        caption = rng.choice(CAPTIONS).format(**scene.__dict__)
        prompt = ALIGN_PROMPT.replace("<image>", scene_in_words(scene))
        return [{"from": "human", "value": prompt}, {"from": "gpt", "value": caption}]
    return question_turns(scene, rng.sample(list(QUESTIONS), k=rng.randint(1, 3)), scene_in_words(scene))


def question_turns(scene: Scene, kinds: list[str], first_prefix: str) -> list[dict]:
    """One question per kind, answered from the scene; the first question after `first_prefix` (the image
    marker, or the scene in words)."""
    conversation = []
    for turn, kind in enumerate(kinds):
        question = QUESTIONS[kind][0]
        conversation.append({"from": "human", "value": f"{first_prefix}\n{question}" if turn == 0 else question})
        conversation.append({"from": "gpt", "value": scene.answer(kind)})
    return conversation


def write_text_corpus(out: Path, seed: int, count: int) -> Path:
    """text.json: `count` text-only conversations (no image), from a generator of its own, so the image
    data of the same seed stays what write_demo_data makes."""
    rng = random.Random(seed + 2_000_003)
    records = [{"id": f"text-corpus-{index}", "conversations": text_corpus_conversation(rng)} for index in range(count)]
    out.mkdir(parents=True, exist_ok=True)
    path = out / "text.json"
    path.write_text(json.dumps(records, indent=0))
    return path


def write_demo_data(out: Path, seed: int, num_align: int, num_finetune: int, num_eval: int) -> dict[str, Path]:
    """Write images and LLaVA JSON files for the two stages and the held-out evaluation."""
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    align, finetune, held_out = [], [], []
    for index in range(num_align):
        scene = random_scene(rng)
        filename = _save_image(draw_scene(scene, rng), images, f"align_{index:06d}", rng)
        caption = rng.choice(CAPTIONS).format(**scene.__dict__)
        align.append({
            "id": f"align-{index}",
            "image": filename,
            "conversations": [{"from": "human", "value": ALIGN_PROMPT}, {"from": "gpt", "value": caption}],
        })
    for index in range(num_finetune):
        if rng.random() < 0.1:
            finetune.append({"id": f"text-{index}", "conversations": text_only_conversation(rng)})
            continue
        scene = random_scene(rng)
        filename = _save_image(draw_scene(scene, rng), images, f"finetune_{index:06d}", rng)
        conversation = question_turns(scene, rng.sample(list(QUESTIONS), k=rng.randint(1, 3)), "<image>")
        finetune.append({"id": f"finetune-{index}", "image": filename, "conversations": conversation})
    eval_rng = random.Random(seed + 1_000_003)
    for index in range(num_eval):
        scene = random_scene(eval_rng)
        filename = _save_image(draw_scene(scene, eval_rng), images, f"eval_{index:06d}", eval_rng)
        kind = list(QUESTIONS)[index % len(QUESTIONS)]
        held_out.append({
            "id": f"eval-{index}",
            "image": filename,
            "kind": kind,
            "conversations": [
                {"from": "human", "value": f"<image>\n{QUESTIONS[kind][0]}"},
                {"from": "gpt", "value": scene.answer(kind)},
            ],
        })
    paths = {"align": out / "align.json", "finetune": out / "finetune.json", "eval": out / "eval.json"}
    for name, records in (("align", align), ("finetune", finetune), ("eval", held_out)):
        paths[name].write_text(json.dumps(records, indent=0))
    return paths
