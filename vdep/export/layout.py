"""vdep's parameter names, the on-disk layout of published llava-hf checkpoints, and which class an export is.

vdep's names are transformers' in-memory Llava names without the `model.` level. On disk, published
llava-hf checkpoints (and transformers 5.x's own `save_pretrained`) use:

    vision_tower.vision_model.*    multi_modal_projector.*    language_model.model.*
    language_model.lm_head.weight  image_newline (LLaVA-NeXT and OneVision)

which transformers 4.x and 5.x both load, for `LlavaForConditionalGeneration`,
`LlavaNextForConditionalGeneration` and `LlavaOnevisionForConditionalGeneration` alike (transformers maps all
three the same way). The VDEP head is a training device and is never exported.

The class follows `model.image_aspect_ratio` (`export_class`): `pad`/`square` → Llava, `anyres` → LlavaNext,
`anyres_max_N` → LlavaOnevision (the class that does not tile a multi-image sample's images, as training does
under that mode).
"""

from __future__ import annotations

from transformers import LlavaConfig, LlavaNextConfig, LlavaOnevisionConfig, PretrainedConfig, PreTrainedTokenizerBase

from ..data.anyres import ImageGeometry
from ..errors import CheckpointError
from ..model.llava import OBJECTIVE_ONLY_PREFIXES, VdepLlava

LLAVA, LLAVA_NEXT, LLAVA_ONEVISION = (
    "LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration", "LlavaOnevisionForConditionalGeneration")
# The weight vdep and both AnyRes classes name alike, in memory and on disk (mm_patch_merge_type: spatial_unpad).
IMAGE_NEWLINE = "image_newline"


def to_hf_name(name: str) -> str | None:
    """The llava-hf on-disk name of a vdep parameter (None: not exported)."""
    if name.startswith(OBJECTIVE_ONLY_PREFIXES):
        return None
    if name == IMAGE_NEWLINE:
        return name
    if name.startswith("vision_tower."):
        rest = name[len("vision_tower."):]
        # transformers 4.x keeps a `vision_model.` level in memory, 5.x does not; on disk it is there.
        return "vision_tower.vision_model." + rest.removeprefix("vision_model.")
    if name.startswith("multi_modal_projector."):
        return name
    if name.startswith("language_model."):
        return "language_model.model." + name[len("language_model."):]
    if name.startswith("lm_head."):
        return "language_model." + name
    raise ValueError(f"no llava-hf name for parameter {name!r}")  # a new top-level module: update this table


def to_hf_module_name(name: str) -> str:
    """transformers' in-memory name (>= 4.52) of a vdep module: what peft's adapter folders refer to."""
    top = name.split(".", 1)[0]
    if top in ("vision_tower", "multi_modal_projector", "language_model"):
        return "model." + name
    if top == "lm_head":
        return name
    raise ValueError(f"no transformers module name for {name!r}")


def from_hf_name(name: str) -> str:
    """The vdep name of a parameter stored in either Llava layout (published on-disk, or in-memory 5.x)."""
    if name in (IMAGE_NEWLINE, "model." + IMAGE_NEWLINE):
        return IMAGE_NEWLINE
    for hf_prefix, ours in (
        ("vision_tower.vision_model.", "vision_tower."),
        ("model.vision_tower.vision_model.", "vision_tower."),
        ("model.vision_tower.", "vision_tower."),
        ("language_model.model.", "language_model."),
        ("model.language_model.", "language_model."),
        ("language_model.lm_head.", "lm_head."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("multi_modal_projector.", "multi_modal_projector."),
        ("lm_head.", "lm_head."),
    ):
        if name.startswith(hf_prefix):
            return ours + name[len(hf_prefix):]
    raise CheckpointError(f"weight {name!r} is not part of a Llava checkpoint")


def export_class(geometry: ImageGeometry) -> str:
    """The transformers class that computes what vdep computes for images laid out by `geometry`."""
    if not geometry.anyres:
        return LLAVA
    if not geometry.unpad:
        raise CheckpointError(
            f"model.image_aspect_ratio={geometry.aspect_ratio} with model.mm_patch_merge_type=flat: transformers' "
            "LlavaNext and LlavaOnevision always lay the tiles out as the image with a learned image_newline "
            "(spatial_unpad), so a flat model has no Hugging Face class; train with mm_patch_merge_type=spatial_unpad "
            "to export, or evaluate it with vdep eval"
        )
    return LLAVA_ONEVISION if geometry.onevision else LLAVA_NEXT


def llava_config(model: VdepLlava, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """The config (`LlavaConfig`, `LlavaNextConfig` or `LlavaOnevisionConfig`: `export_class`) that makes
    transformers build exactly this model."""
    spec = model.spec
    projector = model.multi_modal_projector
    if getattr(projector, "kind", "mlp2x_gelu") != "mlp2x_gelu":
        raise CheckpointError(
            "transformers' Llava has a Linear-GELU-Linear projector; a model trained with model.projector=linear "
            "cannot be exported to it"
        )
    text_config = model.language_model.config
    common = {
        "vision_config": portable(model.vision_tower.config.to_dict()),
        "text_config": portable(text_config.to_dict()),
        "image_token_index": spec.image_token_id,
        "vision_feature_layer": spec.feature_layer,
        "vision_feature_select_strategy": spec.feature_select,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "tie_word_embeddings": bool(getattr(text_config, "tie_word_embeddings", False)),
        "pad_token_id": tokenizer.pad_token_id,
    }
    kind = export_class(spec.geometry)
    if kind == LLAVA:
        return LlavaConfig(image_seq_length=spec.num_image_tokens, **common)
    pinpoints = spec.geometry.pinpoints
    if kind == LLAVA_NEXT:
        return LlavaNextConfig(image_grid_pinpoints=pinpoints, image_seq_length=spec.num_image_tokens, **common)
    # The export's tokenizer holds `<video>` (`with_video_token`); -1, which matches nothing, where it has none or
    # its id has no embedding row (a video could not be looked up).
    rows = model.language_model.get_input_embeddings().num_embeddings
    video = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN) if VIDEO_TOKEN in tokenizer.get_vocab() else -1
    video = video if video < rows else -1
    return LlavaOnevisionConfig(image_grid_pinpoints=pinpoints, vision_aspect_ratio=spec.geometry.aspect_ratio,
                                video_token_index=video, **common)


VIDEO_TOKEN = "<video>"


def with_video_token(tokenizer: PreTrainedTokenizerBase, embedding_rows: int) -> bool:
    """Add `<video>` to an export's tokenizer (OneVision's processor marks a video with it, where vdep's data marks
    it with `<image>`). Its id must be a row of the LLM's embedding (transformers looks every id up before it
    puts the video's features there): vdep pads the vocabulary to a multiple of 64 rows, so one is free unless
    the tokenizer fills them all. Returns whether the tokenizer has `<video>`; it is left unchanged when it could not."""
    if VIDEO_TOKEN in tokenizer.get_vocab():
        return tokenizer.convert_tokens_to_ids(VIDEO_TOKEN) < embedding_rows
    if len(tokenizer) >= embedding_rows:
        return False
    tokenizer.add_tokens([VIDEO_TOKEN], special_tokens=True)
    return True


def portable(sub_config: dict) -> dict:
    """A sub-config without the machine-local folder it was loaded from (the run's base/ copy), and without
    the 4-bit loading settings of a QLoRA stage's LLM: the export holds floating-point weights."""
    dropped = ("_name_or_path", "quantization_config", "_pre_quantization_dtype")
    return {key: value for key, value in sub_config.items() if key not in dropped}


def num_additional_image_tokens(family: str) -> int:
    """What LlavaProcessor adds to (image / patch)²: the CLS token of CLIP (which "default" then drops)."""
    return 1 if family == "clip" else 0
