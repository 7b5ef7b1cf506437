"""AnyRes, OneVision multi-image and video: views and token counts against transformers' own processors and models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

from vdep.data.anyres import SINGLE, TILED, ImageGeometry, MediaProcessor, Video
from vdep.data.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageProcessing, normalise_pixels

PINS = [[64, 64], [64, 128], [128, 64], [128, 128]]  # /work/shared/ANYRES.md's tiny setting
CLIP = ImageProcessing(64, None, (64, 64), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, pad_to_square=False)
SIGLIP = ImageProcessing(None, (64, 64), None, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), pad_to_square=False)
SIZES = [(256, 256), (100, 230), (230, 100), (64, 64), (37, 300), (129, 65)]  # (height, width)


def geometry(aspect: str = "anyres", merge: str = "spatial_unpad") -> ImageGeometry:
    return ImageGeometry(aspect, 64, 8, 64, tuple(tuple(p) for p in PINS), merge)


def picture(height: int, width: int, seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype(np.uint8))


def hf_settings(processing: ImageProcessing) -> dict:
    if processing.shortest_edge is not None:
        return {"size": {"shortest_edge": 64}, "crop_size": {"height": 64, "width": 64}, "do_center_crop": True}
    return {"size": {"height": 64, "width": 64}, "do_center_crop": False, "crop_size": {"height": 64, "width": 64}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}


@pytest.mark.parametrize("processing", [CLIP, SIGLIP], ids=["clip", "siglip"])
@pytest.mark.parametrize("aspect", ["anyres", "anyres_max_1"])
def test_tiles_equal_the_hf_processors_pixels_bit_for_bit(processing, aspect):
    hf_class = LlavaOnevisionImageProcessorPil if aspect.startswith("anyres_max") else LlavaNextImageProcessorPil
    hf = hf_class(image_grid_pinpoints=PINS, **hf_settings(processing))
    ours = MediaProcessor(geometry(aspect), processing)
    table = processing.normalisation_table()
    for height, width in SIZES:
        image = picture(height, width)
        theirs = hf(images=image, return_tensors="pt")["pixel_values"][0]
        views = ours([image])
        assert views.pixels.dtype == torch.uint8 and views.images[0].kind == TILED
        assert torch.equal(normalise_pixels(views.pixels, table), theirs), (height, width)


def test_a_multi_image_sample_under_onevision_is_one_padded_view_per_image_as_hf_has_it():
    hf = LlavaOnevisionImageProcessorPil(image_grid_pinpoints=PINS, **hf_settings(CLIP))
    images = [picture(100, 230, 1), picture(230, 100, 2), picture(50, 50, 3)]
    theirs = hf(images=[images], return_tensors="pt")["pixel_values"]  # one sample of three images: (3, 1, 3, H, W)
    views = MediaProcessor(geometry("anyres_max_9"), CLIP)(images)
    assert torch.equal(normalise_pixels(views.pixels, CLIP.normalisation_table()), theirs[:, 0])
    assert [(i.kind, i.views, i.tokens) for i in views.images] == [(SINGLE, 1, 65)] * 3  # 64 + its newline
    # LLaVA-NeXT tiles every image of a sample.
    assert [i.kind for i in MediaProcessor(geometry("anyres"), CLIP)(images).images] == [TILED] * 3


def test_token_counts_are_the_hf_processors_and_a_256px_image_is_336_tokens(tokenizer):
    from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

    assert geometry().tiled(256, 256).tokens == 336  # ../shared/ANYRES.md: 64 base + 4×64 tiles + 16 newlines
    processor = LlavaNextProcessor(LlavaNextImageProcessorPil(image_grid_pinpoints=PINS, **hf_settings(CLIP)), tokenizer,
                                   patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    counts = processor._get_num_multimodal_tokens(image_sizes=SIZES)["num_image_tokens"]
    assert [geometry().tiled(h, w).tokens for h, w in SIZES] == counts


def test_the_hf_model_packs_exactly_the_tokens_counted_with_a_newline_where_the_mask_says():
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=64, patch_size=8)
    text = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, vocab_size=500)
    model = LlavaNextForConditionalGeneration(LlavaNextConfig(
        vision_config=vision, text_config=text, image_grid_pinpoints=PINS, vision_feature_select_strategy="default",
        vision_feature_layer=-2)).eval()
    hf = LlavaNextImageProcessorPil(image_grid_pinpoints=PINS, **hf_settings(CLIP))
    newline = model.model.image_newline
    for height, width in SIZES:
        inputs = hf(images=picture(height, width), return_tensors="pt")
        with torch.no_grad():
            (features,) = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                                         vision_feature_layer=-2,
                                                         vision_feature_select_strategy="default").pooler_output
        layout = geometry().tiled(height, width)
        assert features.shape[0] == layout.tokens
        is_newline = (features == newline).all(dim=-1)
        assert torch.equal(is_newline, layout.newline_mask()), (height, width)


def test_a_video_is_its_frames_pooled_with_one_newline():
    frames = Video(tuple(picture(90, 120, seed) for seed in range(3)))
    views = MediaProcessor(geometry("anyres_max_9"), CLIP)([frames])
    assert views.pixels.shape == (3, 3, 64, 64)
    (layout,) = views.images
    assert (layout.tokens, int(layout.newline_mask().sum()), bool(layout.newline_mask()[-1])) == (3 * 16 + 1, 1, True)
    flat = MediaProcessor(geometry("anyres", "flat"), CLIP)([frames]).images[0]
    assert (flat.tokens, int(flat.newline_mask().sum())) == (3 * 16, 0)


# ------------------------------------------------------------------------------------------------ the model
def copy_into_hf(model, hf_model) -> None:
    """vdep's tower, projector and image_newline into a transformers LlavaNext/Onevision model (same names)."""
    inner = hf_model.model
    inner.vision_tower.load_state_dict(model.vision_tower.state_dict())
    inner.multi_modal_projector.load_state_dict(model.multi_modal_projector.state_dict())
    with torch.no_grad():
        inner.image_newline.copy_(model.image_newline)


def hf_llava(model, kind: str, aspect: str):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    geometry = model.spec.geometry
    common = {"vision_config": model.vision_tower.config.to_dict(), "text_config": LlamaConfig(hidden_size=64),
              "image_grid_pinpoints": geometry.pinpoints, "vision_feature_layer": -2,
              "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu"}
    if kind == "onevision":
        hf_model = LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(vision_aspect_ratio=aspect, **common))
    else:
        hf_model = LlavaNextForConditionalGeneration(LlavaNextConfig(**common))
    copy_into_hf(model, hf_model)
    return hf_model.eval()


def view_embeds(model, pixels: torch.Tensor) -> torch.Tensor:
    from vdep.model.vision import image_features

    spec = model.spec
    return model.multi_modal_projector(image_features(model.vision_tower, pixels, spec.feature_layer, spec.feature_select))


@pytest.mark.parametrize("aspect", ["anyres", "anyres_max_1"])
def test_tiled_images_pack_as_transformers_llava_next_and_onevision_pack_them(anyres_model, tokenizer, anyres_shards, aspect):
    """vdep's model puts at an image's placeholders exactly what transformers' get_image_features gives."""
    from dataclasses import replace

    from tests.helpers import anyres_samples
    from vdep.model.image_tokens import pack_image_tokens

    model = anyres_model.model.eval()
    model.spec = replace(model.spec, geometry=replace(model.spec.geometry, aspect_ratio=aspect))
    samples = anyres_samples(anyres_model, tokenizer, anyres_shards, ["three", "one"])
    hf_model = hf_llava(model, "onevision" if aspect.startswith("anyres_max") else "next", aspect)
    for sample in samples:
        layout = torch.tensor([i.as_row() for i in sample.images])
        with torch.no_grad():
            ours = pack_image_tokens(view_embeds(model, sample.pixel_values), layout, model.spec.geometry, model.image_newline)
            sizes = torch.tensor([[i.height, i.width] for i in sample.images])
            # OneVision's multi-image rule needs the images per sample (its processor's batch_num_images)
            per_sample = {"batch_num_images": torch.tensor([len(sizes)])} if aspect.startswith("anyres_max") else {}
            theirs = hf_model.model.get_image_features(sample.pixel_values, sizes, vision_feature_layer=-2,
                                                       vision_feature_select_strategy="default", **per_sample).pooler_output
        assert ours.shape[0] == sum(i.tokens for i in sample.images)
        torch.testing.assert_close(ours, torch.cat(list(theirs)), rtol=0, atol=1e-6)
    if aspect == "anyres_max_1":  # the pooling beyond N tiles happened: fewer tokens than LLaVA-NeXT's
        geometry = model.spec.geometry
        assert geometry.tiled(40, 100).tokens < replace(geometry, aspect_ratio="anyres").tiled(40, 100).tokens


def test_a_video_is_pooled_and_ends_with_a_newline_as_onevision_has_it(anyres_model, tokenizer, anyres_shards):
    from dataclasses import replace

    from tests.helpers import anyres_samples
    from vdep.model.image_tokens import pack_image_tokens

    model = anyres_model.model.eval()
    model.spec = replace(model.spec, geometry=replace(model.spec.geometry, aspect_ratio="anyres_max_9"))
    (video,) = anyres_samples(anyres_model, tokenizer, anyres_shards, ["video"])
    hf_model = hf_llava(model, "onevision", "anyres_max_9")
    layout = torch.tensor([i.as_row() for i in video.images])
    with torch.no_grad():
        ours = pack_image_tokens(view_embeds(model, video.pixel_values), layout, model.spec.geometry, model.image_newline)
        theirs = hf_model.model.get_video_features(video.pixel_values[None], vision_feature_layer=-2,
                                                   vision_feature_select_strategy="default").pooler_output
    torch.testing.assert_close(ours, theirs[0], rtol=0, atol=1e-6)


def test_vdep_targets_every_image_token_but_the_newlines_and_n_img_counts_them_before_the_forward(
        anyres_model, tokenizer, anyres_shards):
    from tests.helpers import anyres_samples
    from vdep.config import VdepConfig
    from vdep.data.batch import collate
    from vdep.objectives.losses import reference_vdep_sum
    from vdep.objectives.supervision import image_newline_positions, prepare_inputs

    model, spec = anyres_model.model, anyres_model.spec
    samples = anyres_samples(anyres_model, tokenizer, anyres_shards, ["three", "text", "video", "one"])
    batch = collate(samples, tokenizer.pad_token_id, (64, 64))
    modes = torch.tensor([True, False, True, False])
    inputs = prepare_inputs(batch, modes, VdepConfig(), spec.image_token_id, spec.num_image_tokens)
    placeholder = inputs.input_ids == spec.image_token_id
    newline = image_newline_positions(inputs.input_ids, spec.image_token_id, inputs.image_layout)
    vdep_rows = modes[batch.sample_index.clamp(min=0)] & (batch.sample_index >= 0)
    assert not bool((inputs.image_targets & newline).any()) and bool(newline.any())
    # every other image token of a VDEP-mode sample is a target (each image follows text of its sample)
    assert inputs.num_image_targets == int((placeholder & ~newline & vdep_rows).sum())
    assert bool((inputs.image_positions == (placeholder & ~newline)).all())
    sums = model(inputs)
    hidden = model.hidden_states(model.embed(inputs.input_ids, inputs.pixel_values, inputs.num_images,
                                             inputs.detached_images, inputs.image_layout), inputs.attention_mask)
    embeds = model.embed(inputs.input_ids, inputs.pixel_values, inputs.num_images, None, inputs.image_layout)
    torch.testing.assert_close(sums.vdep, reference_vdep_sum(hidden, embeds, inputs.image_targets, torch.nn.Identity(),
                                                                model.vdep_term.target_norm))
    (sums.text + sums.vdep).backward()
    assert model.image_newline.grad is not None and bool(model.image_newline.grad.abs().sum() > 0)


def test_vdep_eval_answers_an_anyres_model_with_each_images_own_token_count(anyres_model, anyres_run, tokenizer):
    """Evaluation (and validation's answers during training) lays images out as training did: a 256-pixel image
    is 336 placeholders and its views, not the tower's 64 tokens of one view."""
    from vdep.eval.answerers import Prepared, VdepAnswerer
    from vdep.eval.questions import Question
    from vdep.evaluate import TrainedModel

    config, _ = anyres_run
    trained = TrainedModel(anyres_model.model.eval(), tokenizer, anyres_model.spec, anyres_model.processing, config,
                           "finetune")
    answerer = VdepAnswerer(trained, max_new_tokens=2)
    seen = []
    embed = trained.model.embed
    trained.model.embed = lambda ids, pixels, n, *rest, **named: seen.append((ids, pixels, named)) or embed(ids, pixels, n, *rest, **named)
    question = Question("q", "<image>\nWhat color is the shape?", "red", images=(b"",))
    answers = answerer.answer([Prepared(question, (picture(256, 256),)), Prepared(Question("t", "Say red.", "red"))])
    assert len(answers) == 2
    ids, pixels, named = seen[0]
    assert int((ids == anyres_model.spec.image_token_id).sum()) == 336 and pixels.shape[0] == 5
    assert named["image_layout"].tolist() == [geometry().tiled(256, 256).as_row()]


def test_vdep_eval_reads_multi_image_and_video_records_and_names_marker_mismatches(tmp_path, anyres_shards):
    """An `image` list is asked with the images its first turn's markers stand for (record "three": 2 of its 3;
    the third belongs to a later turn); a video file is asked as its file (decoded when answered), a list of frame
    images as its frames; a record whose markers do not match its images is named. A shard directory's multi-image
    and video samples are read the same way."""
    from tests.helpers import write_multi_image_inputs
    from vdep.eval.questions import load_questions

    data, images = write_multi_image_inputs(tmp_path)
    questions = load_questions(data, images)
    asked = {q.id: q for q in questions.questions}
    assert set(asked) == {"one", "three", "text", "big", "video", "frames", "undecodable"}
    assert asked["three"].images == (images / "wide.png", images / "tall.jpg")
    assert asked["three"].question == "Compare <image> and <image>." and asked["one"].images == (images / "wide.png",)
    assert asked["video"].video.file == images / "clip.mp4" and asked["video"].images == ()
    assert asked["frames"].video.frames == tuple(images / f"frame{i}.jpg" for i in range(5))
    reasons = {bad.record_id: bad.reason.split(":")[0] for bad in questions.bad}
    assert reasons["fewer-markers"] == "image_marker_mismatch" and reasons["empty-list"] == "bad_record"
    assert reasons["both"] == "bad_record" and reasons["no-video"] == "missing_video"
    from_shards = load_questions(anyres_shards, None)
    counts = sorted({len(q.images) for q in from_shards.questions})
    assert counts == [0, 1, 2] and all(isinstance(i, bytes) for q in from_shards.questions for i in q.images)
    frames = sorted({len(q.video.frames) for q in from_shards.questions if q.video is not None})
    assert frames == [3] and not from_shards.bad  # both videos stored as 3 frames (max_frames=3)


def test_a_steps_flops_count_every_view_through_the_tower(anyres_run, anyres_model, tokenizer, anyres_shards):
    """MFU's estimate runs the tower and projector once per view: an AnyRes image's base and tiles, each of a sample's
    images, a video's frames. The step plan's view count is the micro-batches' own, and more than one per image
    sample on these shards (tiled, three-image and video samples)."""
    from tests.helpers import anyres_loader
    from vdep.objectives.objective import VdepObjective
    from vdep.train.global_batch import plan_step
    from vdep.train.metrics import FlopModel

    config, _ = anyres_run
    spec = anyres_model.spec
    objective = VdepObjective(config.vdep, image_token_id=spec.image_token_id, num_image_tokens=spec.num_image_tokens,
                              seed=0, device=torch.device("cpu"))
    batches = [batch for batch, _ in zip(anyres_loader(anyres_shards, tokenizer, 0, 1, seed=0, micro=4).micro_batches(0), range(3))]
    plan = plan_step(batches, step=0, micro_batches_per_step=3, slots_per_rank=12, objective=objective, device=torch.device("cpu"))
    views = sum(int(b.image_layout[:, 1].sum()) for b in batches)
    assert plan.views == views > plan.image_samples, (plan.views, plan.image_samples)
    flops = FlopModel(llm_params=0, llm_layers=0, llm_hidden=0, vision_params=10, vision_tokens_per_view=64,
                      projector_params=1, llm_trainable=True)
    assert flops.step_flops(0, 0, plan.views) == (2 * 10 + 6 * 1) * 64 * views
