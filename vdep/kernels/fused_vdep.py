"""Fused VDEP image term: Triton kernels for the forward and backward of `reference_vdep_sum`.

For every target position t in I' (flat index into B·T), the predictor is the hidden state at t − 1
(position 0 is never a target, so t − 1 stays in the same sample). A program handles one selected
row: it loads h[t−1] and e[t] straight from the (B·T, D) views — no gathered copies of the selected
rows — normalises both when asked (layernorm without affine, or l2), and writes the row's
(1/D)·||ĥ − ê||² in fp32. The backward reloads the same two rows and writes their gradients, again
in one pass. Inputs may be bf16, fp16 or fp32; all arithmetic is fp32.

The model uses the pass-through form (`fused_vdep_pass_through`): the text loss reads the hidden
states through this node, so its backward receives the text loss's dense gradient and adds the VDEP
rows into it, instead of writing them into a zero-filled full-size gradient that autograd then adds.

Rows are processed whole (one block of next_power_of_2(D) elements), which covers LLM hidden sizes up
to 16384. With the `linear` VDEP head the selected rows go through the head in a fixed number of
chunks under activation checkpointing (see `fused_vdep_sum`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NORMS = {"none": 0, "layernorm": 1, "l2": 2}
MAX_HIDDEN = 16384


@triton.jit
def _normalise(x, mask, D, NORM: tl.constexpr):
    """Returns (normalised row, scale) where scale is 1/σ (layernorm) or 1/max(||x||, eps) (l2)."""
    if NORM == 1:
        mean = tl.sum(x, axis=0) / D
        centred = tl.where(mask, x - mean, 0.0)
        inv = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / D + 1e-5)  # F.layer_norm's default eps
        return centred * inv, inv
    elif NORM == 2:
        inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(x * x, axis=0)), 1e-12)  # F.normalize's default eps
        return x * inv, inv
    else:
        return x, 1.0


@triton.jit
def _normalise_backward(grad_normed, normed, inv, mask, D, NORM: tl.constexpr):
    """Gradient through `_normalise`, given the normalised row and its scale."""
    if NORM == 1:
        mean_grad = tl.sum(grad_normed, axis=0) / D
        mean_grad_dot = tl.sum(grad_normed * normed, axis=0) / D
        return tl.where(mask, inv * (grad_normed - mean_grad - normed * mean_grad_dot), 0.0)
    elif NORM == 2:
        return inv * (grad_normed - normed * tl.sum(grad_normed * normed, axis=0))
    else:
        return grad_normed


@triton.jit
def _load_pair(hidden_ptr, embeds_ptr, rows_ptr, i, D, stride_h, stride_e, SHIFT: tl.constexpr, NORM: tl.constexpr,
               BLOCK: tl.constexpr):
    """Selected row i: its target row index, the column block, and both rows normalised (with scales).

    The prediction is row `target_row - SHIFT` of `hidden`: SHIFT=1 reads the hidden state before the
    target (the VDEP shift), SHIFT=0 a prediction row already aligned with its target (linear head).
    """
    target_row = tl.load(rows_ptr + i)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    p = tl.load(hidden_ptr + (target_row - SHIFT) * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
    e = tl.load(embeds_ptr + target_row * stride_e + cols, mask=mask, other=0.0).to(tl.float32)
    p_hat, p_inv = _normalise(p, mask, D, NORM)
    e_hat, e_inv = _normalise(e, mask, D, NORM)
    return target_row, cols, mask, p_hat, p_inv, e_hat, e_inv


@triton.jit
def _vdep_forward_kernel(hidden_ptr, embeds_ptr, rows_ptr, out_ptr, D, stride_h, stride_e,
                         SHIFT: tl.constexpr, NORM: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    _, _, mask, p_hat, _, e_hat, _ = _load_pair(hidden_ptr, embeds_ptr, rows_ptr, i, D, stride_h, stride_e, SHIFT,
                                                   NORM, BLOCK)
    diff = tl.where(mask, p_hat - e_hat, 0.0)
    tl.store(out_ptr + i, tl.sum(diff * diff, axis=0) / D)


@triton.jit
def _vdep_backward_kernel(hidden_ptr, embeds_ptr, rows_ptr, grad_out_ptr, grad_hidden_ptr, grad_embeds_ptr,
                          D, stride_h, stride_e, SHIFT: tl.constexpr, NORM: tl.constexpr, TARGET_GRAD: tl.constexpr,
                          ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr):
    """Writes the selected rows' gradients; with ACCUMULATE, adds the hidden rows' gradient to what is
    there (the pass-through's incoming gradient), in fp32, rounding once. Distinct targets have
    distinct predictor rows, so no two programs touch the same row."""
    i = tl.program_id(0)
    target_row, cols, mask, p_hat, p_inv, e_hat, e_inv = _load_pair(
        hidden_ptr, embeds_ptr, rows_ptr, i, D, stride_h, stride_e, SHIFT, NORM, BLOCK
    )
    upstream = tl.load(grad_out_ptr)
    grad_p_hat = tl.where(mask, (p_hat - e_hat) * (2.0 * upstream / D), 0.0)
    grad_p = _normalise_backward(grad_p_hat, p_hat, p_inv, mask, D, NORM)
    grad_row = grad_hidden_ptr + (target_row - SHIFT) * stride_h + cols
    if ACCUMULATE:
        grad_p += tl.load(grad_row, mask=mask, other=0.0).to(tl.float32)
    tl.store(grad_row, grad_p.to(grad_hidden_ptr.dtype.element_ty), mask=mask)
    if TARGET_GRAD:
        grad_e = _normalise_backward(-grad_p_hat, e_hat, e_inv, mask, D, NORM)
        tl.store(grad_embeds_ptr + target_row * stride_e + cols,
                 grad_e.to(grad_embeds_ptr.dtype.element_ty), mask=mask)


def row_block(d: int) -> int:
    if d > MAX_HIDDEN:
        raise ValueError(f"the fused VDEP kernel handles hidden sizes up to {MAX_HIDDEN}, not {d}")
    return triton.next_power_of_2(d)


# `benchmarks/kernel_bench.py --num-warps` sets this to time other launch widths; None: `launch_warps`.
NUM_WARPS_OVERRIDE: int | None = None


def launch_warps(block: int) -> int:
    """Warps per program for a row of `block` elements.

    One program holds a whole row, several times over (both rows, their normalised copies, the
    difference), so wider rows need more threads or they spill registers. This is the rule the
    row-wise Triton kernels in the wild use for layer norms (4 warps, 8 from 2048, 16 from 8192); it has
    not been measured for this kernel yet (no GPU so far): `kernel_bench.py --num-warps 4,8,16` does.
    """
    if NUM_WARPS_OVERRIDE is not None:
        return NUM_WARPS_OVERRIDE
    return 16 if block >= 8192 else 8 if block >= 2048 else 4


def _forward_rows(hidden_rows: torch.Tensor, embed_rows: torch.Tensor, rows: torch.Tensor, norm: int,
                  shift: int) -> torch.Tensor:
    """The VDEP sum over `rows` (fp32 scalar)."""
    block = row_block(hidden_rows.shape[-1])
    per_row = torch.empty(rows.numel(), dtype=torch.float32, device=hidden_rows.device)
    if rows.numel():
        _vdep_forward_kernel[(rows.numel(),)](
            hidden_rows, embed_rows, rows, per_row, hidden_rows.shape[-1], hidden_rows.stride(0),
            embed_rows.stride(0), SHIFT=shift, NORM=norm, BLOCK=block, num_warps=launch_warps(block),
        )
    return per_row.sum()


def _backward_rows(hidden_rows: torch.Tensor, embed_rows: torch.Tensor, rows: torch.Tensor, grad_sum: torch.Tensor,
                   grad_hidden: torch.Tensor, grad_embeds: torch.Tensor | None, norm: int, shift: int,
                   accumulate: bool) -> None:
    """Writes (or, with `accumulate`, adds) the selected rows' gradients into the given full-size tensors."""
    block = row_block(hidden_rows.shape[1])
    if rows.numel():
        _vdep_backward_kernel[(rows.numel(),)](
            hidden_rows, embed_rows, rows, grad_sum.float().reshape(1).contiguous(), grad_hidden,
            grad_embeds if grad_embeds is not None else grad_hidden,  # unused when TARGET_GRAD is off
            hidden_rows.shape[1], hidden_rows.stride(0), embed_rows.stride(0),
            SHIFT=shift, NORM=norm, TARGET_GRAD=grad_embeds is not None, ACCUMULATE=accumulate, BLOCK=block,
            num_warps=launch_warps(block),
        )


class FusedVdepSum(torch.autograd.Function):
    """sum over selected rows r of (1/D)·||norm(hidden[r − shift]) − norm(embeds[r])||², fused.

    `hidden` and `embeds` are (N, D) row views; `rows` the selected target rows.
    """

    @staticmethod
    def forward(ctx, hidden_rows: torch.Tensor, embed_rows: torch.Tensor, rows: torch.Tensor, norm: int,
                detach_target: bool, shift: int) -> torch.Tensor:
        ctx.save_for_backward(hidden_rows, embed_rows, rows)
        ctx.norm, ctx.detach_target, ctx.shift = norm, detach_target, shift
        return _forward_rows(hidden_rows, embed_rows, rows, norm, shift)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        hidden_rows, embed_rows, rows = ctx.saved_tensors
        # Full-size gradients, as autograd needs; only the selected rows are written. The zero fill
        # moves more bytes than the kernel does; `FusedVdepPassThrough` avoids it for the hidden states.
        grad_hidden = torch.zeros_like(hidden_rows)
        target_grad = not ctx.detach_target and ctx.needs_input_grad[1]
        grad_embeds = torch.zeros_like(embed_rows) if target_grad else None
        _backward_rows(hidden_rows, embed_rows, rows, grad_output, grad_hidden, grad_embeds, ctx.norm, ctx.shift,
                       accumulate=False)
        return grad_hidden, grad_embeds, None, None, None, None


class FusedVdepPassThrough(torch.autograd.Function):
    """(the hidden rows, unchanged; the VDEP sum with the identity head).

    The text loss reads the returned rows, so the gradient that reaches this node's first output is
    the text loss's (full size, dense). The backward adds the VDEP rows' gradient into that tensor in
    place and hands it on as the hidden states' gradient: no zero-filled full-size gradient and no
    second full-size sum, which `FusedVdepSum` plus autograd's accumulation would cost.

    Updating the incoming gradient in place is safe because autograd gives a node's backward a
    buffer of its own (the output of the text loss's slice-and-index backward, or the sum of several
    such) that nothing reads afterwards; a non-contiguous one (a broadcast) is copied first.
    """

    @staticmethod
    def forward(ctx, hidden_rows: torch.Tensor, embed_rows: torch.Tensor, rows: torch.Tensor, norm: int,
                detach_target: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(hidden_rows, embed_rows, rows)
        ctx.norm, ctx.detach_target = norm, detach_target
        return hidden_rows.view_as(hidden_rows), _forward_rows(hidden_rows, embed_rows, rows, norm, 1)

    @staticmethod
    def backward(ctx, grad_passed: torch.Tensor, grad_sum: torch.Tensor):
        hidden_rows, embed_rows, rows = ctx.saved_tensors
        # autograd materialises an unused output's gradient as zeros, so both are tensors here.
        grad_hidden = grad_passed.contiguous()
        target_grad = not ctx.detach_target and ctx.needs_input_grad[1]
        grad_embeds = torch.zeros_like(embed_rows) if target_grad else None
        _backward_rows(hidden_rows, embed_rows, rows, grad_sum, grad_hidden, grad_embeds, ctx.norm, 1,
                       accumulate=True)
        return grad_hidden, grad_embeds, None, None, None


# The linear head runs in this many chunks of the selected rows, on every rank alike: ZeRO-3 gathers
# the head's weight at each call, so the number of calls must not depend on a rank's data.
LINEAR_HEAD_CHUNKS = 8


def _linear_head_chunk(hidden_rows: torch.Tensor, embed_rows: torch.Tensor, rows: torch.Tensor, head: torch.nn.Module,
                       norm: int, detach_target: bool) -> torch.Tensor:
    prediction = head(hidden_rows[rows - 1])  # the chunk's predictions only
    target = embed_rows[rows]
    aligned = torch.arange(rows.numel(), device=rows.device)
    return FusedVdepSum.apply(prediction.contiguous(), target.contiguous(), aligned, norm, detach_target, 0)


def fused_vdep_pass_through(hidden: torch.Tensor, embeds: torch.Tensor, image_targets: torch.Tensor,
                            target_norm: str = "none", detach_target: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states for the text loss, the VDEP sum) with the identity head; the value equals
    `(hidden, fused_vdep_sum(hidden, ...))` and so do the gradients, once the text loss reads the
    first result (see `FusedVdepPassThrough`)."""
    batch, length, d = hidden.shape
    rows = image_targets.reshape(-1).nonzero().squeeze(1)
    passed, total = FusedVdepPassThrough.apply(
        hidden.contiguous().view(-1, d), embeds.contiguous().view(-1, d), rows, NORMS[target_norm], detach_target
    )
    return passed.view(batch, length, d), total


def fused_vdep_sum(hidden: torch.Tensor, embeds: torch.Tensor, image_targets: torch.Tensor, head: torch.nn.Module,
                   target_norm: str = "none", detach_target: bool = True) -> torch.Tensor:
    """Drop-in for `reference_vdep_sum` with the identity or the linear head.

    Identity: one kernel over the selected rows, reading each hidden and target row once.
    Linear: the selected rows in `LINEAR_HEAD_CHUNKS` chunks; each chunk applies the head (a GEMM) to
    its rows and the fused kernel to the result, under activation checkpointing, so the prediction
    tensor only ever exists for one chunk, and again in the backward, never for all selected rows.
    """
    d = hidden.shape[-1]
    hidden_rows = hidden.contiguous().view(-1, d)
    embed_rows = embeds.contiguous().view(-1, d)
    rows = image_targets.reshape(-1).nonzero().squeeze(1)
    norm = NORMS[target_norm]
    if isinstance(head, torch.nn.Identity):
        return FusedVdepSum.apply(hidden_rows, embed_rows, rows, norm, detach_target, 1)
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"the fused VDEP kernel fuses the identity and linear heads, not {type(head).__name__}")
    from torch.utils.checkpoint import checkpoint

    total = hidden.new_zeros((), dtype=torch.float32)
    for chunk in torch.tensor_split(rows, LINEAR_HEAD_CHUNKS):
        total = total + checkpoint(_linear_head_chunk, hidden_rows, embed_rows, chunk, head, norm, detach_target,
                                   use_reentrant=False)
    return total
