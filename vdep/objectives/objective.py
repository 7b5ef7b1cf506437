"""The VDEP objective of one stage, as one object.

Built from the stage's `vdep` settings, the run seed and the image placeholder facts (the tokenizer's
`<image>` id, the vision tower's tokens per image) *before* the model, it is the one place that reads
the settings. It owns:
- mode assignment: which image samples of a global batch are in VDEP mode (`modes`);
- input preparation: what each token of a micro-batch trains on (`prepare`, supervision.py), which
  also yields the positions at which the probes (the logged norms of h and e) are measured;
- the implementation of the image term (`term`: the reference, or the fused Triton kernel, with its
  pass-through form for the identity head) and the settings that shape it (target norm, stop-gradient);
- the VDEP head (`make_head`) and the weighting of the two terms (`loss`, with α).
The trainer, the model and the global-batch planner are handed this object; none reads `VdepConfig`.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..config import VdepConfig
from ..data.batch import Batch
from ..errors import ConfigError
from .losses import GlobalCounts, LossSums, batch_loss, reference_vdep_sum
from .modes import assign_vdep_modes
from .supervision import ModelInputs, prepare_inputs

# (hidden, embeds, image_targets, head, target_norm, detach_target) → summed image term
VdepSumFn = Callable[..., torch.Tensor]
# (hidden, embeds, image_targets, target_norm, detach_target) → (hidden states for the text loss, image sum)
VdepPassThroughFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class VdepTerm:
    """How the model computes the image term: an implementation and the settings that shape it."""

    vdep_sum: VdepSumFn
    target_norm: str = "none"
    detach_target: bool = True
    # The fused kernel's form that hands the hidden states on to the text loss (identity head only):
    # its backward adds the VDEP rows into the text loss's gradient in place.
    pass_through: VdepPassThroughFn | None = None
    description: str = "reference"

    def __call__(self, hidden: torch.Tensor, embeds: torch.Tensor, image_targets: torch.Tensor,
                 head: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(the hidden states the text loss reads, the summed image term)."""
        if self.pass_through is not None:
            return self.pass_through(hidden, embeds, image_targets, self.target_norm, self.detach_target)
        return hidden, self.vdep_sum(hidden, embeds, image_targets, head, self.target_norm, self.detach_target)


def fused_unavailable_reason(device: torch.device, head: str) -> str | None:
    """Why the fused kernel cannot run here (None: it can)."""
    if head not in ("identity", "linear"):
        return f"vdep.head={head} is not fused"
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install 'vdep[triton]')"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA device (on CPU, Triton's interpreter runs it with TRITON_INTERPRET=1, for testing)"
    return None


def select_term(config: VdepConfig, device: torch.device) -> VdepTerm:
    """The implementation `vdep.kernel` asks for: `reference`, `fused`, or `auto` (fused on CUDA with
    Triton installed, the reference elsewhere, saying why)."""
    settings = {"target_norm": config.target_norm, "detach_target": config.detach_target}
    if config.kernel == "reference":
        return VdepTerm(reference_vdep_sum, **settings)
    why_not = fused_unavailable_reason(device, config.head)
    if config.kernel == "fused" and why_not is not None:
        raise ConfigError(f"vdep.kernel=fused: {why_not}; use vdep.kernel=auto or reference")
    if config.kernel == "auto" and (why_not is not None or device.type != "cuda"):
        return VdepTerm(reference_vdep_sum, **settings,
                        description=f"reference ({why_not or 'CPU: the interpreter is for tests'})")
    from ..kernels.fused_vdep import fused_vdep_pass_through, fused_vdep_sum

    if config.head == "identity":
        return VdepTerm(fused_vdep_sum, **settings, pass_through=fused_vdep_pass_through,
                        description="fused (Triton), its gradient added into the text loss's")
    return VdepTerm(fused_vdep_sum, **settings, description="fused (Triton)")


def make_vdep_head(kind: str, hidden_size: int) -> nn.Module:
    """`identity`, or a D→D linear map initialised to the identity (trained, never exported)."""
    if kind == "identity":
        return nn.Identity()
    head = nn.Linear(hidden_size, hidden_size)
    with torch.no_grad():
        head.weight.copy_(torch.eye(hidden_size))
        head.bias.zero_()
    return head


class VdepObjective:
    """One stage's VDEP objective (see the module docstring)."""

    def __init__(self, config: VdepConfig, *, image_token_id: int, num_image_tokens: int, seed: int,
                 device: torch.device):
        self.config = config
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens
        self.seed = seed
        self.term = select_term(config, device)

    @property
    def alpha(self) -> float:
        return self.config.alpha

    @property
    def mode_ratio(self) -> float:
        """The share of image samples in VDEP mode (0 when VDEP is off in this stage)."""
        return self.config.mode_ratio if self.config.enabled else 0.0

    def modes(self, has_image: torch.Tensor, sample_ids: torch.Tensor, step: int) -> torch.Tensor:
        """VDEP-mode flag per slot of the global batch (`has_image`: bool, `sample_ids`: int64 per slot), the same
        on every rank and for any layout of the same samples (modes.py)."""
        return assign_vdep_modes(has_image, sample_ids, self.mode_ratio, self.seed, step)

    def prepare(self, batch: Batch, vdep_mode: torch.Tensor) -> ModelInputs:
        """The model's inputs for a micro-batch whose samples have the given modes."""
        return prepare_inputs(batch, vdep_mode, self.config, self.image_token_id, self.num_image_tokens)

    def make_head(self, hidden_size: int) -> nn.Module:
        return make_vdep_head(self.config.head, hidden_size)

    def loss(self, sums: LossSums, counts: GlobalCounts) -> torch.Tensor:
        """This micro-batch's share of L = L_text/N_text + α·L_img/N_img."""
        return batch_loss(sums, counts, self.alpha)
