"""The multimodal model and its explicit forward.

Parameter names mirror transformers' Llava layout (`vision_tower`, `multi_modal_projector`,
`language_model`, `lm_head`), so exporting is a key mapping. The forward is ours rather than
`LlavaForConditionalGeneration.forward` because training needs three things it does not give:

1. the vision path on every rank at every step, before the LLM, even when the micro-batch has no image
   (ZeRO-3 gathers parameters module by module and all ranks must run the same modules in the same
   order; a batch without images feeds one zero image and scatters a zero-length slice of it);
2. the last hidden states, for the VDEP term;
3. named loss sums, with the LM head applied only to supervised positions (and, beside them, the sums of
   the VDEP probes: objectives/probes.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..data.anyres import KIND_COLUMN, SINGLE, VIEWS_COLUMN, ImageGeometry
from ..data.images import normalise_pixels
from ..objectives.losses import LossSums, text_loss_sum
from ..objectives.objective import VdepTerm
from ..objectives.probes import probe_sums
from ..objectives.supervision import ModelInputs
from .image_tokens import pack_image_tokens
from .vision import image_features

# The VDEP head belongs to a stage's objective, not to the multimodal model: a later stage (or an
# evaluation, an export) that has no head, or a different kind, starts without it (model/loading.py), and
# no export holds it (export/layout.py).
OBJECTIVE_ONLY_PREFIXES = ("vdep_head.",)


@dataclass(frozen=True)
class MultimodalSpec:
    """Facts about the model that the forward, the data path and the objective need, and that no single
    submodule holds (see `build.model_spec`)."""

    image_token_id: int
    num_image_tokens: int
    feature_layer: int
    feature_select: str
    family: str  # of the vision tower: "clip" or "siglip"
    vision_hidden_size: int
    text_hidden_size: int
    # How images become views and tokens (model.image_aspect_ratio and its settings; data/anyres.py).
    geometry: ImageGeometry


class VdepLlava(nn.Module):
    def __init__(
        self,
        vision_tower: nn.Module,
        multi_modal_projector: nn.Module,
        language_model: nn.Module,
        lm_head: nn.Module,
        vdep_head: nn.Module,
        spec: MultimodalSpec,
        vdep_term: VdepTerm,
        image_newline: torch.Tensor | None = None,
    ):
        super().__init__()
        self.vision_tower = vision_tower
        self.multi_modal_projector = multi_modal_projector
        self.language_model = language_model
        self.lm_head = lm_head
        self.vdep_head = vdep_head
        self.spec = spec
        # The objective's implementation of the image term (reference or fused kernel) and its settings.
        self.vdep_term = vdep_term
        # `mm_patch_merge_type: spatial_unpad`: the learned row end of tiled images (LlavaNextModel.image_newline);
        # none otherwise, so a model without AnyRes has exactly the parameters it always had.
        self.image_newline = nn.Parameter(image_newline) if image_newline is not None else None

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        num_images: int,
        detached_images: torch.Tensor | None = None,
        image_layout: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with the images' tokens scattered into the image placeholders.

        `image_layout` (data/anyres.py) says how each image's views become its tokens; without it each of the
        first `num_images` rows of `pixel_values` is one image of the tower's tokens (LLaVA-1.5)."""
        spec = self.spec
        features = image_features(self.vision_tower, pixel_values, spec.feature_layer, spec.feature_select)
        view_embeds = self.multi_modal_projector(features)
        if detached_images is not None:
            view_embeds = torch.where(detached_images[:, None, None], view_embeds.detach(), view_embeds)
        embeds = self.language_model.get_input_embeddings()(input_ids)
        placeholders = (input_ids == spec.image_token_id).unsqueeze(-1)
        if image_layout is None or (self.image_newline is None and bool((image_layout[:, KIND_COLUMN] == SINGLE).all())):
            views = int(image_layout[:, VIEWS_COLUMN].sum()) if image_layout is not None else num_images
            # One view per image, its features its tokens. With no image this scatters a zero-length slice of
            # the dummy image's embeddings: the projector stays in the graph (zero gradient), as ZeRO-3 requires.
            image_tokens = view_embeds[:views]
        else:  # tiles, videos, newlines; the newline joins the graph on every rank (a zero-length slice at least)
            image_tokens = pack_image_tokens(view_embeds, image_layout, spec.geometry, self.image_newline)
        return embeds.masked_scatter(placeholders, image_tokens.to(embeds.dtype))

    def hidden_states(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                      position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The LLM's last-layer hidden states, after its final norm (what the LM head reads).

        A packed batch comes with `position_ids` that restart at each sample and no attention mask:
        transformers then confines attention to each sample (a block-diagonal mask for SDPA/eager,
        variable-length sequences for flash-attn).
        """
        return self.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state

    def forward(self, inputs: ModelInputs) -> LossSums:
        pixel_values = inputs.pixel_values
        if not pixel_values.is_floating_point():  # uint8 from the loader: normalise here, on the device
            dtype = next(self.multi_modal_projector.parameters()).dtype
            pixel_values = normalise_pixels(pixel_values, inputs.pixel_table).to(dtype)
        embeds = self.embed(inputs.input_ids, pixel_values, inputs.num_images, inputs.detached_images, inputs.image_layout)
        hidden = self.hidden_states(embeds, inputs.attention_mask, inputs.position_ids)
        # Always computed, also with nothing to supervise (an empty selection sums to a zero that is
        # still connected to `hidden`): every rank must run the same backward hooks under ZeRO-3.
        # With the fused kernel's pass-through form the text loss reads the hidden states through the VDEP
        # node, whose backward adds the VDEP rows into the text loss's gradient in place.
        text_hidden, vdep = self.vdep_term(hidden, embeds, inputs.image_targets, self.vdep_head)
        text = text_loss_sum(text_hidden, inputs.text_labels, self.lm_head)
        with torch.no_grad():
            predictors = inputs.image_positions[:, 1:]
            hidden_norm = hidden[:, :-1][predictors].float().norm(dim=-1).sum()
            target_norm = embeds[inputs.image_positions].float().norm(dim=-1).sum()
        probes = probe_sums(hidden, embeds, inputs.image_positions, self.vdep_head, self.vdep_term.target_norm)
        return LossSums(text=text, vdep=vdep, hidden_norm=hidden_norm, target_norm=target_norm, probes=probes)
