"""Image preprocessing equals transformers' processors, pad-to-square follows LLaVA, bad bytes are refused."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from vdep.data.conversation import SampleError
from vdep.data.images import ImageProcessing, decode_image, expand_to_square, padded_resize, preprocess_image

# openai/clip-vit-large-patch14-336's preprocessor_config.json (LLaVA-1.5's tower)
CLIP_336 = {
    "crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 336,
}
SIGLIP_384 = {"do_resize": True, "size": {"height": 384, "width": 384}, "resample": 3, "do_rescale": True,
              "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}


def random_image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


@pytest.mark.parametrize("size", [(640, 480), (333, 500), (336, 336), (200, 120)])
def test_clip_preprocessing_equals_the_hf_processor(size):
    image = random_image(*size, seed=size[0])
    ours = preprocess_image(image, ImageProcessing.from_hf_dict(CLIP_336, pad_to_square=False))
    theirs = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})(
        images=image, return_tensors="pt"
    )["pixel_values"][0]
    assert ours.shape == theirs.shape == (3, 336, 336)
    assert torch.equal(ours, theirs)


def test_pad_mode_is_llava_expand2square_then_the_processor():
    image = random_image(500, 300, seed=1)
    processing = ImageProcessing.from_hf_dict(CLIP_336, pad_to_square=True)
    # LLaVA-1.5: background = tuple(int(x * 255) for x in image_mean), image pasted centred.
    background = tuple(int(x * 255) for x in CLIP_336["image_mean"])
    assert processing.pad_colour == background == (122, 116, 104)
    square = Image.new("RGB", (500, 500), background)
    square.paste(image, (0, (500 - 300) // 2))
    assert np.array_equal(np.asarray(expand_to_square(image, background)), np.asarray(square))
    theirs = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})(
        images=square, return_tensors="pt"
    )["pixel_values"][0]
    assert torch.equal(preprocess_image(image, processing), theirs)


@pytest.mark.parametrize("resample", [Image.Resampling.BICUBIC, Image.Resampling.BILINEAR, Image.Resampling.LANCZOS,
                                      Image.Resampling.NEAREST])
def test_padded_resize_equals_padding_then_resizing(resample):
    """The landscape shortcut (filter the image rows, then pad) gives the padded square's pixels exactly:
    down- and upscaling, odd and even padding, very wide images, non-square targets, and sizes where
    one pass is a no-op."""
    rng = np.random.default_rng(int(resample))
    sizes = [(640, 480), (500, 375), (337, 336), (336, 200), (1000, 90), (1800, 1200), (120, 80), (601, 402),
             (480, 640), (336, 336), (400, 400)]
    sizes += [tuple(int(v) for v in rng.integers(40, 900, 2)) for _ in range(16)]
    colour = (122, 116, 104)
    for index, size in enumerate(sizes):
        image = random_image(*size, seed=index)
        side = max(size)
        for target in ((336, 336), (384, 384), (224, 300), (size[0], 336), (side, side)):
            expected = expand_to_square(image, colour).resize(target, resample=resample)
            got = padded_resize(image, colour, target, int(resample))
            assert got.size == target and got.mode == "RGB"
            assert np.array_equal(np.asarray(got), np.asarray(expected)), (size, target)


def test_siglip_preprocessing_equals_the_hf_processor():
    image = random_image(300, 420, seed=2)
    ours = preprocess_image(image, ImageProcessing.from_hf_dict(SIGLIP_384, pad_to_square=False))
    theirs = SiglipImageProcessorPil(size={"height": 384, "width": 384})(images=image, return_tensors="pt")["pixel_values"][0]
    assert torch.equal(ours, theirs)


def test_grayscale_and_rgba_images_become_rgb():
    processing = ImageProcessing.from_hf_dict(CLIP_336, pad_to_square=True)
    for mode in ("L", "RGBA", "P", "CMYK"):
        image = random_image(64, 48, seed=3).convert(mode)
        assert preprocess_image(image, processing).shape == (3, 336, 336)


def test_truncated_and_non_image_bytes_are_refused():
    buffer = io.BytesIO()
    random_image(64, 64, seed=4).save(buffer, format="JPEG")
    for data in (buffer.getvalue()[:200], b"not an image at all"):
        with pytest.raises(SampleError, match="cannot decode") as error:
            decode_image(data)
        assert error.value.reason == "bad_image"
    assert decode_image(buffer.getvalue()).size == (64, 64)


def test_decompression_bombs_are_refused(monkeypatch):
    from vdep.data import images

    buffer = io.BytesIO()
    random_image(100, 100, seed=5).save(buffer, format="PNG")
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 5_000)  # a 100x100 image now counts as a bomb
    with pytest.raises(SampleError, match="exceeds the pixel limit"):
        decode_image(buffer.getvalue())
