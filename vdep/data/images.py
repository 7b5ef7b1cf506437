"""Image preprocessing that reproduces the vision tower's Hugging Face image processor.

The settings come from the tower's `preprocessor_config.json` (CLIP: resize the shortest edge, centre
crop; SigLIP: resize to a fixed size), and the arithmetic follows transformers' PIL backend step by
step (PIL bicubic resize, crop offsets `(h - crop) // 2`, rescale in float64 then float32, normalise in
float32), so the pixels equal what `CLIPImageProcessor` / `SiglipImageProcessor` produce; a test pins
that. LLaVA-1.5's `pad` mode first pads the image to a square filled with the mean colour.
"""

from __future__ import annotations

import functools
import io
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .conversation import SampleError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Refuse images whose decoded size would exceed this many pixels (decompression bombs).
MAX_IMAGE_PIXELS = 89_478_485  # PIL's own default limit


@dataclass(frozen=True)
class ImageProcessing:
    """What the vision tower's processor does to an image, as plain numbers."""

    # Resize the shortest edge to `shortest_edge` keeping the aspect ratio, or resize to `size` exactly.
    shortest_edge: int | None
    size: tuple[int, int] | None  # (height, width)
    crop: tuple[int, int] | None  # (height, width) of the centre crop, if any
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale_factor: float = 1 / 255
    resample: int = int(Image.Resampling.BICUBIC)
    pad_to_square: bool = True

    @property
    def output_size(self) -> tuple[int, int]:
        if self.crop is not None:
            return self.crop
        if self.size is not None:
            return self.size
        return (self.shortest_edge, self.shortest_edge)  # type: ignore[return-value]

    def normalisation_table(self) -> torch.Tensor:
        """(3, 256) float32: transformers' rescale (float64, then float32) and normalise (float32) of each value."""
        return _normalisation_table(self.rescale_factor, self.mean, self.std)

    @property
    def pad_colour(self) -> tuple[int, int, int]:
        # LLaVA: tuple(int(x * 255) for x in image_processor.image_mean)
        return tuple(int(m * 255) for m in self.mean)  # type: ignore[return-value]

    @classmethod
    def from_hf_dict(cls, config: dict, pad_to_square: bool) -> ImageProcessing:
        size = config.get("size", {})
        if isinstance(size, int):
            size = {"shortest_edge": size}
        crop = config.get("crop_size") if config.get("do_center_crop", False) else None
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        return cls(
            shortest_edge=size.get("shortest_edge"),
            size=(size["height"], size["width"]) if "height" in size else None,
            crop=(crop["height"], crop["width"]) if crop else None,
            mean=tuple(config.get("image_mean", OPENAI_CLIP_MEAN)),  # type: ignore[arg-type]
            std=tuple(config.get("image_std", OPENAI_CLIP_STD)),  # type: ignore[arg-type]
            rescale_factor=float(config.get("rescale_factor", 1 / 255)),
            resample=int(config.get("resample", int(Image.Resampling.BICUBIC))),
            pad_to_square=pad_to_square,
        )

    @classmethod
    def from_folder(cls, folder: str | Path, pad_to_square: bool) -> ImageProcessing:
        path = Path(folder) / "preprocessor_config.json"
        if not path.is_file():
            raise FileNotFoundError(path)
        return cls.from_hf_dict(json.loads(path.read_text()), pad_to_square)

    @classmethod
    def tiny(cls, family: str, image_size: int) -> ImageProcessing:
        """The processing of a tiny random-init tower: the family's usual settings at `image_size`."""
        if family == "siglip":
            return cls(None, (image_size, image_size), None, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        return cls(image_size, None, (image_size, image_size), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

    def to_hf_dict(self, family: str) -> dict:
        """The `preprocessor_config.json` content that reproduces this processing (without padding) for a
        tower of `family` ("clip" or "siglip")."""
        config: dict = {
            "image_processor_type": "SiglipImageProcessor" if family == "siglip" else "CLIPImageProcessor",
            "do_resize": True,
            "resample": self.resample,
            "do_rescale": True,
            "rescale_factor": self.rescale_factor,
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "do_convert_rgb": True,
            "do_center_crop": self.crop is not None,
        }
        if self.shortest_edge is not None:
            config["size"] = {"shortest_edge": self.shortest_edge}
        else:
            config["size"] = {"height": self.size[0], "width": self.size[1]}  # type: ignore[index]
        if self.crop is not None:
            config["crop_size"] = {"height": self.crop[0], "width": self.crop[1]}
        return config


def expand_to_square(image: Image.Image, colour: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5's pad mode: centre the image on a square canvas of the mean colour."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), colour)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


# Pillow resizes these filters as two separable passes, horizontal first (ImagingResample); NEAREST
# takes another path, so `padded_resize` leaves it to the plain pad-then-resize.
_SEPARABLE_FILTERS = frozenset(int(f) for f in (Image.Resampling.BOX, Image.Resampling.BILINEAR, Image.Resampling.HAMMING,
                                                Image.Resampling.BICUBIC, Image.Resampling.LANCZOS))


def padded_resize(image: Image.Image, colour: tuple[int, int, int], target: tuple[int, int], resample: int) -> Image.Image:
    """`expand_to_square(image, colour).resize(target, resample)`, pixel for pixel, with less work for
    landscape images.

    A landscape image is padded with rows of `colour` above and below. Pillow's horizontal pass maps
    each row on its own, and a row of one colour stays that colour exactly (the fixed-point filter
    weights sum to 2^22 within a few units, far below the half unit that rounding would need). So
    the horizontal pass runs on the image rows alone, the padding is added to that narrower result,
    and the vertical pass runs as before: the padded square is never built nor filtered. 640x480
    photos: about a fifth of the pad+resize time (docs/benchmarks.md). A portrait image's padding
    is columns, which the horizontal pass mixes into image pixels, so it takes the plain path.
    `tests/test_images.py` compares both paths on many sizes.
    """
    width, height = image.size
    if width <= height or resample not in _SEPARABLE_FILTERS:
        square = expand_to_square(image, colour)
        return square.resize(target, resample=resample) if square.size != target else square
    target_width, target_height = target
    rows = image.resize((target_width, height), resample=resample) if target_width != width else image
    canvas = Image.new(image.mode, (target_width, width), colour)
    canvas.paste(rows, (0, (width - height) // 2))
    return canvas.resize(target, resample=resample) if target_height != width else canvas


def _resize_target(processing: ImageProcessing, width: int, height: int) -> tuple[int, int]:
    """(width, height) after resizing, with transformers' rounding."""
    if processing.size is not None:
        return processing.size[1], processing.size[0]
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = processing.shortest_edge, int(processing.shortest_edge * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def preprocess_image(image: Image.Image, processing: ImageProcessing) -> torch.Tensor:
    """A decoded image → the (3, H, W) float32 tensor the vision tower reads."""
    return normalise_pixels(image_pixels(image, processing), processing.normalisation_table())


def image_pixels(image: Image.Image, processing: ImageProcessing) -> torch.Tensor:
    """A decoded image → (3, H, W) uint8: every step of the processor before rescale and normalise.

    The training loader ships these (a quarter of the bytes of float32) and the model normalises
    them on the device through `normalisation_table` (bit-identical to `preprocess_image`).
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    if processing.pad_to_square:
        side = max(image.size)
        image = padded_resize(image, processing.pad_colour, _resize_target(processing, side, side), processing.resample)
    else:
        target = _resize_target(processing, *image.size)
        if image.size != target:
            image = image.resize(target, resample=processing.resample)
    pixels = np.asarray(image)  # (H, W, 3) uint8
    if processing.crop is not None:
        crop_h, crop_w = processing.crop
        height, width = pixels.shape[:2]
        if crop_h > height or crop_w > width:
            raise SampleError("bad_image", f"image of {width}x{height} is smaller than the crop {crop_w}x{crop_h}")
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        pixels = pixels[top : top + crop_h, left : left + crop_w]
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def normalise_pixels(pixels: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (..., 3, H, W) → normalised values in the table's dtype and device, by lookup.

    The table (3, 256) holds, for each channel and value, exactly what transformers' rescale and
    normalise give, so the result equals `preprocess_image`'s bit for bit.
    """
    channels = torch.arange(3, device=pixels.device).view(3, 1, 1)
    return table.to(pixels.device)[channels, pixels.long()]


@functools.lru_cache(maxsize=8)
def _normalisation_table(rescale_factor: float, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    values = (np.arange(256, dtype=np.float64) * rescale_factor).astype(np.float32)[None, :]
    table = (values - np.asarray(mean, dtype=np.float32)[:, None]) / np.asarray(std, dtype=np.float32)[:, None]
    return torch.from_numpy(table)


def decode_image(data: bytes, name: str | None = None) -> Image.Image:
    """Decode image bytes fully, refusing truncated files and decompression bombs.

    A refusal is a `SampleError("bad_image")` whose message says why in words, after `name` (the image's
    file or tar member) when the caller gives one.
    """
    prefix = f"{name}: " if name else ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise SampleError("bad_image", f"{prefix}image of {image.width}x{image.height} exceeds the pixel limit")
            image.load()
    except SampleError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise SampleError("bad_image", f"{prefix}cannot decode the image: {why_undecodable(exc, data)}") from None
    return image


def why_undecodable(exc: Exception, data: bytes) -> str:
    """Pillow's reason for refusing `data`, in words; Pillow's own messages name the in-memory file
    (`<_io.BytesIO object at 0x...>`), which says nothing about the image."""
    if isinstance(exc, Image.UnidentifiedImageError):
        if not data:
            return "the file is empty"
        return (f"its bytes (starting {data[:16]!r}) are in no image format Pillow reads: not an image, "
                "or its header is damaged")
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"it is too large to decode safely ({exc})"
    text = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "the image data", str(exc))
    if "truncated" in text.lower():
        return f"the file is cut short ({len(data)} bytes): {text}"
    return f"the image data is damaged ({text})"
