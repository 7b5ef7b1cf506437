"""The VDEP objective pinned on hand-computed cases (docs/vdep.md is the specification)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vdep.config import VdepConfig
from vdep.conventions import IGNORE_INDEX, round_half_up
from vdep.data.batch import Batch, sample_id
from vdep.objectives.losses import GlobalCounts, LossSums, batch_loss, reference_vdep_sum, text_loss_sum
from vdep.objectives.modes import assign_vdep_modes
from vdep.objectives.objective import make_vdep_head
from vdep.objectives.supervision import prepare_inputs, supervised_image_positions, text_first_order

IMG = 9  # image placeholder id in these hand-made batches
BOS, A, B, C, PAD = 1, 5, 6, 7, 0


def make_batch(rows: list[list[int]], labels: list[list[int]] | None = None, image_tokens: int = 2) -> Batch:
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), PAD)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    label_tensor = torch.full((len(rows), length), IGNORE_INDEX)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
        if labels is not None:
            label_tensor[i, : len(row)] = torch.tensor(labels[i])
    has_image = torch.tensor([IMG in r for r in rows])
    n_images = int(has_image.sum())
    return Batch(input_ids, label_tensor, attention, torch.zeros(max(1, n_images), 3, 4, 4), has_image,
                 [str(i) for i in range(len(rows))], one_sample_per_row(attention))


def one_sample_per_row(attention: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(attention.shape[0])[:, None].expand_as(attention)
    return torch.where(attention.bool(), rows, -1)


def test_reconstruction_is_next_token_shift_by_one():
    # positions:      0    1    2    3    4
    # tokens:        BOS   A   IMG  IMG   B
    # I' = {2, 3}: h_1 predicts e_2 and h_2 predicts e_3.
    hidden = torch.tensor([[[50.0, 50.0], [1.0, 0.0], [0.0, 2.0], [70.0, 70.0], [80.0, 80.0]]], requires_grad=True)
    embeds = torch.tensor([[[9.0, 9.0], [9.0, 9.0], [0.0, 0.0], [0.0, 0.0], [9.0, 9.0]]])
    targets = supervised_image_positions(torch.tensor([[BOS, A, IMG, IMG, B]]), torch.zeros(1, 5, dtype=torch.long), IMG,
                                         skip_first=False)
    assert targets.tolist() == [[False, False, True, True, False]]
    loss = reference_vdep_sum(hidden, embeds, targets, nn.Identity())
    # (1/D)·||h_1 - e_2||² + (1/D)·||h_2 - e_3||² = (1/2)·1 + (1/2)·4
    assert loss.item() == pytest.approx(2.5)
    loss.backward()
    # Only h_1 and h_2 receive gradient: d/dh_1 = (2/D)(h_1 - e_2) = (1, 0)
    assert hidden.grad[0, 1].tolist() == [1.0, 0.0] and hidden.grad[0, 2].tolist() == [0.0, 2.0]
    assert hidden.grad[0, [0, 3, 4]].abs().sum() == 0


def test_no_prediction_crosses_a_sample_boundary():
    # Row 0 starts with the image (no BOS): its first image position has no predecessor in the sample.
    # Row 1 is shorter and padded; padding never counts.
    batch = make_batch([[IMG, IMG, A, B], [BOS, IMG, IMG]])
    positions = supervised_image_positions(batch.input_ids, batch.sample_index, IMG, skip_first=False)
    assert positions.tolist() == [[False, True, False, False], [False, True, True, False]]


def test_no_prediction_crosses_a_sample_boundary_inside_a_packed_row():
    # One row holding two samples; the second starts with its image right after the first's last token.
    ids = torch.tensor([[BOS, A, IMG, IMG, IMG, IMG, B, PAD]])
    samples = torch.tensor([[0, 0, 0, 0, 1, 1, 1, -1]])
    positions = supervised_image_positions(ids, samples, IMG, skip_first=False)
    assert positions.tolist() == [[False, False, True, True, False, True, False, False]]
    skipped = supervised_image_positions(ids, samples, IMG, skip_first=True)
    assert skipped.tolist() == [[False, False, False, True, False, True, False, False]]


def test_skip_first_image_token_drops_each_spans_first_position():
    ids = torch.tensor([[BOS, IMG, IMG, IMG, A]])
    samples = torch.zeros_like(ids)
    assert supervised_image_positions(ids, samples, IMG, skip_first=True).tolist() == [[False, False, True, True, False]]


def test_modes_pick_round_half_up_of_the_image_samples_by_seed_and_step():
    has_image = torch.tensor([True, True, False, True, True, False, True])  # 5 image samples
    ids = torch.tensor([sample_id(0, f"{i:09d}") for i in range(7)])
    for ratio, expected in ((0.5, 3), (0.3, 2), (0.1, 1), (0.0, 0), (1.0, 5)):  # 2.5 → 3, 1.5 → 2, 0.5 → 1
        modes = assign_vdep_modes(has_image, ids, ratio, seed=3, step=11)
        assert int(modes.sum()) == expected == round_half_up(ratio * 5)
        assert not bool((modes & ~has_image).any())  # text-only samples stay in LLaVA mode
    assert torch.equal(assign_vdep_modes(has_image, ids, 0.5, 3, 11), assign_vdep_modes(has_image, ids, 0.5, 3, 11))
    choices = {tuple(assign_vdep_modes(has_image, ids, 0.5, 3, step).tolist()) for step in range(20)}
    assert len(choices) > 3  # a different draw at different steps
    assert round_half_up(2.5) == 3 and round(2.5) == 2  # documented: not Python's banker's rounding


def test_modes_follow_the_samples_not_their_slots():
    """The same global batch laid out otherwise (other ranks, micro-batches or order) puts the same samples in
    VDEP mode: a layout is a permutation of the slots."""
    generator = torch.Generator().manual_seed(0)
    has_image = torch.rand(64, generator=generator) < 0.7
    ids = torch.tensor([sample_id(i % 4, f"{i:09d}") for i in range(64)])
    for ratio in (0.25, 0.5, 1.0):
        for step in range(5):
            modes = assign_vdep_modes(has_image, ids, ratio, seed=1, step=step)
            chosen = set(ids[modes].tolist())
            for _ in range(3):
                layout = torch.randperm(64, generator=generator)
                relaid = assign_vdep_modes(has_image[layout], ids[layout], ratio, seed=1, step=step)
                assert set(ids[layout][relaid].tolist()) == chosen
                assert int(relaid.sum()) == round_half_up(ratio * int(has_image.sum()))


def test_prepare_inputs_applies_modes_to_labels_and_targets():
    rows = [[BOS, IMG, IMG, A, B], [BOS, IMG, IMG, C, A], [BOS, A, B, C]]
    labels = [[-100, -100, -100, A, B], [-100, -100, -100, C, A], [-100, -100, B, C]]
    batch = make_batch(rows, labels)
    vdep_mode = torch.tensor([True, False, False])
    inputs = prepare_inputs(batch, vdep_mode, VdepConfig(), IMG, num_image_tokens=2)
    assert inputs.text_labels[0].tolist() == [IGNORE_INDEX] * 5  # VDEP mode: no text loss by default
    assert inputs.text_labels[1].tolist() == labels[1] and inputs.text_labels[2, :4].tolist() == labels[2]
    assert inputs.image_targets.tolist() == [[False, True, True, False, False], [False] * 5, [False] * 5]
    assert inputs.image_positions[1].tolist() == [False, True, True, False, False]  # statistics: all image rows
    assert inputs.num_text_targets == 2 + 2 and inputs.num_image_targets == 2
    both = prepare_inputs(batch, vdep_mode, VdepConfig(text_loss_in_vdep_mode=True), IMG, 2)
    assert both.text_labels[0].tolist() == labels[0] and both.num_text_targets == 6
    detached = prepare_inputs(batch, vdep_mode, VdepConfig(detach_input=True), IMG, 2)
    assert detached.detached_images.tolist() == [True, False]  # images in row order; row 2 has none
    assert not prepare_inputs(batch, vdep_mode, VdepConfig(), IMG, 2).detached_images.any()


def test_text_first_layout_moves_the_image_after_the_text():
    rows = [[BOS, IMG, IMG, A, B], [BOS, IMG, IMG, C]]
    labels = [[-100, -100, -100, A, B], [-100, -100, -100, C]]
    batch = make_batch(rows, labels)
    order = text_first_order(batch.input_ids, batch.sample_index, IMG, batch.sample_index >= 0)
    assert torch.gather(batch.input_ids, 1, order).tolist() == [[BOS, A, B, IMG, IMG], [BOS, C, IMG, IMG, PAD]]
    config = VdepConfig(layout="text_first", text_loss_in_vdep_mode=True)
    inputs = prepare_inputs(batch, torch.tensor([True, False]), config, IMG, 2)
    assert inputs.input_ids.tolist() == [[BOS, A, B, IMG, IMG], [BOS, IMG, IMG, C, PAD]]  # only VDEP rows move
    assert inputs.text_labels[0].tolist() == [-100, A, B, -100, -100]  # labels travel with their tokens
    assert inputs.image_targets[0].tolist() == [False, False, False, True, True]  # h_2 (after B) predicts e_3


def test_detach_target_decides_whether_the_target_gets_gradient():
    hidden = torch.randn(1, 4, 3, requires_grad=True)
    embeds = torch.randn(1, 4, 3, requires_grad=True)
    targets = torch.tensor([[False, True, True, False]])
    reference_vdep_sum(hidden, embeds, targets, nn.Identity(), detach_target=True).backward()
    assert embeds.grad is None
    reference_vdep_sum(hidden, embeds, targets, nn.Identity(), detach_target=False).backward()
    expected = -(2 / 3) * (hidden[0, :2] - embeds[0, 1:3])  # d/de_t (1/D)||h_{t-1} - e_t||²
    assert torch.allclose(embeds.grad[0, 1:3], expected.detach())
    assert embeds.grad[0, [0, 3]].abs().sum() == 0


def test_target_normalisation():
    hidden = torch.tensor([[[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]]])
    embeds = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [6.0, 8.0]]])
    targets = torch.tensor([[False, False, True]])
    assert reference_vdep_sum(hidden, embeds, targets, nn.Identity(), "none").item() == pytest.approx((9 + 16) / 2)
    # l2: both rows become (0.6, 0.8): no error at all.
    assert reference_vdep_sum(hidden, embeds, targets, nn.Identity(), "l2").item() == pytest.approx(0.0, abs=1e-12)
    # layernorm (no parameters): each row standardised over D; (3, 4) and (6, 8) both become (-1, 1).
    assert reference_vdep_sum(hidden, embeds, targets, nn.Identity(), "layernorm").item() == pytest.approx(0.0, abs=1e-6)
    h = torch.randn(1, 5, 8)
    e = torch.randn(1, 5, 8)
    t = torch.tensor([[False, True, False, True, True]])
    by_hand = (F.layer_norm(h[0, [0, 2, 3]], (8,)) - F.layer_norm(e[0, [1, 3, 4]], (8,))).pow(2).mean(-1).sum()
    assert reference_vdep_sum(h, e, t, nn.Identity(), "layernorm").item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_linear_head_starts_as_the_identity():
    hidden, embeds = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    targets = torch.zeros(2, 6, dtype=torch.bool)
    targets[:, 2:5] = True
    identity = reference_vdep_sum(hidden, embeds, targets, make_vdep_head("identity", 8))
    linear = reference_vdep_sum(hidden, embeds, targets, make_vdep_head("linear", 8))
    assert linear.item() == pytest.approx(identity.item(), rel=1e-6)


def test_empty_selection_is_a_zero_connected_to_the_graph():
    hidden = torch.randn(2, 5, 4, requires_grad=True)
    head = make_vdep_head("linear", 4)
    loss = reference_vdep_sum(hidden, torch.randn(2, 5, 4), torch.zeros(2, 5, dtype=torch.bool), head)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() == 0  # backward reached hidden (ZeRO-3 rule 3)
    assert head.weight.grad is not None  # and the head's parameters


def test_text_loss_is_summed_cross_entropy_of_supervised_next_tokens():
    torch.manual_seed(0)
    head = nn.Linear(4, 11, bias=False)
    hidden = torch.randn(2, 6, 4)
    labels = torch.full((2, 6), IGNORE_INDEX)
    labels[0, 3:5] = torch.tensor([3, 7])
    labels[1, 5] = 2
    logits = head(hidden)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), reduction="sum")
    assert text_loss_sum(hidden, labels, head).item() == pytest.approx(expected.item(), rel=1e-6)
    empty = text_loss_sum(hidden.requires_grad_(), torch.full((2, 6), IGNORE_INDEX), head)
    assert empty.item() == 0.0 and empty.requires_grad


def test_batch_loss_normalises_by_global_counts_and_weights_by_alpha():
    zero = torch.tensor(0.0)
    sums = LossSums(text=torch.tensor(6.0), vdep=torch.tensor(3.0), hidden_norm=zero, target_norm=zero)
    assert batch_loss(sums, GlobalCounts(text=3, image=2), alpha=0.5).item() == pytest.approx(6 / 3 + 0.5 * 3 / 2)
    assert batch_loss(sums, GlobalCounts(text=3, image=0), alpha=0.5).item() == pytest.approx(2 + 0.5 * 3)  # max(N, 1)
    # Micro-batch shares add up to the loss of the whole batch.
    parts = [LossSums(torch.tensor(t), torch.tensor(v), zero, zero) for t, v in ((1.0, 2.0), (5.0, 1.0))]
    counts = GlobalCounts(text=4, image=6)
    total = sum(batch_loss(p, counts, 2.0) for p in parts)
    assert total.item() == pytest.approx((1 + 5) / 4 + 2.0 * (2 + 1) / 6)
    assert not math.isnan(batch_loss(LossSums(zero, zero, zero, zero), GlobalCounts(0, 0), 1.0).item())
