"""AnyRes, OneVision multi-image and video: views and token counts against transformers' own processors and models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

from vdep.data.anyres import SINGLE, TILED, ImageGeometry, MediaProcessor, Video
from vdep.data.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageProcessing, normalise_pixels

PINS = [[64, 64], [64, 128], [128, 64], [128, 128]]  # /work/shared/ANYRES.md's tiny setting
CLIP = ImageProcessing(64, None, (64, 64), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, pad_to_square=False)
SIGLIP = ImageProcessing(None, (64, 64), None, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), pad_to_square=False)
SIZES = [(256, 256), (100, 230), (230, 100), (64, 64), (37, 300), (129, 65)]  # (height, width)


def geometry(aspect: str = "anyres", merge: str = "spatial_unpad") -> ImageGeometry:
    return ImageGeometry(aspect, 64, 8, 64, tuple(tuple(p) for p in PINS), merge)


def picture(height: int, width: int, seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype(np.uint8))


def hf_settings(processing: ImageProcessing) -> dict:
    if processing.shortest_edge is not None:
        return {"size": {"shortest_edge": 64}, "crop_size": {"height": 64, "width": 64}, "do_center_crop": True}
    return {"size": {"height": 64, "width": 64}, "do_center_crop": False, "crop_size": {"height": 64, "width": 64}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}


@pytest.mark.parametrize("processing", [CLIP, SIGLIP], ids=["clip", "siglip"])
@pytest.mark.parametrize("aspect", ["anyres", "anyres_max_1"])
def test_tiles_equal_the_hf_processors_pixels_bit_for_bit(processing, aspect):
    hf_class = LlavaOnevisionImageProcessorPil if aspect.startswith("anyres_max") else LlavaNextImageProcessorPil
    hf = hf_class(image_grid_pinpoints=PINS, **hf_settings(processing))
    ours = MediaProcessor(geometry(aspect), processing)
    table = processing.normalisation_table()
    for height, width in SIZES:
        image = picture(height, width)
        theirs = hf(images=image, return_tensors="pt")["pixel_values"][0]
        views = ours([image])
        assert views.pixels.dtype == torch.uint8 and views.images[0].kind == TILED
        assert torch.equal(normalise_pixels(views.pixels, table), theirs), (height, width)


def test_a_multi_image_sample_under_onevision_is_one_padded_view_per_image_as_hf_has_it():
    hf = LlavaOnevisionImageProcessorPil(image_grid_pinpoints=PINS, **hf_settings(CLIP))
    images = [picture(100, 230, 1), picture(230, 100, 2), picture(50, 50, 3)]
    theirs = hf(images=[images], return_tensors="pt")["pixel_values"]  # one sample of three images: (3, 1, 3, H, W)
    views = MediaProcessor(geometry("anyres_max_9"), CLIP)(images)
    assert torch.equal(normalise_pixels(views.pixels, CLIP.normalisation_table()), theirs[:, 0])
    assert [(i.kind, i.views, i.tokens) for i in views.images] == [(SINGLE, 1, 65)] * 3  # 64 + its newline
    # LLaVA-NeXT tiles every image of a sample.
    assert [i.kind for i in MediaProcessor(geometry("anyres"), CLIP)(images).images] == [TILED] * 3


def test_token_counts_are_the_hf_processors_and_a_256px_image_is_336_tokens(tokenizer):
    from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

    assert geometry().tiled(256, 256).tokens == 336  # ../shared/ANYRES.md: 64 base + 4×64 tiles + 16 newlines
    processor = LlavaNextProcessor(LlavaNextImageProcessorPil(image_grid_pinpoints=PINS, **hf_settings(CLIP)), tokenizer,
                                   patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    counts = processor._get_num_multimodal_tokens(image_sizes=SIZES)["num_image_tokens"]
    assert [geometry().tiled(h, w).tokens for h, w in SIZES] == counts


def test_the_hf_model_packs_exactly_the_tokens_counted_with_a_newline_where_the_mask_says():
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=64, patch_size=8)
    text = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, vocab_size=500)
    model = LlavaNextForConditionalGeneration(LlavaNextConfig(
        vision_config=vision, text_config=text, image_grid_pinpoints=PINS, vision_feature_select_strategy="default",
        vision_feature_layer=-2)).eval()
    hf = LlavaNextImageProcessorPil(image_grid_pinpoints=PINS, **hf_settings(CLIP))
    newline = model.model.image_newline
    for height, width in SIZES:
        inputs = hf(images=picture(height, width), return_tensors="pt")
        with torch.no_grad():
            (features,) = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                                         vision_feature_layer=-2,
                                                         vision_feature_select_strategy="default").pooler_output
        layout = geometry().tiled(height, width)
        assert features.shape[0] == layout.tokens
        is_newline = (features == newline).all(dim=-1)
        assert torch.equal(is_newline, layout.newline_mask()), (height, width)


def test_a_video_is_its_frames_pooled_with_one_newline():
    frames = Video(tuple(picture(90, 120, seed) for seed in range(3)))
    views = MediaProcessor(geometry("anyres_max_9"), CLIP)([frames])
    assert views.pixels.shape == (3, 3, 64, 64)
    (layout,) = views.images
    assert (layout.tokens, int(layout.newline_mask().sum()), bool(layout.newline_mask()[-1])) == (3 * 16 + 1, 1, True)
    flat = MediaProcessor(geometry("anyres", "flat"), CLIP)([frames]).images[0]
    assert (flat.tokens, int(flat.newline_mask().sum())) == (3 * 16, 0)
