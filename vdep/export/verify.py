"""`vdep export-hf --verify`: the export computes what vdep computes.

Loads the export with transformers (`LlavaForConditionalGeneration`, `AutoProcessor`; an `--adapter`
export with its PEFT adapter on top, `PeftModel.from_pretrained`), runs one image and prompt through
it and through vdep's own model (a LoRA stage's with its adapters unmerged), and checks:
- loading reports no missing, unexpected or mismatched weights;
- the processor's pixel values and input ids equal vdep's preprocessing of the same inputs;
- the logits agree (both models in fp32 with the exported weights; max |Δ| ≤ 1e-4);
- greedy decoding produces the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image, ImageDraw
from transformers import AutoProcessor, LlavaForConditionalGeneration

from ..conventions import IMAGE_MARKER
from ..data.conversation import Turn
from ..data.images import preprocess_image
from ..data.templates import TemplateTokenizer, make_template
from ..model.generate import greedy_generate, until_stop
from ..model.lora import fold_adapters, has_adapters
from .hf import ExportResult

LOGIT_TOLERANCE = 1e-4
PROBE_QUESTION = "What color is the shape?"


@dataclass
class ParityReport:
    loading_problems: dict[str, list] = field(default_factory=dict)
    pixel_values_equal: bool = False
    input_ids_equal: bool = False
    max_abs_logit_diff: float = float("inf")
    vdep_tokens: list[int] = field(default_factory=list)
    hf_tokens: list[int] = field(default_factory=list)
    client: str = "transformers"
    reference: str = "vdep's model (a LoRA stage's with its adapters unmerged)"

    @property
    def greedy_equal(self) -> bool:
        return self.vdep_tokens == self.hf_tokens

    @property
    def passed(self) -> bool:
        return (not self.loading_problems and self.pixel_values_equal and self.input_ids_equal
                and self.max_abs_logit_diff <= LOGIT_TOLERANCE and self.greedy_equal)

    def summary(self) -> str:
        return "\n".join([
            f"compared: {self.client} against {self.reference}",
            f"weights loaded by transformers: {'all, none unexpected' if not self.loading_problems else self.loading_problems}",
            f"processor pixel values equal vdep's: {self.pixel_values_equal}",
            f"processor input ids equal vdep's: {self.input_ids_equal}",
            f"max |logit difference| (fp32): {self.max_abs_logit_diff:.2e} (tolerance {LOGIT_TOLERANCE:.0e})",
            f"greedy tokens equal: {self.greedy_equal} (vdep {self.vdep_tokens}, {self.client} {self.hf_tokens})",
            f"parity: {'PASSED' if self.passed else 'FAILED'}",
        ])


def probe_image() -> Image.Image:
    """A non-square image with edges and colours, so that the pad-to-square and resize paths are exercised."""
    image = Image.new("RGB", (120, 80), (40, 90, 160))
    draw = ImageDraw.Draw(image)
    draw.ellipse((10, 8, 60, 58), fill=(220, 30, 30))
    draw.rectangle((70, 30, 110, 75), fill=(250, 220, 40))
    return image


def verify_export(result: ExportResult, max_new_tokens: int = 8) -> ParityReport:
    report = ParityReport()
    hf_model, info = LlavaForConditionalGeneration.from_pretrained(
        str(result.out), dtype=torch.float32, output_loading_info=True
    )
    report.loading_problems = {k: list(v) for k, v in info.items() if v}
    if result.adapter is not None:  # the base folder with the stage's PEFT adapter on top, as a user loads it
        from peft import PeftModel

        hf_model = PeftModel.from_pretrained(hf_model, str(result.adapter))
        report.client = "transformers + peft"
    hf_model.eval()
    processor = AutoProcessor.from_pretrained(str(result.out))
    image = probe_image()
    turns = [Turn("user", f"{IMAGE_MARKER}\n{PROBE_QUESTION}")]
    if result.template == "plain":
        conversation = [{"role": "user", "content": [{"type": "image"}]}]
    else:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROBE_QUESTION}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")

    spec = result.model.spec
    template = make_template(result.template, result.tokenizer)
    encoder = TemplateTokenizer(result.tokenizer, spec.image_token_id, spec.num_image_tokens)
    ids = encoder.encode(template.prompt_segments(turns, has_image=True)).input_ids
    pixels = preprocess_image(image, result.image_processing).unsqueeze(0)
    report.input_ids_equal = inputs["input_ids"][0].tolist() == ids
    report.pixel_values_equal = torch.equal(inputs["pixel_values"].float(), pixels)

    if result.adapter is None and result.dtype != "fp32" and has_adapters(result.model):
        # Merging, then rounding to bf16/fp16, is not rounding, then adding the adapters: compare with the
        # merged weights as exported (an fp32 export is compared with the unmerged adapters).
        fold_adapters(result.model, result.model.multi_modal_projector.linear_1.weight.dtype)
        report.reference = f"vdep's model, its LoRA adapters merged and rounded to {result.dtype} as exported"
    model = result.model.float().eval()  # the exported weights, now computed in fp32
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        embeds = model.embed(input_ids, pixels, 1)
        ours = model.lm_head(model.hidden_states(embeds, torch.ones_like(input_ids)))
        theirs = hf_model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixels).logits
    report.max_abs_logit_diff = float((ours - theirs).abs().max())
    tokenizer = result.tokenizer
    stops = template.stop_token_ids
    report.vdep_tokens = greedy_generate(model, [ids], pixels, 1, max_new_tokens, stops, tokenizer.pad_token_id)[0]
    with torch.no_grad():
        generated = hf_model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixels,
            max_new_tokens=max_new_tokens, do_sample=False,
        )[0, len(ids):].tolist()
    report.hf_tokens = until_stop(generated, stops)  # transformers stops at generation_config's eos_token_id list
    return report
