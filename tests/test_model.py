"""The multimodal model: projector scatter, the dummy-image path, names, accumulation, generation."""

from __future__ import annotations

import torch

from tests.helpers import TinyModel, build_tiny_model, samples
from vdep.config import VdepConfig
from vdep.data.batch import collate
from vdep.data.images import normalise_pixels
from vdep.model.generate import greedy_generate
from vdep.model.vision import image_features, num_image_tokens
from vdep.objectives.losses import GlobalCounts, batch_loss
from vdep.objectives.supervision import prepare_inputs
from vdep.train.freezing import apply_trainable


def test_uint8_pixels_are_normalised_in_the_model_exactly_as_float_pixels(tiny_model, tokenizer, small_data):
    built, processing = tiny_model, tiny_model.processing
    table = processing.normalisation_table()
    as_uint8 = collate(samples(tiny_model, tokenizer, small_data, "plain", 3, uint8=True), tokenizer.pad_token_id, (32, 32), table)
    as_float = collate(samples(tiny_model, tokenizer, small_data, "plain", 3), tokenizer.pad_token_id, (32, 32))
    assert as_uint8.pixel_values.dtype == torch.uint8 and as_float.pixel_values.dtype == torch.float32
    assert torch.equal(normalise_pixels(as_uint8.pixel_values, table), as_float.pixel_values)
    modes = torch.tensor([True, False, True])
    results = []
    for batch in (as_uint8, as_float):
        inputs = prepare_inputs(batch, modes, VdepConfig(), built.spec.image_token_id, built.spec.num_image_tokens)
        with torch.no_grad():
            results.append(built.model(inputs))
    assert torch.equal(results[0].text, results[1].text) and torch.equal(results[0].vdep, results[1].vdep)


def test_parameter_names_mirror_the_llava_layout(tiny_model):
    built = tiny_model
    names = [name for name, _ in built.model.named_parameters()]
    prefixes = {name.split(".")[0] for name in names}
    assert prefixes == {"vision_tower", "multi_modal_projector", "language_model", "lm_head"}
    assert "multi_modal_projector.linear_1.weight" in names and "multi_modal_projector.linear_2.weight" in names
    # transformers' own CLIPVisionModel naming (in memory, 5.x: no `vision_model.` level)
    assert any(name.startswith("vision_tower.encoder.layers.0.") for name in names)
    assert "language_model.embed_tokens.weight" in names and "lm_head.weight" in names
    assert built.model.language_model.get_input_embeddings().weight.shape[0] % 64 == 0  # padded vocabulary


def test_image_token_counts_follow_the_feature_selection(tiny_model):
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    clip = CLIPVisionConfig(image_size=336, patch_size=14)
    assert num_image_tokens(clip, "clip", "default") == 576  # LLaVA-1.5: CLS dropped
    assert num_image_tokens(clip, "clip", "full") == 577
    assert num_image_tokens(SiglipVisionConfig(image_size=384, patch_size=14), "siglip", "full") == 729
    assert tiny_model.spec.num_image_tokens == 16


def test_projector_outputs_fill_the_placeholders_in_order(tiny_model, tokenizer, small_data):
    built = tiny_model
    model, spec = built.model, built.spec
    batch = collate(samples(tiny_model, tokenizer, small_data, "plain", 3), tokenizer.pad_token_id, (32, 32))
    with torch.no_grad():
        embeds = model.embed(batch.input_ids, batch.pixel_values, batch.num_images)
        features = image_features(model.vision_tower, batch.pixel_values, spec.feature_layer, spec.feature_select)
        projected = model.multi_modal_projector(features)
        tokens = model.language_model.get_input_embeddings()(batch.input_ids)
    placeholders = batch.input_ids == spec.image_token_id
    assert torch.equal(embeds[placeholders], projected.reshape(-1, projected.shape[-1]))
    assert torch.equal(embeds[~placeholders], tokens[~placeholders])


def test_a_batch_without_images_still_runs_the_vision_path(tiny_model, tokenizer, small_data):
    built = tiny_model
    model = built.model
    text_only = [s for s in samples(tiny_model, tokenizer, small_data, "vicuna_v1", 64) if s.pixel_values is None][:2]
    batch = collate(text_only, tokenizer.pad_token_id, (32, 32))
    assert batch.num_images == 0 and batch.pixel_values.shape[0] == 1  # one dummy image
    apply_trainable(model, ["projector", "language_model"])
    model.zero_grad(set_to_none=True)
    inputs = prepare_inputs(batch, torch.zeros(2, dtype=torch.bool), VdepConfig(), built.spec.image_token_id, built.spec.num_image_tokens)
    sums = model(inputs)
    batch_loss(sums, GlobalCounts(inputs.num_text_targets, 0), 1.0).backward()
    for name, param in model.multi_modal_projector.named_parameters():
        assert param.grad is not None, name  # in the graph, as ZeRO-3 needs
        assert param.grad.abs().sum() == 0, name  # but with no effect
    assert model.lm_head.weight.grad.abs().sum() > 0


def test_accumulating_micro_batches_equals_one_batch(tiny_model, tokenizer, small_data):
    """Two micro-batches normalised by the batch's counts give the gradient of the whole batch."""
    built = tiny_model
    model, spec = built.model, built.spec
    apply_trainable(model, ["projector", "language_model"])
    data = samples(tiny_model, tokenizer, small_data, "vicuna_v1", 4)
    modes = torch.tensor([True, False, True, False]) & torch.tensor([s.pixel_values is not None for s in data])
    config = VdepConfig()

    def inputs_of(part, part_modes):
        return prepare_inputs(collate(part, tokenizer.pad_token_id, (32, 32)), part_modes, config, spec.image_token_id, spec.num_image_tokens)

    whole = inputs_of(data, modes)
    model.zero_grad(set_to_none=True)
    batch_loss(model(whole), GlobalCounts(whole.num_text_targets, whole.num_image_targets), 0.7).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    halves = [inputs_of(data[:2], modes[:2]), inputs_of(data[2:], modes[2:])]
    counts = GlobalCounts(sum(h.num_text_targets for h in halves), sum(h.num_image_targets for h in halves))
    assert counts == GlobalCounts(whole.num_text_targets, whole.num_image_targets)
    model.zero_grad(set_to_none=True)
    for half in halves:
        batch_loss(model(half), counts, 0.7).backward()
    for name, grad in expected.items():
        assert torch.allclose(model.get_parameter(name).grad, grad, atol=1e-6, rtol=1e-4), name


def test_greedy_generation_with_the_cache_matches_recomputing(tiny_model, tokenizer, small_data):
    built = tiny_model
    model = built.model.eval()
    data = samples(tiny_model, tokenizer, small_data, "plain", 3)
    prompts = [s.input_ids[: 1 + built.spec.num_image_tokens + i].tolist() for i, s in enumerate(data)]  # ragged
    pixel_values = torch.cat([s.pixel_values for s in data])  # each sample: (views, 3, H, W)
    eos = tokenizer.eos_token_id
    cached = greedy_generate(model, prompts, pixel_values, 3, 6, stop_token_ids=[eos], pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            ids = list(prompt)
            for _ in range(len(cached[row]) + (1 if len(cached[row]) < 6 else 0)):
                input_ids = torch.tensor([ids])
                embeds = model.embed(input_ids, pixel_values[row : row + 1], 1)
                hidden = model.hidden_states(embeds, torch.ones_like(input_ids))
                ids.append(int(model.lm_head(hidden[0, -1]).argmax()))
            produced = ids[len(prompt):]
            if eos in produced:
                produced = produced[: produced.index(eos)]
            assert produced[:6] == cached[row], row
    # A second stop token (a chat format's end of turn) ends each row at its first occurrence.
    end_of_turn = next(token for row in cached for token in row[1:])
    stopped = greedy_generate(model, prompts, pixel_values, 3, 6, stop_token_ids=[eos, end_of_turn],
                              pad_token_id=tokenizer.pad_token_id)
    assert stopped == [row[: row.index(end_of_turn)] if end_of_turn in row else row for row in cached]
    assert any(len(a) < len(b) for a, b in zip(stopped, cached))
    model.train()


def build_tiny(tokenizer, tmp_path, small_data, *overrides: str) -> TinyModel:
    from vdep.config import load_config

    config = load_config("demo-tiny", small_data.overrides(tmp_path / "run") + list(overrides))
    return build_tiny_model(config, tokenizer, tmp_path / "run", config.vdep)


def test_siglip_towers_and_qwen2_or_mistral_llms_take_the_same_path(tokenizer, small_data, tmp_path):
    for index, (tower, llm) in enumerate((("siglip", "qwen2"), ("clip", "mistral"))):
        built = build_tiny(tokenizer, tmp_path / str(index), small_data,
                           f"model.vision_tower.tiny.architecture={tower}", f"model.language_model.tiny.architecture={llm}")
        assert built.spec.family == tower
        assert built.spec.feature_select == ("full" if tower == "siglip" else "default")
        assert built.spec.num_image_tokens == 16  # 32 px / 8 px patches; SigLIP has no CLS token to drop
        assert type(built.model.language_model).__name__.lower().startswith(llm)
        ids = torch.tensor([[tokenizer.bos_token_id] + [built.spec.image_token_id] * 16 + [5, 6, 7]])
        labels = torch.full_like(ids, -100)
        labels[0, -3:] = ids[0, -3:]
        from vdep.data.batch import Batch

        batch = Batch(ids, labels, torch.ones_like(ids), torch.zeros(1, 3, 32, 32), torch.tensor([True]), ["x"], torch.zeros_like(ids))
        inputs = prepare_inputs(batch, torch.tensor([False]), VdepConfig(), built.spec.image_token_id, 16)
        sums = built.model(inputs)
        assert torch.isfinite(sums.text) and sums.text > 0


def test_gradient_checkpointing_changes_memory_not_results(tokenizer, small_data, tmp_path):
    grads = []
    for index, checkpointing in enumerate((False, True)):
        built = build_tiny(tokenizer, tmp_path / str(index), small_data, f"model.gradient_checkpointing={str(checkpointing).lower()}")
        model = built.model
        assert model.language_model.is_gradient_checkpointing == checkpointing
        apply_trainable(model, ["projector", "language_model"])
        model.train()
        ids = torch.tensor([[tokenizer.bos_token_id] + [built.spec.image_token_id] * 16 + [5, 6, 7, 8]])
        labels = torch.full_like(ids, -100)
        labels[0, -4:] = ids[0, -4:]
        from vdep.data.batch import Batch

        pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        batch = Batch(ids, labels, torch.ones_like(ids), pixels, torch.tensor([True]), ["x"], torch.zeros_like(ids))
        inputs = prepare_inputs(batch, torch.tensor([True]), VdepConfig(text_loss_in_vdep_mode=True), built.spec.image_token_id, 16)
        sums = model(inputs)
        batch_loss(sums, GlobalCounts(inputs.num_text_targets, inputs.num_image_targets), 1.0).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5), name


def test_a_vdep_head_from_an_earlier_stage_loads_only_where_the_model_has_one(tokenizer, small_data, tmp_path):
    import dataclasses

    import pytest

    from vdep.config import load_config
    from vdep.errors import CheckpointError
    from vdep.model.loading import load_layer
    from vdep.weight_layers import TensorsLayer

    config = load_config("demo-tiny", small_data.overrides(tmp_path))

    def model_with_head(head: str):
        return build_tiny_model(config, tokenizer, tmp_path, dataclasses.replace(config.vdep, head=head)).model

    without_head, with_head = model_with_head("identity"), model_with_head("linear")
    projector = without_head.multi_modal_projector.linear_1.weight
    trained = {name: torch.randn_like(value) for name, value in with_head.named_parameters() if "linear_1" in name or "vdep_head" in name}
    assert "vdep_head.weight" in trained and "vdep_head.bias" in trained
    # No head here: the head stays behind, reported; everything else loads.
    assert load_layer(without_head, TensorsLayer(trained, "align/final")) == ["vdep_head.bias", "vdep_head.weight"]
    assert torch.equal(projector, trained["multi_modal_projector.linear_1.weight"])
    # The same head kind: it continues from the trained values.
    assert load_layer(with_head, TensorsLayer(trained, "align/final")) == []
    assert torch.equal(with_head.vdep_head.weight, trained["vdep_head.weight"])
    # Any other unknown name is still an error.
    with pytest.raises(CheckpointError, match="does not have.*language_model.extra"):
        load_layer(without_head, TensorsLayer({"language_model.extra.weight": torch.zeros(1)}, "bad.safetensors"))
