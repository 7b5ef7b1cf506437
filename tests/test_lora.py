"""LoRA on the LLM (peft): names, what trains, the image term's gradient, checkpointing, merging, refusals."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.helpers import build_tiny_model, samples
from vdep.config import LoraConfig, VdepConfig, load_config
from vdep.data.batch import Batch, collate
from vdep.errors import CheckpointError, ConfigError
from vdep.model.loading import load_layer
from vdep.model.lora import ADAPTER, adapter_layers, add_adapters, check_quantization, merged_parameters
from vdep.objectives.losses import GlobalCounts, batch_loss
from vdep.objectives.supervision import prepare_inputs
from vdep.train.freezing import apply_trainable, format_table, param_groups, trainable_table
from vdep.weight_layers import TensorsLayer

LORA = LoraConfig(r=4, alpha=8.0)
LLM_LINEARS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def lora_model(config, tokenizer, run_dir, settings: LoraConfig = LORA, trainable=("projector", "language_model"),
               vdep: VdepConfig | None = None):
    built = build_tiny_model(config, tokenizer, run_dir, vdep or config.vdep)
    add_adapters(built.model, settings, seed=0, where="stages.finetune.lora")
    apply_trainable(built.model, list(trainable), settings)
    return built


def randomise_adapters(model, seed: int = 1) -> None:
    """B starts at zero (the adapters add nothing and A gets no gradient): as after some training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def image_batch(tokenizer, built) -> Batch:
    ids = torch.tensor([[tokenizer.bos_token_id] + [built.spec.image_token_id] * 16 + [5, 6, 7, 8]])
    labels = torch.full_like(ids, -100)
    labels[0, -4:] = ids[0, -4:]
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return Batch(ids, labels, torch.ones_like(ids), pixels, torch.tensor([True]), ["x"], torch.zeros_like(ids))


def test_adapters_have_the_same_names_and_starting_values_in_every_build(tiny_run, tokenizer):
    config, run_dir = tiny_run
    first, second = (lora_model(config, tokenizer, run_dir).model for _ in range(2))
    names = [n for n, _ in first.named_parameters()]
    assert names == [n for n, _ in second.named_parameters()]
    assert "language_model.layers.0.self_attn.q_proj.base_layer.weight" in names
    assert f"language_model.layers.1.mlp.down_proj.lora_A.{ADAPTER}.weight" in names
    # Every Linear of the LLM (LLaVA's target modules), none outside it: not the LM head, projector or tower.
    adapted = sorted(adapter_layers(first))
    assert adapted == sorted(f"language_model.layers.{i}.{part}.{leaf}" for i in range(2)
                             for part, leaves in (("self_attn", ["q_proj", "k_proj", "v_proj", "o_proj"]),
                                                  ("mlp", ["gate_proj", "up_proj", "down_proj"])) for leaf in leaves)
    # A is drawn from the seed: equal in every build (every rank, every run); B starts at zero.
    for (name, a), (_, b) in zip(first.named_parameters(), second.named_parameters()):
        assert torch.equal(a, b), name
    assert all(float(p.detach().abs().sum()) == 0 for n, p in first.named_parameters() if ".lora_B." in n)
    assert all(float(p.detach().abs().sum()) > 0 for n, p in first.named_parameters() if ".lora_A." in n)


def test_only_the_adapters_and_the_projector_train_and_the_table_shows_them(tiny_run, tokenizer):
    config, run_dir = tiny_run
    model = lora_model(config, tokenizer, run_dir).model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".lora_" in n or n.startswith("multi_modal_projector.")}
    rows = {row.module: row for row in trainable_table(model)}
    adapters = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    # 2 layers × r 4 × (4·(64+64) attention with 2 KV heads of 16: k,v are 64→32; MLP 3·(64+128))
    assert rows["language_model LoRA adapters"].trainable == adapters == 2 * 4 * (2 * 128 + 2 * 96 + 3 * 192)
    assert rows["language_model"].trainable == 0 and rows["language_model"].frozen > 0
    assert rows["lm_head"].trainable == 0 and rows["vision_tower"].trainable == 0
    assert "language_model LoRA adapters" in format_table(list(rows.values()))
    # LLaVA's LoRA recipe: the adapters at lr, the projector at projector_lr.
    groups = {group["name"]: group for group in param_groups(model, 2e-4, 2e-5, 0.0)}
    assert (groups["language_model"]["lr"], groups["projector"]["lr"]) == (2e-4, 2e-5)
    assert {id(p) for p in groups["language_model"]["params"]} == {id(p) for n, p in model.named_parameters() if ".lora_" in n}
    # modules_to_save trains whole modules beside the adapters, under their usual names.
    saved = lora_model(config, tokenizer, run_dir, dataclasses.replace(LORA, modules_to_save=["lm_head", "norm"])).model
    extra = {n for n, p in saved.named_parameters() if p.requires_grad} - trainable
    assert extra == {"lm_head.weight", "language_model.norm.weight"}


def test_the_image_term_alone_trains_the_adapters_as_it_trains_full_weights(tiny_run, tokenizer):
    """With no text loss, the VDEP term's gradient reaches every lora_A and lora_B, and equals what the
    chain rule gives from the gradient of the merged full weight: dB = s·G·Aᵀ, dA = s·Bᵀ·G."""
    config, run_dir = tiny_run
    built = lora_model(config, tokenizer, run_dir)
    model = built.model
    randomise_adapters(model)
    full = build_tiny_model(config, tokenizer, run_dir, config.vdep)
    merged = dict(merged_parameters(model, torch.float32))
    load_layer(full.model, TensorsLayer({n: t.detach().clone() for n, t in merged.items() if not n.startswith("vdep_head.")},
                                        "merged"))
    apply_trainable(full.model, ["projector", "language_model"])
    inputs = prepare_inputs(image_batch(tokenizer, built), torch.tensor([True]), VdepConfig(text_loss_in_vdep_mode=False),
                            built.spec.image_token_id, 16)
    assert inputs.num_text_targets == 0 and inputs.num_image_targets > 0
    for network in (model, full.model):
        network.train()
        sums = network(inputs)
        assert float(sums.text.detach()) == 0.0
        sums.vdep.backward()
    scaling = LORA.alpha / LORA.r
    for module_name, layer in adapter_layers(model).items():
        a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        assert float(a.grad.abs().sum()) > 0 and float(b.grad.abs().sum()) > 0, module_name
        full_grad = full.model.get_parameter(module_name + ".weight").grad
        assert torch.allclose(b.grad, scaling * full_grad @ a.detach().T, atol=1e-6, rtol=1e-4), module_name
        assert torch.allclose(a.grad, scaling * b.detach().T @ full_grad, atol=1e-6, rtol=1e-4), module_name


def test_gradient_checkpointing_gives_the_adapters_the_same_gradients(small_data, tokenizer, tmp_path):
    """Projector frozen too, so nothing before the LLM needs a gradient: the input-grad hook is what
    keeps checkpointed blocks in the graph (reentrant checkpointing would drop them without it)."""
    grads = []
    for checkpointing in (False, True):
        run_dir = tmp_path / f"checkpointing-{checkpointing}"
        config = load_config("demo-tiny", small_data.overrides(run_dir) + [f"model.gradient_checkpointing={str(checkpointing).lower()}"])
        built = lora_model(config, tokenizer, run_dir, trainable=("language_model",))
        model = built.model
        assert model.language_model.is_gradient_checkpointing == checkpointing
        randomise_adapters(model)
        model.train()
        if checkpointing:
            embeddings = model.language_model.get_input_embeddings()(torch.tensor([[1, 2]]))
            assert embeddings.requires_grad  # the hook, though the embeddings are frozen
        inputs = prepare_inputs(image_batch(tokenizer, built), torch.tensor([True]), VdepConfig(text_loss_in_vdep_mode=True),
                                built.spec.image_token_id, 16)
        batch_loss(model(inputs), GlobalCounts(inputs.num_text_targets, inputs.num_image_targets), 1.0).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert sorted(grads[0]) == sorted(grads[1]) and len(grads[0]) == 2 * 2 * 7  # every lora_A and lora_B
    for name in grads[0]:
        assert float(grads[1][name].abs().sum()) > 0, name
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5), name


def test_the_merged_weights_compute_what_the_adapters_compute(tiny_run, tokenizer, small_data):
    config, run_dir = tiny_run
    built = lora_model(config, tokenizer, run_dir)
    randomise_adapters(built.model)
    merged = dict(merged_parameters(built.model, torch.float32))
    assert not any(".lora_" in n or ".base_layer." in n for n in merged)
    plain = build_tiny_model(config, tokenizer, run_dir, config.vdep)
    assert sorted(merged) == sorted(n for n, _ in plain.model.named_parameters())
    load_layer(plain.model, TensorsLayer({n: t.detach().clone() for n, t in merged.items()}, "merged"))
    batch = collate(samples(built, tokenizer, small_data, "vicuna_v1", 3), tokenizer.pad_token_id, (32, 32))
    inputs = prepare_inputs(batch, torch.tensor([True, False, False]), VdepConfig(), built.spec.image_token_id, 16)
    untrained = build_tiny_model(config, tokenizer, run_dir).model
    with torch.no_grad():
        ours, theirs, before = (network.eval()(inputs) for network in (built.model, plain.model, untrained))
    assert abs(float(ours.text) - float(theirs.text)) < 1e-4 and abs(float(ours.vdep) - float(theirs.vdep)) < 1e-4
    assert float(ours.text) != pytest.approx(float(before.text))  # the adapters changed the model


def test_lora_settings_are_checked_with_the_key_named(small_data, tmp_path, tiny_run, tokenizer):
    base = small_data.overrides(tmp_path) + ["stage=finetune", "stages.finetune.init_from=none"]
    with pytest.raises(ConfigError, match=r"stages.finetune.lora' .*add language_model"):
        load_config("demo-tiny", base + ["stages.finetune.lora={r: 8, alpha: 16}", "stages.finetune.trainable=[projector]"])
    with pytest.raises(ConfigError, match=r"stages.finetune.lora.r' .*at least 1"):
        load_config("demo-tiny", base + ["stages.finetune.lora={r: 0, alpha: 16}"])
    with pytest.raises(ConfigError, match=r"stages.finetune.lora.dropout'"):
        load_config("demo-tiny", base + ["stages.finetune.lora={r: 8, alpha: 16, dropout: 1.5}"])
    with pytest.raises(ConfigError, match=r"stages.finetune.lora.alpha"):  # a required key, named
        load_config("demo-tiny", base + ["stages.finetune.lora={r: 8}"])
    with pytest.raises(ConfigError, match=r"stages.finetune.lora.quantize"):
        load_config("demo-tiny", base + ["stages.finetune.lora={r: 8, alpha: 16, quantize: int3}"])
    # A later stage cannot start from a LoRA stage's result in the same run: refused before training.
    with pytest.raises(ConfigError, match=r"stages.finetune.init_from.*holds LoRA adapters.*model.init_from=EXPORT"):
        load_config("demo-tiny", small_data.overrides(tmp_path) + ["stages.align.lora={r: 8, alpha: 16}"])
    config, run_dir = tiny_run
    with pytest.raises(ConfigError, match=r"stages.finetune.lora.target_modules.*\['qkv'\].*'q_proj'"):
        lora_model(config, tokenizer, run_dir, dataclasses.replace(LORA, target_modules=["qkv", "q_proj"]))
    with pytest.raises(ConfigError, match=r"stages.finetune.lora.modules_to_save.*'embed'"):
        lora_model(config, tokenizer, run_dir, dataclasses.replace(LORA, modules_to_save=["embed"]))
    with pytest.raises(ConfigError, match=r"modules_to_save': language_model.layers.1.mlp holds layers that get adapters"):
        lora_model(config, tokenizer, run_dir, dataclasses.replace(LORA, modules_to_save=["layers.1.mlp"]))
    lora_model(config, tokenizer, run_dir, dataclasses.replace(LORA, modules_to_save=["layers.1.mlp"], target_modules=["q_proj"]))


def test_a_lora_stage_result_is_refused_as_starting_weights(tiny_run, tokenizer):
    config, run_dir = tiny_run
    adapters = {n: p.detach() for n, p in lora_model(config, tokenizer, run_dir).model.named_parameters() if p.requires_grad}
    plain = build_tiny_model(config, tokenizer, run_dir).model
    with pytest.raises(CheckpointError, match=r"finetune/final holds LoRA adapters .*vdep export-hf.*model.init_from"):
        load_layer(plain, TensorsLayer(adapters, "finetune/final"))


def test_a_weight_a_qlora_stage_holds_in_4_bits_is_refused_by_the_loader(tiny_run, tokenizer):
    """The one loader (training's starting weights, evaluation, export) refuses to copy a trained value into
    a 4-bit weight, saying how to get there instead."""
    pytest.importorskip("bitsandbytes")
    from vdep.model.attention import AttentionChoice
    from vdep.model.build import build_model, model_spec
    from vdep.rundir import RunDir

    config, run_dir = tiny_run
    base = RunDir(run_dir).base_paths(config.model)
    spec = model_spec(config.model, base, tokenizer)
    model = build_model(config.model, spec, tokenizer, base, AttentionChoice("sdpa", "test"), torch.float32,
                        lora=dataclasses.replace(LORA, quantize="nf4"))
    name = "language_model.layers.0.self_attn.q_proj.weight"
    assert getattr(model.get_parameter(name), "quant_state", None) is not None
    trained = build_tiny_model(config, tokenizer, run_dir).model.get_parameter(name).detach()
    with pytest.raises(CheckpointError, match=r"align/final holds '.*q_proj.weight', a weight this QLoRA stage loads in 4 bits"
                                              r".*model.init_from=EXPORT"):
        load_layer(model, TensorsLayer({name: trained}, "align/final"))


def test_only_the_listed_modules_get_adapters(tiny_run, tokenizer):
    config, run_dir = tiny_run
    model = lora_model(config, tokenizer, run_dir, dataclasses.replace(LORA, target_modules=["v_proj", "q_proj"])).model
    assert sorted(adapter_layers(model)) == [f"language_model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]


def test_qlora_is_refused_under_zero3_saying_why():
    settings = dataclasses.replace(LORA, quantize="nf4")
    with pytest.raises(ConfigError, match=r"stages.finetune.lora.quantize=nf4' needs ZeRO-2.*quantisation state.*zero2"):
        check_quantization(settings, 3, torch.device("cpu"), "stages.finetune.lora")
    check_quantization(LORA, 3, torch.device("cpu"), "stages.finetune.lora")  # LoRA on a full-precision LLM: fine
    pytest.importorskip("bitsandbytes")
    check_quantization(settings, 2, torch.device("cpu"), "stages.finetune.lora")  # bitsandbytes quantises on this CPU


def test_the_lora_recipe_states_llavas_finetune_lora_numbers(tmp_path):
    for name in ("clip", "vicuna"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text('{"model_type": "llama"}')
    for name in ("align", "finetune"):
        (tmp_path / name).mkdir()
    config = load_config("llava15-7b-vdep-lora", [
        f"model.vision_tower.path={tmp_path / 'clip'}", f"model.language_model.path={tmp_path / 'vicuna'}",
        f"stages.align.shards=[{tmp_path / 'align'}]", f"stages.finetune.shards=[{tmp_path / 'finetune'}]",
    ])
    finetune = config.stages["finetune"]
    assert finetune.lora == LoraConfig(r=128, alpha=256.0, dropout=0.05, target_modules=None, modules_to_save=[])
    assert (finetune.lr, finetune.projector_lr, finetune.global_batch_size, finetune.zero) == (2e-4, 2e-5, 128, "zero3")
    assert finetune.trainable == ["projector", "language_model"] and config.model.gradient_checkpointing
    assert config.stages["align"].lora is None and config.stages["align"].lr == 1e-3


def test_lora_without_peft_installed_says_what_to_install(monkeypatch, tiny_run, tokenizer):
    import sys

    config, run_dir = tiny_run
    model = build_tiny_model(config, tokenizer, run_dir).model
    monkeypatch.setitem(sys.modules, "peft", None)  # what an environment without peft gives `import peft`
    with pytest.raises(ConfigError, match=r"'stages.finetune.lora' is set, but peft is not installed: pip install 'vdep\[lora\]'"):
        add_adapters(model, LORA, seed=0, where="stages.finetune.lora")
