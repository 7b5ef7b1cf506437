"""Multi-image and video samples, from LLaVA-NeXT/OneVision JSON through build-shards and inspect-shards to
the loader's batches under AnyRes: what is stored, what is rejected and why, token counts, and exact resume."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch

from tests.helpers import write_multi_image_inputs as write_inputs
from vdep.data.anyres import TILED, ImageGeometry, MediaProcessor
from vdep.data.dataset import Batching, SamplePreprocessor
from vdep.data.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageProcessing
from vdep.data.loader import DataPosition, StageLoader
from vdep.data.shards import discover_shards
from vdep.data.templates import TemplateTokenizer, make_template
from vdep.data_tools.build_shards import BuildOptions, build_shards
from vdep.data_tools.inspect_shards import format_report, inspect_shards
from vdep.data_tools.media import VideoSampling
from vdep.model.tokenizer import image_token_id
from vdep.objectives.supervision import image_newline_positions

PINS = ((32, 32), (32, 64), (64, 32), (64, 64))
PROCESSING = ImageProcessing(32, None, (32, 32), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, pad_to_square=False)


@pytest.fixture(scope="module")
def multi_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    data, images = write_inputs(root)
    report = build_shards(BuildOptions([data], images, root / "shards", samples_per_shard=4, progress=False,
                                       video=VideoSampling(fps=2.0, max_frames=4)))
    return root, report


def test_build_shards_stores_every_image_and_the_sampled_frames_and_names_every_rejection(multi_shards):
    root, report = multi_shards
    assert dict(report.rejected) == {"image_marker_mismatch": 1, "bad_video": 1, "missing_video": 1, "missing_image": 1,
                                     "bad_record": 2}
    stats = json.loads((root / "shards" / "stats.json").read_text())
    # 1 + 3 images, a video of 30 frames at 10 fps sampled at 2 fps (6 frames, at most 4), 5 frames kept as 4
    assert (stats["samples"], stats["with_image"], stats["text_only"]) == (6, 5, 1)
    assert (stats["images"], stats["videos"], stats["frames"]) == (5, 2, 8)
    errors = {e["id"]: e for e in map(json.loads, (root / "shards" / "errors.jsonl").read_text().splitlines())}
    assert "broken.mp4: cannot decode the video" in errors["undecodable"]["message"]
    assert "2 images/videos but 1 <image> markers" in errors["fewer-markers"]["message"]
    assert "gone.jpg" in errors["missing-frame"]["message"]
    members = {}
    for tar in sorted((root / "shards").glob("*.tar")):
        with tarfile.open(tar) as archive:
            for name in archive.getnames():
                key, _, rest = name.partition(".")
                members.setdefault(key, []).append(rest)
    single, three, video = members["000000000"], members["000000001"], members["000000002"]
    with tarfile.open(sorted((root / "shards").glob("*.tar"))[1]) as archive:  # records 4-7: text is number 4
        text = json.loads(archive.extractfile("000000004.json").read())
        single_json = json.loads(archive.extractfile("000000005.json").read())  # "big": one image
    assert set(text) == set(single_json) == {"id", "conversations", "source"}  # stored exactly as before
    assert sorted(single) == ["json", "png"]  # a single image keeps the single-image member names
    assert sorted(three) == ["1.jpg", "2.png", "json", "png"]
    assert sorted(video) == ["1.jpg", "2.jpg", "3.jpg", "jpg", "json"]


def test_inspect_shards_counts_images_per_sample_videos_and_frames(multi_shards):
    root, _ = multi_shards
    report = inspect_shards(root / "shards")
    assert report.ok and report.samples == 6
    assert dict(report.images_per_sample) == {0: 1, 1: 4, 3: 1} and (report.videos, report.frames) == (2, 8)
    assert "images and videos per sample (count: samples): 0: 1, 1: 4, 3: 1; 2 video(s) of 8 frame(s)" in format_report(report)


def preprocessor(tokenizer, aspect: str = "anyres", max_length: int = 400) -> SamplePreprocessor:
    geometry = ImageGeometry(aspect, 32, 4, 16, PINS, "spatial_unpad")
    encoder = TemplateTokenizer(tokenizer, image_token_id(tokenizer), 16)
    return SamplePreprocessor(make_template("vicuna_v1", tokenizer), encoder, MediaProcessor(geometry, PROCESSING), max_length)


def raw_samples(folder: Path) -> dict[str, dict]:
    import webdataset as wds

    shards = [{"url": s.path} for s in discover_shards([str(folder)])]
    return {json.loads(s["json"])["id"]: s for s in wds.tariterators.tarfile_samples(shards)}


def test_every_image_gets_its_own_token_count_and_the_newlines_are_where_the_layout_says(multi_shards, tokenizer):
    root, _ = multi_shards
    raw = raw_samples(root / "shards")
    preprocess = preprocessor(tokenizer)
    placeholder = image_token_id(tokenizer)
    three = preprocess(raw["three"])
    assert [i.kind for i in three.images] == [TILED] * 3
    assert three.pixel_values.shape[0] == sum(i.views for i in three.images)
    assert int((three.input_ids == placeholder).sum()) == sum(i.tokens for i in three.images)
    onevision = preprocessor(tokenizer, "anyres_max_4")(raw["three"])  # a multi-image sample: one view per image
    assert [(i.views, i.tokens) for i in onevision.images] == [(1, 17)] * 3
    video = preprocess(raw["video"])
    assert (video.pixel_values.shape[0], video.images[0].tokens) == (4, 4 * 4 + 1)
    batching = Batching(2, tokenizer.pad_token_id, (32, 32), PROCESSING.normalisation_table(), packing=True, pack_capacity=800)
    batch = batching.collate([three, video])
    newline = image_newline_positions(batch.input_ids, placeholder, batch.image_layout)
    rows_of_tiles = sum(i.rows for i in three.images) + 1  # the video's one newline
    assert int(newline.sum()) == rows_of_tiles and bool((batch.input_ids[newline] == placeholder).all())
    assert batch.num_images == 4 and batch.num_views == three.pixel_values.shape[0] + 4


def test_max_length_never_cuts_inside_an_image(multi_shards, tokenizer):
    root, _ = multi_shards
    sample = raw_samples(root / "shards")["three"]
    full = preprocessor(tokenizer)(sample)
    from vdep.data.conversation import SampleError

    last_image_token = int(torch.nonzero(full.input_ids == image_token_id(tokenizer)).max())
    with pytest.raises(SampleError) as error:
        preprocessor(tokenizer, max_length=last_image_token)(sample)
    assert error.value.reason == "too_long"
    assert len(preprocessor(tokenizer, max_length=last_image_token + 2)(sample).input_ids) == last_image_token + 2


def make_anyres_loader(folder: Path, tokenizer, **batching) -> StageLoader:
    return StageLoader.create(
        discover_shards([str(folder)]), preprocessor(tokenizer),
        Batching(2, tokenizer.pad_token_id, (32, 32), PROCESSING.normalisation_table(), pack_capacity=800, **batching),
        rank=0, world_size=1, num_workers=0, grad_accum_steps=1, seed=3, split="samples", shuffle_buffer=4,
    )


@pytest.mark.parametrize("settings", [{}, {"packing": True, "group_by_modality_length": True, "group_window": 2,
                                            "image_fraction": 0.8}], ids=["plain", "grouped-packed"])
def test_a_restored_loader_continues_with_the_same_multi_image_batches(tmp_path, tokenizer, settings):
    data, images = write_inputs(tmp_path, copies=6)
    build_shards(BuildOptions([data], images, tmp_path / "shards", samples_per_shard=8, shuffle=True, progress=False,
                              video=VideoSampling(fps=2.0, max_frames=3)))

    def fingerprint(batch) -> list:
        return [batch.keys, batch.input_ids.tolist(), batch.pixel_values.sum().item(), batch.image_layout.tolist()]

    loader = make_anyres_loader(tmp_path / "shards", tokenizer, **settings)
    position = DataPosition()
    everything = []
    for batch in loader.micro_batches(0):
        everything.append(fingerprint(batch))
        if len(everything) == 4:
            position.advance(batch, 1)
            saved = DataPosition.from_json(json.loads(json.dumps(position.to_json())))
        elif len(everything) < 4:
            position.advance(batch, 1)
    assert len(everything) > 6 and any(len(layout) > 1 for *_, layout in everything)
    restored = make_anyres_loader(tmp_path / "shards", tokenizer, **settings)
    assert [fingerprint(b) for b in restored.micro_batches(saved.epoch, saved)] == everything[4:]
