"""`vdep export-hf`: a vdep checkpoint → a Hugging Face `LlavaForConditionalGeneration` folder, or, for a model
that tiles its images, `LlavaNextForConditionalGeneration` (`anyres`) or `LlavaOnevisionForConditionalGeneration`
(`anyres_max_N`): `layout.export_class`.

The model is the one `rundir.resolve_model` names for the path (the rule is in docs/export.md), rebuilt
by `evaluate.build_trained_model` as evaluation rebuilds it, in the output dtype (one copy of the model):
the base weights, then the weight layers copied in one tensor at a time. Its parameters are written in
shards under the llava-hf on-disk names. Beside them: `config.json` (`LlavaConfig`, `LlavaNextConfig` or
`LlavaOnevisionConfig`), the tokenizer with `<image>` and pad, an image processor that reproduces the training
preprocessing (pad-to-square included; under AnyRes the very processor training tiles with, with its grid
pinpoints; the PIL backend, whose arithmetic vdep reproduces), a processor with a chat template that
renders the training template (several images in one message too), `generation_config.json` and a model card. Everything is written into a
temporary folder that is renamed into place at the end.
"""

from __future__ import annotations

import copy
import datetime
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import GenerationConfig, LlavaNextProcessor, LlavaProcessor
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from .. import __version__
from ..atomic import atomic_folder
from ..config import is_anyres
from ..data.anyres import anyres_image_processor
from ..data.images import ImageProcessing
from ..data.shards import SIZES_FILE
from ..data.templates import make_template
from ..errors import CheckpointError
from ..evaluate import build_trained_model
from ..log import get_logger
from ..model.attention import AttentionChoice
from ..model.build import DTYPES
from ..model.llava import VdepLlava
from ..model.lora import base_parameters, has_adapters, merged_parameters
from ..rundir import ModelSource, resolve_model
from ..structured import unstructure
from .adapter import ADAPTER_FOLDER, adapter_card, saved_modules, write_adapter
from .chat_templates import export_chat_template
from .layout import (
    LLAVA,
    LLAVA_NEXT,
    LLAVA_ONEVISION,
    export_class,
    llava_config,
    num_additional_image_tokens,
    to_hf_name,
    with_video_token,
)
from .processors import FrameVideoProcessor, OnevisionProcessor
from .writer import ShardedWriter, parse_size

log = get_logger("export")


@dataclass
class ExportResult:
    out: Path
    source: ModelSource
    model: VdepLlava
    tokenizer: object
    image_processing: ImageProcessing
    template: str
    adapter: Path | None = None  # the PEFT adapter folder of an `--adapter` export
    dtype: str = "fp32"


def image_processor_for(processing: ImageProcessing) -> LlavaImageProcessorPil:
    kwargs = {
        "do_pad": processing.pad_to_square,
        "do_center_crop": processing.crop is not None,
        "image_mean": list(processing.mean),
        "image_std": list(processing.std),
        "resample": processing.resample,
        "rescale_factor": processing.rescale_factor,
        "size": resize_setting(processing),
    }
    if processing.crop is not None:
        kwargs["crop_size"] = crop_setting(processing)
    return LlavaImageProcessorPil(**kwargs)


def resize_setting(processing: ImageProcessing) -> dict[str, int]:
    """transformers' `size` for the tower's resize."""
    if processing.shortest_edge is not None:
        return {"shortest_edge": processing.shortest_edge}
    return {"height": processing.size[0], "width": processing.size[1]}  # type: ignore[index]


def crop_setting(processing: ImageProcessing) -> dict[str, int] | None:
    """transformers' `crop_size` for the tower's centre crop (None: no crop)."""
    return None if processing.crop is None else {"height": processing.crop[0], "width": processing.crop[1]}


def export_processor(model: VdepLlava, processing: ImageProcessing, tokenizer, chat_template: str
                     ) -> LlavaProcessor | LlavaNextProcessor | OnevisionProcessor:
    """The processor of the export's class: its image processor reproduces training's views (AnyRes: the one
    training tiles with, `data.anyres.anyres_image_processor`, here with rescale and normalise), and it expands
    each `<image>` into the number of tokens training counted (for AnyRes by the same transformers rules)."""
    spec = model.spec
    kind = export_class(spec.geometry)
    extra = num_additional_image_tokens(spec.family)  # CLIP's CLS, which "default" drops
    if kind == LLAVA:
        return LlavaProcessor(
            image_processor=image_processor_for(processing), tokenizer=tokenizer,
            patch_size=model.vision_tower.config.patch_size, vision_feature_select_strategy=spec.feature_select,
            chat_template=chat_template, num_additional_image_tokens=extra)
    # Tiles and a multi-image sample's padded views are the tower's own processing without LLaVA-1.5's padding.
    image_processor = anyres_image_processor(spec.geometry, replace(processing, pad_to_square=False), normalise=True)
    if kind == LLAVA_NEXT:
        return LlavaNextProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=model.vision_tower.config.patch_size,
            vision_feature_select_strategy=spec.feature_select, chat_template=chat_template,
            num_additional_image_tokens=extra)
    # OneVision's processor counts a view's features with the CLS token that "default" then drops. Its video
    # processor is a frame's processing in training: the tower's resize, crop and normalisation, no padding
    # (data/anyres.py: MediaProcessor), through the PIL image path (processors.py: FrameVideoProcessor).
    video_processor = FrameVideoProcessor(
        size=resize_setting(processing), do_center_crop=processing.crop is not None, crop_size=crop_setting(processing),
        resample=processing.resample, image_mean=list(processing.mean), image_std=list(processing.std),
        rescale_factor=processing.rescale_factor)
    return OnevisionProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        num_image_tokens=spec.num_image_tokens + (extra if spec.feature_select == "default" else 0),
        vision_feature_select_strategy=spec.feature_select, chat_template=chat_template,
        vision_aspect_ratio=spec.geometry.aspect_ratio)


def exported_parameters(model: VdepLlava, dtype: torch.dtype, replaced: dict[str, torch.Tensor] | None
                        ) -> Iterator[tuple[str, torch.Tensor]]:
    """What the export folder holds: the model's parameters, with LoRA adapters merged in (`replaced` is
    None), or, for an adapter export, the model the adapters sit on (their stage's full-trained weights
    at their starting values)."""
    if not has_adapters(model):
        return model.named_parameters()
    if replaced is None:
        return merged_parameters(model, dtype)
    return ((name, replaced.get(name, tensor)) for name, tensor in base_parameters(model, dtype))


def write_weights(named: Iterable[tuple[str, torch.Tensor]], out: Path, max_shard_bytes: int, tied_lm_head: bool) -> int:
    writer = ShardedWriter(out, max_shard_bytes)
    seen: set[int] = set()  # of the model's own parameters, which stay alive (a merged weight is a new tensor)
    for name, param in named:
        hf_name = to_hf_name(name)
        if hf_name is None or id(param) in seen or (tied_lm_head and name.startswith("lm_head.")):
            continue
        if isinstance(param, torch.nn.Parameter):
            seen.add(id(param))
        writer.add(hf_name, param.detach())
    files = writer.close()
    return len(files)


def model_card(source: ModelSource, template: str, dtype: str, model_class: str = LLAVA) -> str:
    config = source.config
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        "tags: [llava, vdep]",
        "---",
        "",
        f"# {config.run.name}",
        "",
        (f"A LLaVA-style model (`{model_class}`) trained with [vdep](https://arxiv.org/abs/2502.09093) "
         f"(VDEP, vision dynamic embedding-guided pretraining). Exported by vdep {__version__} on "
         f"{datetime.date.today().isoformat()} in {dtype}; contains: {source.description}."),
        "",
        "## Use",
        "",
        "```python",
        f"from transformers import AutoProcessor, {model_class}",
        f"model = {model_class}.from_pretrained(PATH)",
        "processor = AutoProcessor.from_pretrained(PATH)",
        'conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]',
        "prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)",
        'inputs = processor(images=image, text=prompt, return_tensors="pt")',
        "print(processor.decode(model.generate(**inputs, max_new_tokens=64)[0], skip_special_tokens=True))",
        "```",
        "",
        (f"The chat template renders vdep's `{template}` training template; the image processor pads images to a "
         "square with the mean colour when the model was trained that way (LLaVA-1.5's `pad` mode)"
         + (f"; it tiles images as training did (`model.image_aspect_ratio: {config.model.image_aspect_ratio}`, grid "
            f"pinpoints {config.model.image_grid_pinpoints})." if model_class != LLAVA else ".")),
        *(["", ("Without torchvision, transformers 5.24 cannot build a OneVision processor (it checks the video "
                "processor against a class it exports only with torchvision): load it with "
                "`vdep.export.processors.load_processor(PATH, 'llava_onevision')`, or install torchvision and pass "
                "`backend='pil'` for the image processing training used."),
               "", ("Videos: give the frames as `videos=[frames]` with a `{\"type\": \"video\"}` part (the prompt's "
                    "`<video>`). vdep's loader processes frames as training did (PIL); transformers' own video processor "
                    "needs torchvision and resizes with it, not with PIL: its frames are not checked against training's.")]
             if model_class == LLAVA_ONEVISION else []),
        "",
        "## Model",
        "",
        (f"- vision tower: `{config.model.vision_tower.path or 'random init (tiny)'}`, feature layer "
         f"{config.model.vision_tower.feature_layer}"),
        f"- language model: `{config.model.language_model.path or 'random init (tiny)'}`",
        f"- projector: {config.model.projector}",
        "",
        "## Training",
        "",
        "| stage | template | trainable | LR | global batch | steps | final text loss | final VDEP loss | samples in shards |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, stage in config.stages.items():
        stage_dir = source.run.stage(name)
        summary = stage_dir.read_summary() if stage_dir.summary_file.is_file() else {}
        final = summary.get("final", {})
        samples = 0
        for shard_dir in stage.shards:
            sizes = Path(shard_dir) / SIZES_FILE
            if sizes.is_file():
                samples += sum(json.loads(sizes.read_text()).values())
        lines.append(
            f"| {name} | {stage.template} | {', '.join(stage.trainable)}{f' (LoRA r={stage.lora.r})' if stage.lora else ''} | "
            f"{stage.lr:g} | {stage.global_batch_size} | "
            f"{summary.get('steps', '–')} | {final.get('loss/text', float('nan')):.4f} | "
            f"{final.get('loss/vdep', float('nan')):.4f} | {samples or '–'} |"
        )
    lines += ["", "VDEP settings per stage:", "", "```json"]
    vdep = {name: unstructure(stage.vdep) for name, stage in config.stages.items()}
    lines += [json.dumps(vdep, indent=1), "```", ""]
    return "\n".join(lines)


def export_hf(checkpoint: Path, out: Path, dtype: str = "bf16", max_shard_size: str | int = "5GB",
              adapter: bool = False) -> ExportResult:
    """Write the export; returns what the parity check needs (the model stays in memory, in `dtype`, with
    its LoRA adapters unmerged: vdep's own model). A LoRA stage is merged into the weights, or, with
    `adapter`, written as a PEFT adapter folder (OUT/adapter) over the model it started from (OUT)."""
    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype must be one of {', '.join(DTYPES)}")
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} is not empty; choose a new --out folder")
    source = resolve_model(checkpoint)
    if adapter and source.lora is None:
        raise CheckpointError(f"--adapter: {source.description} has no LoRA adapters; export it without --adapter")
    if adapter and source.config.model.mm_patch_merge_type == "spatial_unpad" and is_anyres(
            source.config.model.image_aspect_ratio or "pad"):
        raise CheckpointError(
            f"--adapter: {source.description} has a learned image_newline, a parameter that trains with the projector "
            "and that a PEFT adapter folder (modules_to_save holds modules) cannot carry; export it merged, without "
            "--adapter"
        )
    log.info("export: %s from %s", source.description, source.run.path)
    trained = build_trained_model(source, DTYPES[dtype], AttentionChoice("sdpa", "export"), keep_replaced=adapter)
    model, tokenizer, image_processing, replaced = trained.model, trained.tokenizer, trained.image_processing, trained.replaced
    for layer in source.layers:
        log.info("export: applied %s", layer.description)
    # The export's copy of the tokenizer carries the chat template (write_export) and, for OneVision, `<video>`; the
    # training tokenizer stays as it was, so that `verify_export` encodes the training side as training does.
    exported_tokenizer = copy.deepcopy(tokenizer)
    if export_class(model.spec.geometry) == LLAVA_ONEVISION and not with_video_token(
            exported_tokenizer, model.language_model.get_input_embeddings().num_embeddings):
        log.warning("export: the tokenizer fills every embedding row, so it gets no <video> token: the export takes "
                    "images, not videos (docs/export.md)")
    config = llava_config(model, exported_tokenizer)
    template = source.template
    with atomic_folder(out) as tmp:
        weights = exported_parameters(model, DTYPES[dtype], replaced if adapter else None)
        shards = write_export(tmp, model, weights, config, tokenizer, exported_tokenizer, image_processing, template,
                              source, dtype, parse_size(max_shard_size))
        if adapter:
            write_stage_adapter(model, source, config, tmp / ADAPTER_FOLDER, DTYPES[dtype])
    log.info("export: wrote %s (%d weight shard(s), %s)%s", out, shards, config.torch_dtype,
             f", the adapters in {out / ADAPTER_FOLDER}" if adapter else "")
    return ExportResult(out, source, model, tokenizer, image_processing, template,
                        out / ADAPTER_FOLDER if adapter else None, dtype)


def write_stage_adapter(model: VdepLlava, source: ModelSource, config, folder: Path, dtype: torch.dtype) -> None:
    """The PEFT adapter folder, and a section of the model card that says how to load it."""
    name = source.stage
    stage = source.config.stages[name]
    saved = saved_modules(model, stage.lora, "projector" in stage.trainable, f"stages.{name}.lora")
    write_adapter(model, stage.lora, config, saved, folder, dtype)
    card = folder.parent / "README.md"
    card.write_text(card.read_text() + "\n" + adapter_card(name, stage.lora))


def write_export(tmp: Path, model: VdepLlava, weights: Iterable[tuple[str, torch.Tensor]], config, tokenizer,
                 exported_tokenizer, image_processing: ImageProcessing, template: str, source: ModelSource, dtype: str,
                 max_shard_bytes: int) -> int:
    """Every file of the export into `tmp` (`exported_tokenizer`: the training `tokenizer`'s copy that the folder
    holds); returns the number of weight shards."""
    shards = write_weights(weights, tmp, max_shard_bytes, config.tie_word_embeddings)
    config.torch_dtype = dtype_name = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
    config.save_pretrained(tmp)
    training_template = make_template(template, tokenizer)
    stops = list(training_template.stop_token_ids)  # EOS and the chat format's end of turn
    chat_template = export_chat_template(training_template)
    exported_tokenizer.chat_template = chat_template
    processor = export_processor(model, image_processing, exported_tokenizer, chat_template)
    processor.save_pretrained(tmp)
    processor.image_processor.save_pretrained(tmp)  # preprocessor_config.json, for readers older than transformers 5
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=stops[0] if len(stops) == 1 else stops,
        pad_token_id=tokenizer.pad_token_id,
    ).save_pretrained(tmp)
    (tmp / "README.md").write_text(model_card(source, template, dtype_name, export_class(model.spec.geometry)))
    return shards
