"""`vdep export-hf --verify`: the export computes what vdep computes.

Loads the export with transformers (its class: `LlavaForConditionalGeneration`, `LlavaNextForConditionalGeneration`
or `LlavaOnevisionForConditionalGeneration`, and its processor; an `--adapter` export with its PEFT adapter on
top, `PeftModel.from_pretrained`), runs probe samples through it and through vdep's own model (a LoRA stage's
with its adapters unmerged): one image, and, for a model that tiles (AnyRes), a tiled image and a sample of
two images, and, for a OneVision export (`anyres_max_N`), a video of three frames. For each it checks:
- loading reports no missing, unexpected or mismatched weights;
- the processor's pixel values (every view of every image, every frame of a video: `pixel_values_videos`), image
  sizes and expanded input ids equal vdep's preprocessing of the same inputs (`data.anyres.MediaProcessor`, as
  training lays images and videos out; a video's placeholders are `<video>` in the export, `<image>` in vdep);
- the logits agree (both models in fp32 with the exported weights; max |Δ| ≤ 1e-4);
- greedy decoding produces the same tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText

from ..conventions import IMAGE_MARKER
from ..data.anyres import VIDEO, ImageTokens, MediaProcessor, Video, layout_tensor
from ..data.conversation import Turn
from ..data.images import normalise_pixels
from ..data.templates import TemplateTokenizer, make_template
from ..model.generate import greedy_generate, until_stop
from ..model.lora import fold_adapters, has_adapters
from .hf import ExportResult
from .processors import load_processor

LOGIT_TOLERANCE = 1e-4
PROBE_QUESTION = "What color is the shape?"


@dataclass(frozen=True)
class Probe:
    """A sample the two models answer: its images (in marker order), or a video, and the question after them."""

    name: str
    images: tuple[Image.Image, ...] = ()
    question: str = PROBE_QUESTION
    video: Video | None = None

    @property
    def media(self) -> list[Image.Image | Video]:
        return [*self.images, *([self.video] if self.video is not None else [])]


@dataclass
class ProbeParity:
    name: str
    pixel_values_equal: bool = False
    input_ids_equal: bool = False
    max_abs_logit_diff: float = float("inf")
    vdep_tokens: list[int] = field(default_factory=list)
    hf_tokens: list[int] = field(default_factory=list)

    @property
    def greedy_equal(self) -> bool:
        return self.vdep_tokens == self.hf_tokens


@dataclass
class ParityReport:
    loading_problems: dict[str, list] = field(default_factory=dict)
    probes: list[ProbeParity] = field(default_factory=list)
    client: str = "transformers"
    reference: str = "vdep's model (a LoRA stage's with its adapters unmerged)"

    @property
    def pixel_values_equal(self) -> bool:
        return bool(self.probes) and all(p.pixel_values_equal for p in self.probes)

    @property
    def input_ids_equal(self) -> bool:
        return bool(self.probes) and all(p.input_ids_equal for p in self.probes)

    @property
    def max_abs_logit_diff(self) -> float:
        return max((p.max_abs_logit_diff for p in self.probes), default=float("inf"))

    @property
    def vdep_tokens(self) -> list[list[int]]:
        return [p.vdep_tokens for p in self.probes]

    @property
    def hf_tokens(self) -> list[list[int]]:
        return [p.hf_tokens for p in self.probes]

    @property
    def greedy_equal(self) -> bool:
        return bool(self.probes) and all(p.greedy_equal for p in self.probes)

    @property
    def passed(self) -> bool:
        return (not self.loading_problems and self.pixel_values_equal and self.input_ids_equal
                and self.max_abs_logit_diff <= LOGIT_TOLERANCE and self.greedy_equal)

    def summary(self) -> str:
        lines = [
            f"compared: {self.client} against {self.reference}",
            f"weights loaded by transformers: {'all, none unexpected' if not self.loading_problems else self.loading_problems}",
        ]
        for probe in self.probes:
            lines += [
                f"probe {probe.name}:",
                f"  processor pixel values and image sizes equal vdep's: {probe.pixel_values_equal}",
                f"  processor input ids equal vdep's: {probe.input_ids_equal}",
                f"  max |logit difference| (fp32): {probe.max_abs_logit_diff:.2e} (tolerance {LOGIT_TOLERANCE:.0e})",
                f"  greedy tokens equal: {probe.greedy_equal} (vdep {probe.vdep_tokens}, {self.client} {probe.hf_tokens})",
            ]
        lines.append(f"parity: {'PASSED' if self.passed else 'FAILED'}")
        return "\n".join(lines)


def probe_image() -> Image.Image:
    """A non-square image with edges and colours, so that the pad-to-square and resize paths are exercised."""
    image = Image.new("RGB", (120, 80), (40, 90, 160))
    draw = ImageDraw.Draw(image)
    draw.ellipse((10, 8, 60, 58), fill=(220, 30, 30))
    draw.rectangle((70, 30, 110, 75), fill=(250, 220, 40))
    return image


def second_probe_image() -> Image.Image:
    """A tall image, so that a two-image probe has images of other sizes and aspects (other grids, other counts)."""
    image = Image.new("RGB", (50, 140), (30, 160, 60))
    ImageDraw.Draw(image).polygon([(5, 130), (45, 130), (25, 20)], fill=(240, 240, 240))
    return image


def probe_video() -> Video:
    """Three non-square frames of a circle moving right: the frames' resize (and crop) is exercised, and each
    frame differs."""
    frames = []
    for step in range(3):
        frame = Image.new("RGB", (96, 72), (20, 40, 90))
        ImageDraw.Draw(frame).ellipse((8 + 28 * step, 20, 38 + 28 * step, 50), fill=(230, 60, 30))
        frames.append(frame)
    return Video(tuple(frames))


def probes(tiles: bool, videos: bool = False) -> list[Probe]:
    if not tiles:
        return [Probe("one image", (probe_image(),))]
    return [Probe("one tiled image", (probe_image(),)),
            Probe("two images", (probe_image(), second_probe_image()), "Which image shows a triangle?"),
            *([Probe("a video", question="Where does the circle go?", video=probe_video())] if videos else [])]


def verify_export(result: ExportResult, max_new_tokens: int = 8) -> ParityReport:
    report = ParityReport()
    hf_model, info = AutoModelForImageTextToText.from_pretrained(
        str(result.out), dtype=torch.float32, output_loading_info=True
    )
    report.loading_problems = {k: list(v) for k, v in info.items() if v}
    if result.adapter is not None:  # the base folder with the stage's PEFT adapter on top, as a user loads it
        from peft import PeftModel

        hf_model = PeftModel.from_pretrained(hf_model, str(result.adapter))
        report.client = "transformers + peft"
    hf_model.eval()
    model_type = json.loads((result.out / "config.json").read_text())["model_type"]
    processor = load_processor(result.out, model_type)
    if result.adapter is None and result.dtype != "fp32" and has_adapters(result.model):
        # Merging, then rounding to bf16/fp16, is not rounding, then adding the adapters: compare with the
        # merged weights as exported (an fp32 export is compared with the unmerged adapters).
        fold_adapters(result.model, result.model.multi_modal_projector.linear_1.weight.dtype)
        report.reference = f"vdep's model, its LoRA adapters merged and rounded to {result.dtype} as exported"
    model = result.model.float().eval()  # the exported weights, now computed in fp32
    # A OneVision export takes videos where its tokenizer holds `<video>` (export/layout.py: with_video_token).
    videos = model_type == "llava_onevision" and hf_model.config.video_token_id >= 0
    for probe in probes(model.spec.geometry.anyres, videos):
        report.probes.append(_compare(result, model, hf_model, processor, model_type, probe, max_new_tokens))
    return report


def _compare(result: ExportResult, model, hf_model, processor, model_type: str, probe: Probe,
             max_new_tokens: int) -> ProbeParity:
    parity = ProbeParity(probe.name)
    images, media = list(probe.images), probe.media
    parts = [{"type": "image"}] * len(images) + [{"type": "video"}] * (probe.video is not None)
    if result.template != "plain":
        parts.append({"type": "text", "text": probe.question})
    prompt = processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True)
    # OneVision's processor takes a sample's images as one list (a multi-image sample is not tiled), a video as
    # the list of its frames.
    inputs = processor(images=([images] if model_type == "llava_onevision" else images) if images else None,
                       videos=[list(probe.video.frames)] if probe.video is not None else None,
                       text=prompt, return_tensors="pt")

    # vdep's side: the training template and training's image layout (data/anyres.py).
    spec = model.spec
    template = make_template(result.template, result.tokenizer)
    encoder = TemplateTokenizer(result.tokenizer, spec.image_token_id, spec.num_image_tokens)
    views = MediaProcessor(spec.geometry, result.image_processing)(media)
    turns = [Turn("user", f"{IMAGE_MARKER}\n" * len(media) + probe.question)]
    ids = encoder.encode(template.prompt_segments(turns, has_image=True), [i.tokens for i in views.images]).input_ids
    pixels = normalise_pixels(views.pixels, result.image_processing.normalisation_table())
    layout = layout_tensor(views.images)
    expected_ids = with_video_placeholders(ids, views.images, spec.image_token_id, hf_model.config)
    parity.input_ids_equal = inputs["input_ids"][0].tolist() == expected_ids
    parity.pixel_values_equal = _same_pixels(inputs, pixels, views.images, model_type)

    input_ids = torch.tensor([ids])
    with torch.no_grad():
        embeds = model.embed(input_ids, pixels, len(media), image_layout=layout)
        ours = model.lm_head(model.hidden_states(embeds, torch.ones_like(input_ids)))
        if parity.input_ids_equal:  # transformers' inputs as its processor made them, as a user runs it
            theirs = hf_model(**inputs).logits
            parity.max_abs_logit_diff = float((ours - theirs).abs().max())
    stops = template.stop_token_ids
    parity.vdep_tokens = greedy_generate(model, [ids], pixels, len(media), max_new_tokens, stops,
                                         result.tokenizer.pad_token_id, image_layout=layout)[0]
    with torch.no_grad():
        generated = hf_model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    parity.hf_tokens = until_stop(generated[0, inputs["input_ids"].shape[1]:].tolist(), stops)
    return parity


def with_video_placeholders(ids: list[int], images: list[ImageTokens], image_token_id: int, config) -> list[int]:
    """vdep's input ids as the export's processor writes them: a video's placeholders are `<video>` there (OneVision's
    `video_token_id`), `<image>` in vdep (its data marks a video with `<image>`)."""
    placeholders = iter([image.kind for image in images for _ in range(image.tokens)])
    return [config.video_token_id if token == image_token_id and next(placeholders) == VIDEO else token
            for token in ids]


def _same_pixels(inputs, pixels: torch.Tensor, images: list[ImageTokens], model_type: str) -> bool:
    """The processor's views (Llava: one per image; LlavaNext/OneVision: (images, most views, ...), zero-padded),
    its image sizes, and a video's frames (`pixel_values_videos`: (1, frames, ...)), are vdep's."""
    stills = [image for image in images if image.kind != VIDEO]
    still_views = sum(image.views for image in stills)
    if len(stills) < len(images):  # a video comes after the images (docs/data.md); its frames are the last views
        theirs = inputs.get("pixel_values_videos")
        if theirs is None or not torch.equal(theirs.float().flatten(0, 1), pixels[still_views:]):
            return False
    if not stills:
        return "pixel_values" not in inputs
    theirs, pixels = inputs["pixel_values"].float(), pixels[:still_views]
    if model_type == "llava":
        return torch.equal(theirs, pixels)
    views = [theirs[index, : image.views] for index, image in enumerate(stills)]
    sizes = [[image.height, image.width] for image in stills]
    return (theirs.shape[0] == len(stills) and torch.equal(torch.cat(views), pixels)
            and inputs["image_sizes"].tolist() == sizes)
