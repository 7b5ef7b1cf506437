"""`vdep attention-map`: where the instruction looks in the image, layer by layer (VDEP paper, Fig. 1 and 4).

For each model (a run directory, a stage folder or an exported Hugging Face folder) the prompt "<image> +
question" in the model's own chat format is run once through the LLM with eager attention, which returns
each layer's attention weights softmax(QKᵀ/√d) (B, heads, T, T). A cell of the figure is one layer's
attention from the query tokens to the image tokens:
- query tokens (`--from`): `question`: the prompt's tokens after the image (the question and the
  template's turn end, the instruction the paper means); `answer`: the tokens of the model's greedy
  answer, appended to the prompt; `both`: either;
- the weights are reduced over heads (`--heads mean|max`), then averaged over the query tokens, and laid
  out on the vision tower's patch grid (raster order) over the image as the tower saw it (padded to a
  square and resized). A tiled image (AnyRes) is laid out whole (`image_grid`): with `spatial_unpad` its
  tiles' tokens form one grid over the image itself (the padding was removed, the newlines are left out);
  with `flat`, the tiles' grids are put side by side over the padded canvas the tiles were cut from. The
  base view's tokens count in the image's share, not in the map.
The figure has one row per model and one column per layer, each cell's colours spread from its own
minimum (blue) to its own maximum (red): the colour shows where, not how much (the title of a cell gives
the share of the attention that lands on the image). `FIG.npz` beside it holds the unscaled values,
`maps[model, layer, y, x]`, with `layers`, `models`, `answers` and `image_share[model, layer]`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .conventions import IMAGE_MARKER
from .data.anyres import TILED, ImageGeometry, ImageTokens, MediaProcessor, layout_tensor
from .data.conversation import Turn
from .data.images import decode_image, normalise_pixels
from .data.templates import ConversationTemplate, TemplateTokenizer, make_template
from .errors import VdepError
from .model.generate import greedy_generate

if TYPE_CHECKING:
    from .evaluate import TrainedModel


@dataclass(frozen=True)
class AttentionRequest:
    models: list[Path]
    image: Path
    question: str
    layers: list[int] | None = None  # None: every layer
    heads: str = "mean"  # or "max"
    source: str = "question"  # "answer", "both"
    max_new_tokens: int = 8


@dataclass(frozen=True)
class Forward:
    """One model's eager forward over prompt (+ answer): what the reduction needs."""

    attentions: tuple[torch.Tensor, ...]  # per layer (1, heads, T, T)
    image_positions: torch.Tensor  # (N,) sequence positions of the image tokens
    grid_positions: torch.Tensor  # the positions of the map's cells, in raster order over `picture`
    grid_shape: tuple[int, int]  # (rows, columns) of the map
    question_positions: torch.Tensor  # prompt positions after the last image token
    answer_positions: torch.Tensor  # positions of the appended answer tokens
    picture: np.ndarray  # (H, W, 3) uint8, the image as the vision tower saw it
    answer: str


@dataclass(frozen=True)
class ModelMaps:
    name: str
    maps: np.ndarray  # (layers, grid, grid)
    image_share: np.ndarray  # (layers,) attention mass on the image tokens, averaged over queries
    answer: str
    picture: np.ndarray


def query_positions(forward: Forward, source: str) -> torch.Tensor:
    chosen = {"question": [forward.question_positions], "answer": [forward.answer_positions],
              "both": [forward.question_positions, forward.answer_positions]}[source]
    positions = torch.cat(chosen)
    if positions.numel() == 0:
        raise VdepError(f"--from {source}: no such tokens (the answer was empty, or no text follows the image)")
    return positions


def reduce_attention(attention: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor, heads: str) -> torch.Tensor:
    """(1, H, T, T) weights → (len(keys),): reduced over heads, then averaged over the query rows."""
    rows = attention[0][:, queries][:, :, keys].float()  # (H, Q, K)
    per_query = rows.mean(dim=0) if heads == "mean" else rows.max(dim=0).values
    return per_query.mean(dim=0)


def to_grid(values: torch.Tensor) -> np.ndarray:
    side = math.isqrt(values.numel())
    if side * side != values.numel():
        raise VdepError(f"{values.numel()} image tokens do not make a square patch grid (feature_select=full?)")
    return values.reshape(side, side).numpy()


def image_grid(image: ImageTokens, geometry: ImageGeometry, views: torch.Tensor,
               original: np.ndarray) -> tuple[np.ndarray, tuple[int, int], np.ndarray]:
    """Where one image's tokens go on the map: (the offsets of the map's cells among the image's tokens, in raster
    order; the map's shape; the picture it lies over, (H, W, 3) uint8). `views`: the image's uint8 views."""
    side = geometry.patch_grid
    if image.kind != TILED:
        return np.arange(image.base), (side, side), views[0].permute(1, 2, 0).numpy()
    if image.newline:  # spatial_unpad: rows of `cols` tokens after the base view, each followed by its newline
        offsets = np.array([image.base + row * (image.cols + 1) + col for row in range(image.rows) for col in range(image.cols)])
        return offsets, (image.rows, image.cols), original
    # flat: each tile's grid in turn; the tiles lie on the best resolution's grid, raster order (divide_to_patches)
    tile_rows = image_best_rows(image, geometry)
    tile_cols = (image.views - 1) // tile_rows
    tiles = views[1:].reshape(tile_rows, tile_cols, 3, geometry.tile_size, geometry.tile_size)
    canvas = tiles.permute(0, 3, 1, 4, 2).reshape(tile_rows * geometry.tile_size, tile_cols * geometry.tile_size, 3)
    offsets = np.array([side * side * (1 + (r // side) * tile_cols + c // side) + (r % side) * side + c % side
                        for r in range(tile_rows * side) for c in range(tile_cols * side)])
    return offsets, (tile_rows * side, tile_cols * side), canvas.numpy()


def image_best_rows(image: ImageTokens, geometry: ImageGeometry) -> int:
    """Tile rows of the grid resolution transformers picks for the image."""
    from transformers.image_processing_utils import select_best_resolution

    height, _ = select_best_resolution([image.height, image.width], geometry.pinpoints)
    return height // geometry.tile_size


def patch_coverage(mask: np.ndarray, side: int) -> np.ndarray:
    """(H, W) bool pixels of a region → (side, side): the share of each patch's pixels inside it, on the
    tower's patch grid (raster order, as `to_grid`)."""
    height, width = mask.shape
    if height % side or width % side:
        raise VdepError(f"a {width}x{height} picture does not split into a {side}x{side} patch grid")
    return mask.reshape(side, height // side, side, width // side).mean(axis=(1, 3))


def model_maps(forward: Forward, name: str, layers: list[int], heads: str, source: str) -> ModelMaps:
    queries = query_positions(forward, source)
    maps, shares = [], []
    for layer in layers:
        values = reduce_attention(forward.attentions[layer], queries, forward.image_positions, heads)
        cells = reduce_attention(forward.attentions[layer], queries, forward.grid_positions, heads)
        maps.append(cells.reshape(forward.grid_shape).numpy())
        shares.append(float(values.sum()))
    return ModelMaps(name, np.stack(maps), np.array(shares), forward.answer, forward.picture)


@dataclass(frozen=True)
class VdepAttentionModel:
    """A model vdep trained, loaded once with eager attention, with the prompt encoder of its chat format."""

    trained: TrainedModel
    template: ConversationTemplate
    encoder: TemplateTokenizer


def load_vdep_attention_model(path: Path) -> VdepAttentionModel:
    from .evaluate import load_trained_model

    trained = load_trained_model(path, allow_base=True, attention="eager")
    encoder = TemplateTokenizer(trained.tokenizer, trained.spec.image_token_id, trained.spec.num_image_tokens)
    return VdepAttentionModel(trained, make_template(trained.template, trained.tokenizer), encoder)


def vdep_forward(path: Path, image, question: str, max_new_tokens: int, want_answer: bool) -> Forward:
    return loaded_vdep_forward(load_vdep_attention_model(path), image, question, max_new_tokens, want_answer)


def loaded_vdep_forward(loaded: VdepAttentionModel, image, question: str, max_new_tokens: int,
                        want_answer: bool) -> Forward:
    trained, template = loaded.trained, loaded.template
    tokenizer, spec = trained.tokenizer, trained.spec
    seen = MediaProcessor(spec.geometry, trained.image_processing)([image])  # the views and tokens training made
    (layout,) = seen.images
    prompt = loaded.encoder.encode(template.prompt_segments([Turn("user", f"{IMAGE_MARKER}\n{question}")], True),
                                   [layout.tokens]).input_ids
    pixel_values = normalise_pixels(seen.pixels, trained.image_processing.normalisation_table())
    image_layout = layout_tensor(seen.images)
    answer: list[int] = []
    if want_answer:
        answer = greedy_generate(trained.model, [prompt], pixel_values, 1, max_new_tokens, template.stop_token_ids,
                                 tokenizer.pad_token_id, image_layout=image_layout)[0]
    input_ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        embeds = trained.model.embed(input_ids, pixel_values, 1, image_layout=image_layout)
        outputs = trained.model.language_model(inputs_embeds=embeds, attention_mask=torch.ones_like(input_ids),
                                               output_attentions=True, use_cache=False)
    offsets, shape, picture = image_grid(layout, spec.geometry, seen.pixels, np.asarray(image.convert("RGB")))
    return _forward(outputs.attentions, input_ids[0], spec.image_token_id, len(prompt), picture,
                    tokenizer.decode(answer, skip_special_tokens=True), offsets, shape)


def hf_forward(folder: Path, image, question: str, max_new_tokens: int, want_answer: bool) -> Forward:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from .eval.answerers import chat_message
    from .eval.questions import Question

    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    if model_type != "llava":  # a LlavaNext/LlavaOnevision export: its tiles' positions are vdep's layout, not this one's
        raise VdepError(f"{folder} is a {model_type} export; attention-map draws an exported folder's attention for "
                        "Llava exports only: pass the run directory it was exported from, whose tiles it lays out "
                        "over the whole image")
    model = LlavaForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(str(folder))
    message = chat_message(Question("q", f"{IMAGE_MARKER}\n{question}", "", images=(b"image",)))
    inputs = processor(images=image, text=processor.apply_chat_template(message, add_generation_prompt=True),
                       return_tensors="pt")
    prompt_length = inputs["input_ids"].shape[1]
    input_ids = inputs["input_ids"]
    with torch.no_grad():
        if want_answer:
            input_ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        outputs = model(input_ids=input_ids, pixel_values=inputs["pixel_values"], output_attentions=True)
    processing = processor.image_processor
    mean, std = torch.tensor(processing.image_mean)[:, None, None], torch.tensor(processing.image_std)[:, None, None]
    picture = ((inputs["pixel_values"][0] * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    answer = processor.tokenizer.decode(input_ids[0, prompt_length:], skip_special_tokens=True)
    return _forward(outputs.attentions, input_ids[0], model.config.image_token_index, prompt_length, picture, answer)


def _forward(attentions, input_ids: torch.Tensor, image_token_id: int, prompt_length: int, picture: np.ndarray,
             answer: str, grid_offsets: np.ndarray | None = None, grid_shape: tuple[int, int] | None = None) -> Forward:
    """`grid_offsets`: which of the image's tokens make the map, in raster order (None: all, a square grid)."""
    image_positions = torch.nonzero(input_ids == image_token_id).flatten()
    after_image = int(image_positions.max()) + 1
    if grid_offsets is None:
        side = math.isqrt(image_positions.numel())
        if side * side != image_positions.numel():
            raise VdepError(f"{image_positions.numel()} image tokens do not make a square patch grid (feature_select=full?)")
        grid_positions, grid_shape = image_positions, (side, side)
    else:
        grid_positions = image_positions[torch.from_numpy(grid_offsets)]
    return Forward(tuple(attentions), image_positions, grid_positions, grid_shape,  # type: ignore[arg-type]
                   torch.arange(after_image, prompt_length), torch.arange(prompt_length, input_ids.numel()), picture,
                   answer.strip())


def compute_maps(request: AttentionRequest) -> tuple[list[ModelMaps], list[int]]:
    from .eval.answerers import is_hf_folder

    if request.heads not in ("mean", "max"):
        raise VdepError(f"--heads {request.heads}: use mean or max")
    if not request.image.is_file():
        raise VdepError(f"--image {request.image} does not exist")
    image = decode_image(request.image.read_bytes(), str(request.image)).convert("RGB")
    want_answer = request.source != "question"
    results, layers = [], request.layers
    for path in request.models:
        if not path.exists():
            raise VdepError(f"--model/--compare {path} does not exist")
        run = hf_forward if is_hf_folder(path) else vdep_forward
        forward = run(path, image, request.question, request.max_new_tokens, want_answer)
        count = len(forward.attentions)
        layers = list(range(count)) if layers is None else layers
        bad = [layer for layer in layers if not -count <= layer < count]
        if bad:
            raise VdepError(f"--layers {bad}: {path} has {count} layers (0 to {count - 1})")
        results.append(model_maps(forward, str(path), layers, request.heads, request.source))
    return results, list(layers)


def draw_attention_maps(request: AttentionRequest, out: Path) -> tuple[Path, Path]:
    """The figure at `out` and the arrays at `out` with suffix .npz."""
    results, layers = compute_maps(request)
    arrays = out.with_suffix(".npz")
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(arrays, maps=np.stack([r.maps for r in results]), image_share=np.stack([r.image_share for r in results]),
             layers=np.array(layers), models=np.array([r.name for r in results]),
             answers=np.array([r.answer for r in results]), question=np.array(request.question),
             heads=np.array(request.heads), source=np.array(request.source))
    plot(results, layers, request, out)
    return out, arrays


def plot(results: list[ModelMaps], layers: list[int], request: AttentionRequest, out: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise VdepError("vdep attention-map draws with matplotlib: pip install 'vdep[viz]'") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    rows, columns = len(results), len(layers)
    figure, axes = plt.subplots(rows, columns, figsize=(2.2 * columns + 0.4, 2.4 * rows + 0.6), squeeze=False)
    for row, result in enumerate(results):
        height, width = result.picture.shape[:2]
        for column, layer in enumerate(layers):
            axis = axes[row][column]
            grid = result.maps[column]
            axis.imshow(result.picture)
            spread = float(grid.max() - grid.min())
            scaled = (grid - grid.min()) / spread if spread > 0 else np.zeros_like(grid)
            axis.imshow(scaled, cmap="jet", alpha=0.45, extent=(0, width, height, 0), interpolation="nearest",
                        vmin=0, vmax=1)
            axis.set_xticks([])
            axis.set_yticks([])
            axis.set_title(f"layer {layer} (image {100 * result.image_share[column]:.0f}%)", fontsize=8)
            if column == 0:
                label = Path(result.name).name + (f"\n→ {result.answer!r}" if result.answer else "")
                axis.set_ylabel(label, fontsize=8)
    who = {"question": "question", "answer": "answer", "both": "question and answer"}[request.source]
    figure.suptitle(f"{request.question!r}\nattention of the {who} tokens to the image tokens, {request.heads} over heads",
                    fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)
