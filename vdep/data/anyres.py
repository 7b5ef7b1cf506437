"""How a sample's images and videos become the vision tower's views and the LLM's image tokens.

One rule per `model.image_aspect_ratio` (docs/data.md, "Images, tiles and videos"):
- `pad` / `square` (LLaVA-1.5): an image is one view; its tokens are the view's features (`images.py`);
- `anyres` (LLaVA-NeXT, `LlavaNext*` in transformers): an image is a base view plus the tiles of the grid
  resolution `select_best_resolution` picks among the pinpoints, every image of a sample alike;
- `anyres_max_N` (OneVision, `LlavaOnevision*`): a sample's only image is tiled as above, its tiles'
  features pooled when they exceed N tiles' worth; each image of a multi-image sample is one padded view;
- a video (any mode): its frames are views, each the tower's own processing, their features pooled 2×2
  (OneVision's rule).
With `mm_patch_merge_type: spatial_unpad` the tiles are laid out as the image, the padding removed, and a
learned `image_newline` ends each row; a single view of a multi-image sample and a video get one at the
end (as transformers' OneVision does). With `flat`, an image's tokens are its views' features in order.

Nothing here is written again that transformers has: the views are `LlavaNextImageProcessorPil` /
`LlavaOnevisionImageProcessorPil` run without rescale and normalise (uint8, normalised on the device by
`images.normalise_pixels`, bit-equal to the processors' own output: tested); the token counts are the
processors' own `_get_number_of_features` / `_get_unpadded_features` (a token counter inherits them, see
`_NextCounter`), and the number of views is `image_size_to_num_patches`. The model packs the features
with the modelling classes' `pack_image_features` and `apply_pooling` (model/image_tokens.py), so the data
path's counts and the model's features agree by construction; a test holds them to each other.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import torch
from PIL import Image
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

from .conversation import SampleError
from .images import ImageProcessing, image_pixels

# ImageTokens.kind
SINGLE, TILED, VIDEO = 0, 1, 2
# Columns of a batch's layout tensor (`ImageTokens.as_row`) that code outside this module reads.
KIND_COLUMN, VIEWS_COLUMN, NEWLINE_COLUMN = 0, 1, 7


@dataclass(frozen=True)
class ImageTokens:
    """How one image's (or video's) views become its tokens in the LLM: `base` tokens, then `rows` rows of
    `cols` tokens, each row followed by one `image_newline` when `newline` (a view or a video that ends with
    one newline is rows=1, cols=0). A batch carries these as rows of an int64 tensor (`as_row`)."""

    kind: int
    views: int
    height: int  # the image's original size (a tiled image's unpadding needs it)
    width: int
    base: int
    rows: int = 0
    cols: int = 0
    newline: bool = False

    FIELDS = 8

    @property
    def tokens(self) -> int:
        return self.base + self.rows * (self.cols + int(self.newline))

    def newline_mask(self) -> torch.Tensor:
        """(tokens,) bool: which of the image's tokens are `image_newline`s (they have no VDEP target)."""
        mask = torch.zeros(self.tokens, dtype=torch.bool)
        if self.newline:
            mask[self.base + self.cols :: self.cols + 1] = True
        return mask

    def as_row(self) -> list[int]:
        return [self.kind, self.views, self.height, self.width, self.base, self.rows, self.cols, int(self.newline)]

    @classmethod
    def from_row(cls, row: list[int]) -> ImageTokens:
        kind, views, height, width, base, rows, cols, newline = row
        return cls(kind, views, height, width, base, rows, cols, bool(newline))


def layout_tensor(images: list[ImageTokens]) -> torch.Tensor:
    """(n, FIELDS) int64: the batch's form of a list of `ImageTokens`."""
    return torch.tensor([i.as_row() for i in images], dtype=torch.long).view(-1, ImageTokens.FIELDS)


@dataclass(frozen=True)
class ImageGeometry:
    """The settings that decide views and tokens (from the model spec): what the data path and the model share."""

    aspect_ratio: str  # pad, square, anyres, anyres_max_N
    tile_size: int  # the tower's image size: every view is tile_size × tile_size
    patch_grid: int  # patches per side of a view (image_size // patch_size)
    tokens_per_view: int  # the tower's features per view (pad/square may keep CLIP's CLS; AnyRes never does)
    grid_pinpoints: tuple[tuple[int, int], ...] = ()  # [height, width] in pixels (AnyRes)
    merge: str = "flat"  # mm_patch_merge_type

    @property
    def anyres(self) -> bool:
        return self.aspect_ratio.startswith("anyres")

    @property
    def onevision(self) -> bool:
        return self.aspect_ratio.startswith("anyres_max_")

    @property
    def unpad(self) -> bool:
        return self.merge == "spatial_unpad"

    @property
    def pinpoints(self) -> list[list[int]]:
        return [list(p) for p in self.grid_pinpoints]

    @property
    def pooled_tokens_per_frame(self) -> int:
        side = math.ceil(self.patch_grid / 2)  # OneVision's apply_pooling: bilinear to ceil(side / 2)
        return side * side

    def single(self, height: int, width: int, newline: bool = False) -> ImageTokens:
        """One view (pad/square; an image of a multi-image sample under anyres_max_N)."""
        return ImageTokens(SINGLE, 1, height, width, self.tokens_per_view, *((1, 0, True) if newline else (0, 0, False)))

    def tiled(self, height: int, width: int) -> ImageTokens:
        """A base view and the tiles of the best grid resolution, counted by transformers' processor rule."""
        views = image_size_to_num_patches((height, width), self.pinpoints, self.tile_size)
        if not self.unpad:  # LLaVA-NeXT's flat: every view's features, no unpadding, no newline
            return ImageTokens(TILED, views, height, width, views * self.tokens_per_view)
        counter = _token_counter(self)
        best_height, best_width = select_best_resolution([height, width], self.pinpoints)
        unpadded, rows = counter._get_unpadded_features(height, width, self.patch_grid, self.patch_grid,
                                                        best_height // self.tile_size, best_width // self.tile_size)
        tokens = ImageTokens(TILED, views, height, width, self.tokens_per_view, rows, unpadded // rows, True)
        expected = counter._get_number_of_features(height, width, self.tile_size, self.tile_size)
        assert tokens.tokens == expected, (tokens, expected)  # the processor's own count; a mismatch is a vdep bug
        return tokens

    def check_video(self) -> None:
        """A video's frames are pooled on their patch grid: refused (`unsupported_video`) for a tower whose features
        keep a CLS token."""
        if self.tokens_per_view != self.patch_grid ** 2:
            raise SampleError("unsupported_video", "a video's frames are pooled on their patch grid, but this "
                              "tower's features keep a CLS token (feature_select=full): use default or auto")

    def video(self, frames: int) -> ImageTokens:
        newline = (1, 0, True) if self.unpad else (0, 0, False)
        return ImageTokens(VIDEO, frames, 0, 0, frames * self.pooled_tokens_per_frame, *newline)


class _NextCounter(LlavaNextProcessor):
    """transformers' LLaVA-NeXT processor for its token counting alone (`_get_number_of_features`,
    `_get_unpadded_features`, inherited unchanged); the constructor skips the tokenizer those never read."""

    def __init__(self, image_processor: LlavaNextImageProcessorPil, patch_size: int):
        self.image_processor = image_processor
        self.patch_size = patch_size
        self.num_additional_image_tokens = 0  # AnyRes features never hold a CLS token (model_spec refuses it)


class _OnevisionCounter(LlavaOnevisionProcessor):
    """transformers' OneVision processor for its token counting alone (with the anyres_max_N pooling rule)."""

    def __init__(self, image_processor: LlavaOnevisionImageProcessorPil, num_image_tokens: int, aspect_ratio: str):
        self.image_processor = image_processor
        self.num_image_tokens = num_image_tokens
        self.vision_aspect_ratio = aspect_ratio


@functools.lru_cache(maxsize=8)
def _token_counter(geometry: ImageGeometry) -> LlavaNextProcessor | LlavaOnevisionProcessor:
    if geometry.onevision:
        processor = LlavaOnevisionImageProcessorPil(image_grid_pinpoints=geometry.pinpoints)
        return _OnevisionCounter(processor, geometry.tokens_per_view, geometry.aspect_ratio)
    processor = LlavaNextImageProcessorPil(image_grid_pinpoints=geometry.pinpoints)
    return _NextCounter(processor, geometry.tile_size // geometry.patch_grid)


# ------------------------------------------------------------------------------------------------ views
@dataclass(frozen=True)
class Video:
    """A video's frames, decoded and sampled at build time (docs/data.md)."""

    frames: tuple[Image.Image, ...]


Media = Image.Image | Video


@dataclass
class SampleViews:
    """A sample's tower inputs: every view of its images in marker order, and how each image's views become tokens."""

    pixels: torch.Tensor  # (V, 3, tile, tile) uint8
    images: list[ImageTokens]


class MediaProcessor:
    """A sample's decoded images and videos → its views (uint8) and their `ImageTokens`, by the rules above."""

    def __init__(self, geometry: ImageGeometry, processing: ImageProcessing):
        self.geometry = geometry
        self.processing = processing  # with the aspect ratio's padding (pad: LLaVA-1.5's square)
        self.frame_processing = replace(processing, pad_to_square=False)
        self.padded = replace(processing, pad_to_square=True)
        self._hf = anyres_image_processor(geometry, self.frame_processing, normalise=False) if geometry.anyres else None

    def __call__(self, media: list[Media]) -> SampleViews:
        views: list[torch.Tensor] = []
        images: list[ImageTokens] = []
        still_images = sum(not isinstance(item, Video) for item in media)
        for item in media:
            if isinstance(item, Video):
                self.geometry.check_video()
                views += [image_pixels(frame, self.frame_processing) for frame in item.frames]
                images.append(self.geometry.video(len(item.frames)))
                continue
            width, height = item.size
            if not self.geometry.anyres:
                views.append(image_pixels(item, self.processing))
                images.append(self.geometry.single(height, width))
            elif self.geometry.onevision and still_images > 1:  # OneVision: a multi-image sample's images are not tiled
                views.append(image_pixels(item, self.padded))
                images.append(self.geometry.single(height, width, newline=self.geometry.unpad))
            else:
                tiles = self._hf(images=item.convert("RGB"), return_tensors="pt")["pixel_values"][0]
                layout = self.geometry.tiled(height, width)
                assert tiles.shape[0] == layout.views, (tiles.shape, layout)
                views += list(tiles)
                images.append(layout)
        return SampleViews(torch.stack(views) if views else torch.zeros((0, 3, 0, 0), dtype=torch.uint8), images)


def anyres_image_processor(geometry: ImageGeometry, processing: ImageProcessing, normalise: bool
                           ) -> LlavaNextImageProcessorPil | LlavaOnevisionImageProcessorPil:
    """transformers' AnyRes image processor with the tower's own settings (the OneVision one under anyres_max_N).

    Training runs it with `normalise=False`, stopping before rescale and normalise: its output is the uint8
    views (the loader ships uint8; the model normalises, bit-equal). An export carries it with `normalise=True`
    (export/hf.py): the processor a user of the export runs is the one training ran."""
    settings = {
        "image_grid_pinpoints": geometry.pinpoints,
        "resample": processing.resample,
        "image_mean": list(processing.mean),
        "image_std": list(processing.std),
        "rescale_factor": processing.rescale_factor,
        "do_rescale": normalise,
        "do_normalize": normalise,
        "do_convert_rgb": True,
        "do_center_crop": processing.crop is not None,
    }
    if processing.shortest_edge is not None:
        settings["size"] = {"shortest_edge": processing.shortest_edge}
    else:
        settings["size"] = {"height": processing.size[0], "width": processing.size[1]}  # type: ignore[index]
    # The crop size is also the tile size to transformers (`_preprocess`), cropping or not.
    settings["crop_size"] = {"height": geometry.tile_size, "width": geometry.tile_size}
    kind = LlavaOnevisionImageProcessorPil if geometry.onevision else LlavaNextImageProcessorPil
    return kind(**settings)
