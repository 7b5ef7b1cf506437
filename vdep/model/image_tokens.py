"""From the projector's outputs per view to each image's tokens, as the data path counted them.

An image's views arrive in order (data/anyres.py: `ImageTokens`). A single view's tokens are its features
(with one `image_newline` after them where the layout says so: an image of a multi-image sample under
OneVision); a tiled image's are packed by transformers' own `LlavaNextModel.pack_image_features` (LLaVA-NeXT:
base view, then the tiles laid out as the image, padding removed, a newline after each row) or
`LlavaOnevisionModel.pack_image_features` (the same, the grid pooled bilinearly beyond `anyres_max_N`'s N
tiles); a video's frames are pooled 2×2 by `LlavaOnevisionModel.apply_pooling` and followed by one newline.
Those methods read nothing of their model but `self.config`; they are called with `_ConfigHolder`, which
holds a `LlavaNextConfig` / `LlavaOnevisionConfig` built from the spec: the code that packs is transformers'
(which is also what an export to those classes runs), not a copy of it.
"""

from __future__ import annotations

import functools

import torch
from transformers import LlavaNextConfig, LlavaOnevisionConfig, PretrainedConfig
from transformers.models.llava_next.modeling_llava_next import LlavaNextModel
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

from ..data.anyres import SINGLE, TILED, VIDEO, ImageGeometry, ImageTokens


class _ConfigHolder:
    """What `pack_image_features` and `apply_pooling` read of their model: its config."""

    def __init__(self, config: PretrainedConfig):
        self.config = config


@functools.lru_cache(maxsize=8)
def _holder(geometry: ImageGeometry) -> _ConfigHolder:
    vision = {"model_type": "clip_vision_model", "image_size": geometry.tile_size,
              "patch_size": geometry.tile_size // geometry.patch_grid}
    kind = LlavaOnevisionConfig if geometry.onevision else LlavaNextConfig
    settings = {"vision_aspect_ratio": geometry.aspect_ratio} if geometry.onevision else {}
    return _ConfigHolder(kind(vision_config=vision, image_grid_pinpoints=geometry.pinpoints, **settings))


def pack_image_tokens(view_embeds: torch.Tensor, layout: torch.Tensor, geometry: ImageGeometry,
                      image_newline: torch.Tensor | None) -> torch.Tensor:
    """(views, N, D) projector outputs → (total tokens, D): every image's tokens, in order."""
    rows = [ImageTokens.from_row(row) for row in layout.tolist()]
    holder = _holder(geometry) if geometry.anyres or any(r.kind == VIDEO for r in rows) else None
    # Zero rows of the projector's output first: a batch without images still connects the projector (ZeRO-3).
    packed, start = [view_embeds[:0].flatten(0, 1)], 0
    for image in rows:
        views = view_embeds[start : start + image.views]
        start += image.views
        if image.kind == SINGLE:
            tokens = views[0]
        elif image.kind == TILED and not geometry.unpad:  # LLaVA-NeXT's flat: every view's features
            tokens = views.flatten(0, 1)
        elif image.kind == TILED:
            pack = LlavaOnevisionModel.pack_image_features if geometry.onevision else LlavaNextModel.pack_image_features
            sizes = torch.tensor([[image.height, image.width]])
            if geometry.onevision:
                (tokens,), _ = pack(holder, [views], sizes, image_newline=image_newline,
                                    vision_aspect_ratio=geometry.aspect_ratio)
            else:
                (tokens,), _ = pack(holder, [views], sizes, "full", image_newline=image_newline)
        else:  # VIDEO
            tokens = LlavaOnevisionModel.apply_pooling(holder, views).flatten(0, 1)
        if image.kind != TILED and image.newline:
            tokens = torch.cat([tokens, image_newline[None].to(tokens.dtype)])
        if tokens.shape[0] != image.tokens:  # the data path counted by the same rules: a mismatch is a vdep bug
            raise RuntimeError(f"an image packed into {tokens.shape[0]} tokens, {image.tokens} were counted: {image}")
        packed.append(tokens)
    if image_newline is not None:  # on every rank, every step, whatever the images: ZeRO-3 (see VdepLlava.embed)
        packed.append(image_newline[None][:0].to(view_embeds.dtype))
    return torch.cat(packed)
