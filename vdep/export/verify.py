"""`vdep export-hf --verify`: the export computes what vdep computes.

Loads the export with transformers (its class: `LlavaForConditionalGeneration`, `LlavaNextForConditionalGeneration`
or `LlavaOnevisionForConditionalGeneration`, and its processor; an `--adapter` export with its PEFT adapter on
top, `PeftModel.from_pretrained`), runs probe samples through it and through vdep's own model (a LoRA stage's
with its adapters unmerged): one image, and, for a model that tiles (AnyRes), a tiled image and a sample of
two images. For each it checks:
- loading reports no missing, unexpected or mismatched weights;
- the processor's pixel values (every view of every image), image sizes and expanded input ids equal vdep's
  preprocessing of the same inputs (`data.anyres.MediaProcessor`, as training lays images out);
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
from ..data.anyres import MediaProcessor, layout_tensor
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
    """A sample the two models answer: its images (in marker order) and the question after them."""

    name: str
    images: tuple[Image.Image, ...]
    question: str = PROBE_QUESTION


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


def probes(tiles: bool) -> list[Probe]:
    if not tiles:
        return [Probe("one image", (probe_image(),))]
    return [Probe("one tiled image", (probe_image(),)),
            Probe("two images", (probe_image(), second_probe_image()), "Which image shows a triangle?")]


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
    for probe in probes(model.spec.geometry.anyres):
        report.probes.append(_compare(result, model, hf_model, processor, model_type, probe, max_new_tokens))
    return report


def _compare(result: ExportResult, model, hf_model, processor, model_type: str, probe: Probe,
             max_new_tokens: int) -> ProbeParity:
    parity = ProbeParity(probe.name)
    images = list(probe.images)
    if result.template == "plain":
        conversation = [{"role": "user", "content": [{"type": "image"}] * len(images)}]
    else:
        conversation = [{"role": "user", "content": [{"type": "image"}] * len(images)
                         + [{"type": "text", "text": probe.question}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    # OneVision's processor takes a sample's images as one list (a multi-image sample is not tiled).
    inputs = processor(images=[images] if model_type == "llava_onevision" else images, text=prompt, return_tensors="pt")

    # vdep's side: the training template and training's image layout (data/anyres.py).
    spec = model.spec
    template = make_template(result.template, result.tokenizer)
    encoder = TemplateTokenizer(result.tokenizer, spec.image_token_id, spec.num_image_tokens)
    views = MediaProcessor(spec.geometry, result.image_processing)(images)
    turns = [Turn("user", f"{IMAGE_MARKER}\n" * len(images) + probe.question)]
    ids = encoder.encode(template.prompt_segments(turns, has_image=True), [i.tokens for i in views.images]).input_ids
    pixels = normalise_pixels(views.pixels, result.image_processing.normalisation_table())
    layout = layout_tensor(views.images)
    parity.input_ids_equal = inputs["input_ids"][0].tolist() == ids
    parity.pixel_values_equal = _same_pixels(inputs, pixels, views.images, model_type)

    input_ids = torch.tensor([ids])
    with torch.no_grad():
        embeds = model.embed(input_ids, pixels, len(images), image_layout=layout)
        ours = model.lm_head(model.hidden_states(embeds, torch.ones_like(input_ids)))
        if parity.input_ids_equal:  # transformers' inputs as its processor made them, as a user runs it
            theirs = hf_model(**inputs).logits
            parity.max_abs_logit_diff = float((ours - theirs).abs().max())
    stops = template.stop_token_ids
    parity.vdep_tokens = greedy_generate(model, [ids], pixels, len(images), max_new_tokens, stops,
                                         result.tokenizer.pad_token_id, image_layout=layout)[0]
    with torch.no_grad():
        generated = hf_model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    parity.hf_tokens = until_stop(generated[0, inputs["input_ids"].shape[1]:].tolist(), stops)
    return parity


def _same_pixels(inputs, pixels: torch.Tensor, images, model_type: str) -> bool:
    """The processor's views (Llava: one per image; LlavaNext/OneVision: (images, most views, ...), zero-padded),
    and its image sizes, are vdep's."""
    theirs = inputs["pixel_values"].float()
    if model_type == "llava":
        return torch.equal(theirs, pixels)
    views = [theirs[index, : image.views] for index, image in enumerate(images)]
    sizes = [[image.height, image.width] for image in images]
    return (theirs.shape[0] == len(images) and torch.equal(torch.cat(views), pixels)
            and inputs["image_sizes"].tolist() == sizes)
