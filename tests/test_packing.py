"""Sequence packing: several samples per row give the same per-sample results as one sample per row."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import samples
from vdep.config import VdepConfig
from vdep.conventions import IGNORE_INDEX
from vdep.data.batch import collate, collate_packed, pack_rows
from vdep.objectives.losses import GlobalCounts, batch_loss
from vdep.objectives.supervision import prepare_inputs
from vdep.train.freezing import apply_trainable


def test_first_fit_decreasing_packs_within_capacity_deterministically():
    lengths = [70, 20, 50, 30, 90, 10, 40]
    rows = pack_rows(lengths, 100)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 100 for row in rows)
    assert rows == [[4, 5], [0, 3], [2, 6], [1]]  # 90+10, 70+30, 50+40, 20
    assert pack_rows(lengths, 100) == rows
    with pytest.raises(ValueError, match="cannot be packed"):
        pack_rows([120], 100)


def per_sample_text_losses(model, inputs, sample_index: torch.Tensor, count: int) -> torch.Tensor:
    """Summed next-token cross-entropy of each sample (computed from the model's hidden states)."""
    embeds = model.embed(inputs.input_ids, inputs.pixel_values, inputs.num_images, inputs.detached_images)
    hidden = model.hidden_states(embeds, inputs.attention_mask, inputs.position_ids)
    logits = model.lm_head(hidden[:, :-1]).float()
    targets = inputs.text_labels[:, 1:]
    losses = F.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")
    losses = torch.where(targets != IGNORE_INDEX, losses, 0.0)
    owner = sample_index[:, 1:]
    return torch.zeros(count).index_add_(0, owner[owner >= 0], losses[owner >= 0])


@pytest.mark.parametrize("layout", ["image_first", "text_first"])
def test_packed_and_unpacked_batches_give_equal_per_sample_losses_and_gradients(tiny_model, tokenizer, small_data, layout):
    built = tiny_model
    model, spec = built.model, built.spec
    apply_trainable(model, ["projector", "language_model"])
    pool = samples(tiny_model, tokenizer, small_data, "vicuna_v1", 64)
    images = [s for s in pool if s.pixel_values is not None][:6]
    texts = [s for s in pool if s.pixel_values is None][:2]
    assert len(images) == 6 and len(texts) == 2
    data = images[:3] + texts[:1] + images[3:] + texts[1:]
    capacity = max(len(s.input_ids) for s in data) * 3  # several samples per row
    unpacked = collate(data, tokenizer.pad_token_id, (32, 32))
    packed = collate_packed(data, tokenizer.pad_token_id, (32, 32), capacity)
    assert packed.input_ids.shape[0] < unpacked.input_ids.shape[0] and packed.packed
    assert sorted(packed.keys) == sorted(unpacked.keys)
    # The same samples in VDEP mode in both (modes are per sample; the sample order differs).
    chosen = {s.key for s in data[::2] if s.pixel_values is not None}
    config = VdepConfig(layout=layout, alpha=0.7)
    results = {}
    for name, batch in (("unpacked", unpacked), ("packed", packed)):
        modes = torch.tensor([key in chosen for key in batch.keys])
        inputs = prepare_inputs(batch, modes, config, spec.image_token_id, spec.num_image_tokens)
        model.zero_grad(set_to_none=True)
        sums = model(inputs)
        batch_loss(sums, GlobalCounts(inputs.num_text_targets, inputs.num_image_targets), config.alpha).backward()
        with torch.no_grad():
            per_sample = per_sample_text_losses(model, inputs, batch.sample_index, batch.num_samples)
        results[name] = {
            "counts": (inputs.num_text_targets, inputs.num_image_targets),
            "sums": (sums.text.detach(), sums.vdep.detach()),
            "per_sample": dict(zip(batch.keys, per_sample.tolist())),
            "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        }
    a, b = results["unpacked"], results["packed"]
    assert a["counts"] == b["counts"] and a["counts"][1] > 0
    torch.testing.assert_close(b["sums"], a["sums"], rtol=1e-5, atol=1e-5)
    assert a["per_sample"].keys() == b["per_sample"].keys()
    for key, value in a["per_sample"].items():
        assert b["per_sample"][key] == pytest.approx(value, rel=1e-5, abs=1e-5), key
    assert sum(1 for v in a["per_sample"].values() if v > 0) >= 4
    assert a["grads"].keys() == b["grads"].keys() and len(a["grads"]) > 10
    for name in a["grads"]:
        torch.testing.assert_close(b["grads"][name], a["grads"][name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_packed_row_attends_within_each_sample_only(tiny_model, tokenizer, small_data):
    """Changing one sample of a packed row leaves the other samples' hidden states unchanged."""
    built = tiny_model
    model = built.model
    data = samples(tiny_model, tokenizer, small_data, "vicuna_v1", 3)
    capacity = sum(len(s.input_ids) for s in data)
    packed = collate_packed(data, tokenizer.pad_token_id, (32, 32), capacity)
    assert packed.input_ids.shape[0] == 1
    config = VdepConfig()
    modes = torch.zeros(3, dtype=torch.bool)
    first = prepare_inputs(packed, modes, config, built.spec.image_token_id, built.spec.num_image_tokens)
    changed_ids = first.input_ids.clone()
    middle = (packed.sample_index == 1)
    text_positions = middle & (changed_ids != built.spec.image_token_id)
    changed_ids[text_positions] = 5  # rewrite the middle sample's text
    second = first._replace(input_ids=changed_ids)
    with torch.no_grad():
        hidden = []
        for inputs in (first, second):
            embeds = model.embed(inputs.input_ids, inputs.pixel_values, inputs.num_images, inputs.detached_images)
            hidden.append(model.hidden_states(embeds, inputs.attention_mask, inputs.position_ids))
    others = (packed.sample_index == 0) | (packed.sample_index == 2)
    torch.testing.assert_close(hidden[0][others], hidden[1][others])
    assert not torch.allclose(hidden[0][middle], hidden[1][middle])


def test_sdpa_eager_and_flex_attention_agree_on_a_packed_batch(tiny_model, tokenizer, small_data):
    """FlexAttention runs forward only on CPU (PyTorch has no CPU backward for it): enough to check that
    its block mask from the position ids keeps each sample to itself exactly as SDPA's dense mask does."""
    built = tiny_model
    model = built.model
    data = samples(tiny_model, tokenizer, small_data, "vicuna_v1", 6)
    packed = collate_packed(data, tokenizer.pad_token_id, (32, 32), max(len(s.input_ids) for s in data) * 2)
    inputs = prepare_inputs(packed, torch.zeros(6, dtype=torch.bool), VdepConfig(), built.spec.image_token_id,
                            built.spec.num_image_tokens)
    outputs = {}
    try:
        for implementation in ("sdpa", "eager", "flex_attention"):
            model.language_model.set_attn_implementation(implementation)
            assert model.language_model.config._attn_implementation == implementation
            with torch.no_grad():
                embeds = model.embed(inputs.input_ids, inputs.pixel_values, inputs.num_images, inputs.detached_images)
                outputs[implementation] = model.hidden_states(embeds, None, inputs.position_ids)
    finally:
        model.language_model.set_attn_implementation("sdpa")
    real = packed.sample_index >= 0
    torch.testing.assert_close(outputs["eager"][real], outputs["sdpa"][real], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outputs["flex_attention"][real], outputs["sdpa"][real], rtol=1e-4, atol=1e-5)
