"""The two ways `vdep eval` answers questions, both batched greedy decoding with the KV cache:

- `VdepAnswerer`: a run directory, a stage folder or a checkpoint, through vdep's own model
  (`evaluate.load_trained_model`: the model `rundir.resolve_model` names, the one the exporter writes from
  the same path) and `model.generate.greedy_generate`, prompted by the training template;
- `HFAnswerer`: an exported Hugging Face folder (Llava, LlavaNext or LlavaOnevision), through transformers'
  `generate` with the folder's processor and chat template, as a user of the export (and lmms-eval's `llava_hf`)
  runs it.

A question may show several images (one `<image>` marker each) or a video (its frames); both lay them out as
training does. Transformers' side takes a video only through a OneVision export, whose prompt marks it with
`<video>`; another export's class has no video input, so `check` names such a question instead of asking it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..conventions import IMAGE_MARKER
from ..data.anyres import Media, MediaProcessor, Video, layout_tensor
from ..data.conversation import SampleError, Turn
from ..data.images import decode_image, normalise_pixels
from ..data.templates import TemplateTokenizer, make_template
from ..errors import CheckpointError
from ..evaluate import TrainedModel, load_trained_model
from ..export.layout import VIDEO_TOKEN
from ..model.generate import greedy_generate, until_stop
from .questions import Question


@dataclass(frozen=True)
class Prepared:
    """A question whose images and video (if any) decoded, in marker order."""

    question: Question
    media: tuple[Media, ...] = ()  # PIL images, then a `Video` of PIL frames

    @property
    def video(self) -> Video | None:
        return next((item for item in self.media if isinstance(item, Video)), None)


class VdepAnswerer:
    def __init__(self, trained: TrainedModel, max_new_tokens: int, template: str | None = None,
                 description: str = "vdep model", synced: bool = False):
        self.trained = trained
        parameter = next(trained.model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype  # a bf16 model in training takes bf16 pixels
        self.max_new_tokens = max_new_tokens
        self.template = make_template(template or trained.template, trained.tokenizer)
        self.encoder = TemplateTokenizer(trained.tokenizer, trained.spec.image_token_id, trained.spec.num_image_tokens)
        self.media = MediaProcessor(trained.spec.geometry, trained.image_processing)  # views and tokens, as in training
        self.description = description
        self.synced = synced  # every rank of a ZeRO-3 run decodes at once (validation during training)

    @classmethod
    def load(cls, path: Path, device: torch.device, max_new_tokens: int) -> VdepAnswerer:
        trained = load_trained_model(path, device, allow_base=True)
        contains = trained.source.description  # type: ignore[union-attr]
        return cls(trained, max_new_tokens, description=f"vdep model of {path} ({contains}, template {trained.template})")

    def check(self, item: Prepared) -> None:
        """Raises `SampleError` for a question this model cannot be asked (a video under a tower that keeps CLS)."""
        if item.video is not None:
            self.trained.spec.geometry.check_video()

    def answer(self, batch: list[Prepared]) -> list[str]:
        trained, template = self.trained, self.template
        views = [self.media(list(item.media)) if item.media else None for item in batch]
        prompts = [self.encoder.encode(template.prompt_segments([Turn("user", item.question.question)], seen is not None),
                                       [image.tokens for image in seen.images] if seen is not None else []).input_ids
                   for item, seen in zip(batch, views)]
        shown = [seen for seen in views if seen is not None]
        table = trained.image_processing.normalisation_table()
        pixel_values = (normalise_pixels(torch.cat([seen.pixels for seen in shown]), table) if shown
                        else torch.zeros((1, 3, *trained.image_processing.output_size)))
        layout = layout_tensor([image for seen in shown for image in seen.images]).to(self.device)
        images = sum(len(seen.images) for seen in shown)
        outputs = greedy_generate(trained.model, prompts, pixel_values.to(self.device, self.dtype), images,
                                  self.max_new_tokens, template.stop_token_ids, trained.tokenizer.pad_token_id,
                                  synced=self.synced, image_layout=layout)
        answers = []
        for output in outputs:
            text = trained.tokenizer.decode(output, skip_special_tokens=True)
            if template.stop_text:
                text = text.split(template.stop_text)[0]
            answers.append(text.strip())
        return answers


def chat_message(question: Question) -> list[dict]:
    """The question as one chat message: its text as the record has it, each `<image>` marker where it stands
    (the export's chat template renders text content as it is, and the processor expands every marker into
    that image's tokens), so the prompt is the training template's for the same record, whatever the text
    around the markers (content parts would put a newline after every image). A video's marker, the last (a
    video comes after the images), becomes OneVision's `<video>`."""
    text = question.question
    if question.video is not None:
        before, _, after = text.rpartition(IMAGE_MARKER)
        text = before + VIDEO_TOKEN + after
    return [{"role": "user", "content": text}]


class HFAnswerer:
    def __init__(self, folder: Path, device: torch.device, max_new_tokens: int):
        from transformers import AutoModelForImageTextToText, GenerationConfig

        from ..export.processors import load_processor

        try:
            self.model = AutoModelForImageTextToText.from_pretrained(str(folder), dtype=torch.float32).to(device).eval()
            self.processor = load_processor(folder, self.model.config.model_type)
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"--model {folder}: transformers cannot load it as a Llava folder: {exc}") from None
        # OneVision's processor takes each sample's images as one list (a multi-image sample is not tiled).
        self.nested_images = self.model.config.model_type == "llava_onevision"
        # Only OneVision takes videos, and only with a `<video>` token (export/layout.py: with_video_token).
        self.takes_videos = self.nested_images and getattr(self.model.config, "video_token_id", -1) >= 0
        self.processor.tokenizer.padding_side = "left"  # generation continues each prompt from its end
        self.stop_token_ids = GenerationConfig.from_model_config(self.model.config).eos_token_id
        if self.model.generation_config.eos_token_id is not None:
            self.stop_token_ids = self.model.generation_config.eos_token_id
        if isinstance(self.stop_token_ids, int):
            self.stop_token_ids = [self.stop_token_ids]
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.description = f"transformers {type(self.model).__name__} of {folder}"

    def check(self, item: Prepared) -> None:
        """Raises `SampleError` for a question the export's class cannot be asked: a video, but for OneVision."""
        if item.video is not None and not self.takes_videos:
            raise SampleError("unsupported_record", f"a video: {type(self.model).__name__} has no video input (a "
                              "model trained with model.image_aspect_ratio=anyres_max_N exports to "
                              "LlavaOnevisionForConditionalGeneration, which takes videos; or evaluate the run directory)")

    @torch.no_grad()
    def answer(self, batch: list[Prepared]) -> list[str]:
        """The batch in groups that transformers can take in one call: the questions without a video, then those
        with a video of each frame count (the model takes a call's videos as one (videos, frames, ...) tensor)."""
        groups: dict[int, list[int]] = {}
        for index, item in enumerate(batch):
            groups.setdefault(len(item.video.frames) if item.video is not None else 0, []).append(index)
        answers: list[str] = [""] * len(batch)
        for indices in groups.values():
            for index, answer in zip(indices, self._answer_group([batch[i] for i in indices])):
                answers[index] = answer
        return answers

    def _answer_group(self, batch: list[Prepared]) -> list[str]:
        processor = self.processor
        prompts = [processor.apply_chat_template(chat_message(item.question), add_generation_prompt=True)
                   for item in batch]
        stills = [[image for image in item.media if not isinstance(image, Video)] for item in batch]
        if self.nested_images:
            images = [item for item in stills if item]
        else:
            images = [image for item in stills for image in item]
        videos = [list(item.video.frames) for item in batch if item.video is not None]
        inputs = processor(images=images or None, videos=videos or None, text=prompts, padding=True,
                           return_tensors="pt").to(self.device)
        generated = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new_tokens = generated[:, inputs["input_ids"].shape[1]:].tolist()
        tokenizer = processor.tokenizer
        return [tokenizer.decode(until_stop(row, self.stop_token_ids or []), skip_special_tokens=True).strip()
                for row in new_tokens]


def is_hf_folder(path: Path) -> bool:
    """An exported folder (config.json of a Llava model) rather than a vdep run directory."""
    return (path / "config.json").is_file() and not (path / "config.yaml").is_file()


def make_answerer(path: Path, device: torch.device, max_new_tokens: int) -> VdepAnswerer | HFAnswerer:
    if not path.exists():
        raise CheckpointError(f"--model {path} does not exist")
    if is_hf_folder(path):
        return HFAnswerer(path, device, max_new_tokens)
    return VdepAnswerer.load(path, device, max_new_tokens)


def prepare(question: Question) -> Prepared:
    """The question with its images and video decoded, in RGB as both preprocessors expect them; a video file is
    decoded and sampled as build-shards does it (PyAV; its frames through JPEG, as a shard stores them). A picture
    or video that is missing or does not decode raises `SampleError` (a cause in words)."""
    try:
        data = question.read_images()
    except OSError as exc:
        raise SampleError("missing_image", f"cannot read the image: {exc}") from None
    media: list[Media] = []
    for number, raw in enumerate(data):
        where = str(question.images[number]) if isinstance(question.images[number], Path) else f"{question.id} image {number}"
        media.append(_rgb(raw, where))
    if question.video is not None:
        media.append(_video(question))
    return Prepared(question, tuple(media))


def _rgb(raw: bytes, where: str):
    image = decode_image(raw, where)
    return image if image.mode == "RGB" else image.convert("RGB")


def _video(question: Question) -> Video:
    from ..data_tools.media import decode_video

    video = question.video
    assert video is not None
    if video.file is not None:
        frames = [data for _, data in decode_video(video.file, video.file.name, video.sampling)]
    else:
        try:
            frames = [frame if isinstance(frame, bytes) else frame.read_bytes() for frame in video.frames]
        except OSError as exc:
            raise SampleError("missing_image", f"cannot read a frame of the video: {exc}") from None
    return Video(tuple(_rgb(data, f"{question.where} frame {number}") for number, data in enumerate(frames)))
