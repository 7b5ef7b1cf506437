"""The VDEP probes: their sums add up to the probes of the union (micro-batches, steps, ranks), they match a
direct computation, they show collapse, and a 2-rank ZeRO-3 run logs what one rank logs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import read_metrics
from vdep.data.batch import collate
from vdep.objectives.losses import normalise_rows
from vdep.objectives.probes import probe_scalars, probe_sums


def direct_probes(hidden, embeds, positions, head, target_norm) -> dict[str, float]:
    """The three probes from their definitions: a loop over positions and the full cosine matrix."""
    predictions, targets = [], []
    for row, column in positions.nonzero().tolist():
        predictions.append(head(hidden[row, column - 1]))
        targets.append(embeds[row, column])
    prediction = normalise_rows(torch.stack(predictions), target_norm)
    target = normalise_rows(torch.stack(targets), target_norm)
    unit = F.normalize(target, dim=-1)
    cosines = unit @ unit.T
    count = len(targets)
    return {
        "probe/reconstruction_cosine": float(F.cosine_similarity(prediction, target, dim=-1).mean()),
        "probe/target_pairwise_cosine": float((cosines.sum() - cosines.diagonal().sum()) / (count * (count - 1))),
        "probe/target_variance": float(target.var(dim=0, unbiased=False).mean()),
        "probe/target_relative_variance": float(target.var(dim=0, unbiased=False).sum() / target.pow(2).sum(-1).mean()),
    }


@pytest.mark.parametrize("target_norm", ["none", "layernorm"])
def test_probes_of_split_batches_add_up_to_the_direct_computation(target_norm):
    torch.manual_seed(0)
    hidden, embeds = torch.randn(3, 12, 8), torch.randn(3, 12, 8) + 0.5
    positions = torch.zeros(3, 12, dtype=torch.bool)
    positions[0, 2:7] = positions[1, 1:12] = positions[2, 5:9] = True
    head = nn.Linear(8, 8)
    with torch.no_grad():
        expected = direct_probes(hidden, embeds, positions, head, target_norm)
        whole = probe_sums(hidden, embeds, positions, head, target_norm)
        # one row per "rank" or micro-batch: the sums add up to the whole batch's
        parts = sum(probe_sums(hidden[i : i + 1], embeds[i : i + 1], positions[i : i + 1], head, target_norm)
                    for i in range(3))
    count = int(positions.sum())
    assert probe_scalars(whole, count) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert probe_scalars(parts, count) == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_collapsed_targets_read_as_collapse():
    torch.manual_seed(1)
    positions = torch.zeros(2, 20, dtype=torch.bool)
    positions[:, 1:] = True
    hidden, targets = torch.randn(2, 20, 16), torch.randn(2, 20, 16)
    spread = probe_scalars(probe_sums(hidden, targets, positions, nn.Identity(), "none"), 38)
    same = torch.randn(16).expand(2, 20, 16) + 1e-4 * torch.randn(2, 20, 16)
    collapsed = probe_scalars(probe_sums(hidden, same, positions, nn.Identity(), "none"), 38)
    assert abs(spread["probe/target_pairwise_cosine"]) < 0.1 and spread["probe/target_variance"] > 0.5
    assert collapsed["probe/target_pairwise_cosine"] > 0.9999 and collapsed["probe/target_variance"] < 1e-6
    assert collapsed["probe/target_relative_variance"] < 1e-6 and spread["probe/target_relative_variance"] > 0.5
    grown = probe_scalars(probe_sums(hidden, 10 * targets, positions, nn.Identity(), "none"), 38)
    assert grown["probe/target_variance"] == pytest.approx(100 * spread["probe/target_variance"], rel=1e-4)
    assert grown["probe/target_relative_variance"] == pytest.approx(spread["probe/target_relative_variance"], rel=1e-4)
    predicted = probe_scalars(probe_sums(torch.cat([same[:, 1:], same[:, :1]], 1), same, positions, nn.Identity(),
                                         "none"), 38)
    assert predicted["probe/reconstruction_cosine"] > 0.9999  # h_{t-1} = e_t: a perfect prediction


def test_the_models_forward_returns_the_probes_of_all_image_samples(tiny_model, tokenizer, small_data):
    from vdep.config import VdepConfig
    from vdep.objectives.supervision import prepare_inputs

    model, spec = tiny_model.model, tiny_model.spec
    batch = collate(tiny_samples(tiny_model, tokenizer, small_data), tokenizer.pad_token_id, (32, 32))
    modes = torch.zeros(len(batch.has_image), dtype=torch.bool)  # LLaVA mode: no VDEP target, probes all the same
    inputs = prepare_inputs(batch, modes, VdepConfig(), spec.image_token_id, spec.num_image_tokens)
    with torch.no_grad():
        sums = model(inputs)
        embeds = model.embed(inputs.input_ids, inputs.pixel_values, inputs.num_images)
        hidden = model.hidden_states(embeds, inputs.attention_mask)
    assert int(inputs.image_targets.sum()) == 0 and int(inputs.image_positions.sum()) > 2
    expected = direct_probes(hidden, embeds, inputs.image_positions, model.vdep_head, model.vdep_term.target_norm)
    assert probe_scalars(sums.probes, int(inputs.image_positions.sum())) == pytest.approx(expected, rel=1e-4, abs=1e-6)


def tiny_samples(tiny_model, tokenizer, small_data):
    from tests.helpers import samples

    return samples(tiny_model, tokenizer, small_data, "plain", 3)


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_two_zero3_ranks_log_the_probes_one_rank_logs(small_data, tmp_path):
    """Same global batches on 1 rank and on 2 ZeRO-3 ranks (with a linear VDEP head, a module the probes call
    again): the probes are reduced across ranks, so both runs log the same values, in metrics.jsonl and
    TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vdep.train.launch import launch_local

    common = ["stage=align", "stages.align.max_steps=2", "stages.align.global_batch_size=8", "run.log_every=1",
              "data.split=samples", "data.shuffle_buffer=0", "vdep.mode_ratio=1.0", "vdep.text_loss_in_vdep_mode=true",
              "stages.align.vdep.head=linear"]
    logged = {}
    for nproc, zero, micro in ((1, "zero2", 8), (2, "zero3", 4)):
        run_dir = tmp_path / f"run{nproc}"
        code = launch_local(nproc, ["train", "demo-tiny", *small_data.overrides(run_dir), *common,
                                    f"stages.align.zero={zero}", f"stages.align.micro_batch_size={micro}"])
        assert code == 0
        logged[nproc] = [{k: v for k, v in m.items() if k.startswith("probe/")} for m in read_metrics(run_dir, "align")]
    assert len(logged[1]) == 2 and all(len(step) == 4 for step in logged[1])
    for one, two in zip(logged[1], logged[2]):
        assert two == pytest.approx(one, rel=1e-3, abs=1e-5)
    events = EventAccumulator(str(tmp_path / "run2" / "tensorboard" / "align"))
    events.Reload()
    assert {"probe/reconstruction_cosine", "probe/target_pairwise_cosine", "probe/target_variance",
            "probe/target_relative_variance"} <= set(events.Tags()["scalars"])


def test_the_probes_of_tiled_images_are_taken_at_every_image_token_but_the_newlines(anyres_model, tokenizer,
                                                                                      anyres_shards):
    from tests.helpers import anyres_samples
    from vdep.config import VdepConfig
    from vdep.objectives.supervision import image_newline_positions, prepare_inputs

    model, spec = anyres_model.model, anyres_model.spec
    batch = collate(anyres_samples(anyres_model, tokenizer, anyres_shards, ["three", "video", "one"]),
                    tokenizer.pad_token_id, (64, 64))
    inputs = prepare_inputs(batch, torch.zeros(3, dtype=torch.bool), VdepConfig(), spec.image_token_id,
                            spec.num_image_tokens)
    with torch.no_grad():
        sums = model(inputs)
        embeds = model.embed(inputs.input_ids, inputs.pixel_values, inputs.num_images, None, inputs.image_layout)
        hidden = model.hidden_states(embeds, inputs.attention_mask)
    newline = image_newline_positions(inputs.input_ids, spec.image_token_id, inputs.image_layout)
    expected_positions = (inputs.input_ids == spec.image_token_id) & ~newline
    assert bool(newline.any()) and torch.equal(inputs.image_positions, expected_positions)
    expected = direct_probes(hidden, embeds, expected_positions, model.vdep_head, model.vdep_term.target_norm)
    assert probe_scalars(sums.probes, int(expected_positions.sum())) == pytest.approx(expected, rel=1e-4, abs=1e-6)
