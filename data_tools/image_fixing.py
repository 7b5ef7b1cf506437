"""Check an input image and, only where needed, re-encode it for the shards.

Original bytes are kept whenever the training loader can read them as they are. An image is
re-encoded when its mode is one the loader would misread (CMYK, palette, 16-bit and other high-bit
modes, alpha) or when `--max-side` asks for a smaller one. JPEG sources stay JPEG (quality 95), others
become PNG. Everything else is the loader's `decode_image`: a truncated file, non-image bytes and a
decompression bomb (pixel limit) are rejected here, at build time, rather than during training.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from vdep.data.images import decode_image

# Modes the loader converts to RGB without losing meaning.
READY_MODES = ("RGB", "L")
JPEG_QUALITY = 95


@dataclass
class FixedImage:
    data: bytes
    extension: str
    converted_from: str | None = None  # original mode when the mode was converted
    resized_from: tuple[int, int] | None = None  # original (width, height) when --max-side shrank it


def to_eight_bit_rgb(image: Image.Image) -> Image.Image:
    """An image in any mode as 8-bit RGB (or L), with high-bit data scaled rather than clipped."""
    if image.mode in READY_MODES:
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
        return Image.fromarray(np.clip(pixels * (255.0 / top) + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        scale = 255.0 if pixels.max() <= 1.0 else 1.0
        return Image.fromarray(np.clip(pixels * scale + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite on white, as a viewer would show it; plain convert("RGB") would expose whatever
        # colour the transparent pixels happen to store.
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")  # CMYK, YCbCr, P, 1, ...


def fix_image(data: bytes, extension: str, max_side: int | None, name: str | None = None) -> FixedImage:
    """Validate image bytes; return them unchanged, or re-encoded when the mode or size asks for it.
    `name` (the image's path or tar member) starts the message of a rejection."""
    image = decode_image(data, name)  # SampleError("bad_image", ...) for anything the loader could not read
    converted_from = image.mode if image.mode not in READY_MODES else None
    resized_from = None
    if max_side is not None and max(image.size) > max_side:
        resized_from = image.size
    if converted_from is None and resized_from is None:
        return FixedImage(data, extension)
    fixed = to_eight_bit_rgb(image)
    if resized_from is not None:
        scale = max_side / max(fixed.size)
        target = (max(1, round(fixed.width * scale)), max(1, round(fixed.height * scale)))
        fixed = fixed.resize(target, resample=Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    if extension in ("jpg", "jpeg"):
        fixed.save(buffer, format="JPEG", quality=JPEG_QUALITY)
        out_extension = "jpg"
    else:
        fixed.save(buffer, format="PNG")
        out_extension = "png"
    return FixedImage(buffer.getvalue(), out_extension, converted_from, resized_from)
