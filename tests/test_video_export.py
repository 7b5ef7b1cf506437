"""Videos through a OneVision export (`anyres_max_N` → LlavaOnevisionForConditionalGeneration): the export's `<video>`
token, processor and chat template; `--verify`'s video probe; `vdep eval` answering video records through vdep's
model and through transformers' `generate` on the export alike."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import ANYRES_OVERRIDES, SmallData


def prepared_run(small_data: SmallData, run_dir, aspect: str = "anyres_max_2"):
    """A tiny AnyRes run directory with its base weights (image_newline included): what an export reads."""
    from vdep.config import load_config
    from vdep.rundir import RunDir
    from vdep.train.prepare import prepare_run_dir

    overrides = [*small_data.overrides(run_dir), *ANYRES_OVERRIDES, f"model.image_aspect_ratio={aspect}",
                 "model.mm_patch_merge_type=spatial_unpad"]
    prepare_run_dir(load_config("demo-tiny", overrides), RunDir(run_dir))
    return run_dir


def test_a_onevision_export_verifies_a_video_probe_exactly(small_data, tmp_path):
    """The video probe's frames, `<video>` ids, logits (max |Δ| 0 in fp32) and greedy tokens are vdep's."""
    from vdep.export.hf import export_hf
    from vdep.export.verify import verify_export

    result = export_hf(prepared_run(small_data, tmp_path / "run"), tmp_path / "hf", dtype="fp32")
    report = verify_export(result)
    assert report.passed, report.summary()
    video = next(p for p in report.probes if p.name == "a video")
    assert video.pixel_values_equal and video.input_ids_equal and video.greedy_equal and video.vdep_tokens
    assert video.max_abs_logit_diff == 0.0, report.summary()
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    tokenizer = json.loads((tmp_path / "hf" / "tokenizer.json").read_text())
    video_ids = [t["id"] for t in tokenizer["added_tokens"] if t["content"] == "<video>"]
    assert video_ids == [config["video_token_index"]] and config["video_token_index"] != config["image_token_index"]
    processor = json.loads((tmp_path / "hf" / "processor_config.json").read_text())
    # The tower's own frame processing (the tiny tower: 64 px), as training processes a frame.
    assert processor["video_processor"]["video_processor_type"] == "LlavaOnevisionVideoProcessor"


def test_video_goes_on_a_free_embedding_row_or_not_at_all(tokenizer):
    """vdep pads the vocabulary to 64 rows: `<video>` takes the next id when it has a row; a tokenizer that fills
    every row gets none (an id without a row could not be looked up), and stays as it was."""
    import copy

    from vdep.export.layout import VIDEO_TOKEN, with_video_token

    room = copy.deepcopy(tokenizer)
    assert with_video_token(room, len(tokenizer) + 1) and room.convert_tokens_to_ids(VIDEO_TOKEN) == len(tokenizer)
    full = copy.deepcopy(tokenizer)
    assert not with_video_token(full, len(tokenizer)) and len(full) == len(tokenizer)
    assert VIDEO_TOKEN not in full.get_vocab()


def test_the_export_chat_template_marks_a_video_part_with_video(small_data, tmp_path):
    from vdep.export.hf import export_hf
    from vdep.export.processors import load_processor

    export_hf(prepared_run(small_data, tmp_path / "run"), tmp_path / "hf", dtype="fp32")
    processor = load_processor(tmp_path / "hf", "llava_onevision")
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}],
        add_generation_prompt=True)
    assert "<video>\nWhat happens?" in prompt and "<image>" not in prompt


@pytest.mark.parametrize("aspect", ["anyres_max_2", "anyres"])
def test_vdep_eval_answers_video_records_alike_through_vdep_and_through_the_export(small_data, tmp_path, aspect):
    """A video file (decoded with PyAV as build-shards decodes it) and a video given as frame images, in one batch
    with image and text-only records: vdep's model on the run directory and transformers' generate on its
    OneVision export give the same answers. A LlavaNext export (`anyres`) has no video input: its video records
    are named bad records, not answered, while vdep's model answers them."""
    from tests.helpers import write_multi_image_inputs
    from vdep.eval.questions import load_questions
    from vdep.eval.run import evaluate
    from vdep.export.hf import export_hf

    run_dir = prepared_run(small_data, tmp_path / "run", aspect)
    exported = export_hf(run_dir, tmp_path / "hf", dtype="fp32").out
    data, images = write_multi_image_inputs(tmp_path / "questions")
    questions = load_questions(data, images)
    videos = [q for q in questions.questions if q.video is not None]
    assert sorted(q.id for q in videos) == ["frames", "undecodable", "video"]  # the broken file fails when decoded
    loading = {bad.record_id: bad.reason.split(":")[0] for bad in questions.bad}
    assert loading["no-video"] == "missing_video" and loading["missing-frame"] == "missing_image"
    on_run = evaluate(run_dir, questions, batch_size=8, max_new_tokens=6)
    on_export = evaluate(exported, questions, batch_size=8, max_new_tokens=6)
    for report in (on_run, on_export):
        assert {bad.record_id: bad.reason.split(":")[0] for bad in report.bad}["undecodable"] == "bad_video"
    answered = {a["id"]: a["answer"] for a in on_run.answers}
    assert {"video", "frames"} <= answered.keys() and answered["video"] and answered["frames"]
    if aspect == "anyres_max_2":
        assert on_export.model.startswith("transformers LlavaOnevision")
        assert {a["id"]: a["answer"] for a in on_export.answers} == answered
    else:
        assert {a["id"]: a["answer"] for a in on_export.answers} == {
            key: value for key, value in answered.items() if key not in ("video", "frames")}
        unsupported = {bad.record_id: bad.reason for bad in on_export.bad if bad.reason.startswith("unsupported_record")}
        assert unsupported.keys() == {"video", "frames"} and "LlavaNext" in unsupported["video"], unsupported


def test_a_video_frame_list_in_eval_keeps_max_frames_spread_as_build_shards_does(tmp_path):
    """More frame images than --max-frames: the same frames build-shards would store (its default 32, or the
    --max-frames given). lmms-eval's task, one image per question, refuses the video instead of dropping it."""
    from PIL import Image

    from vdep.data_tools.media import VideoSampling
    from vdep.errors import VdepError
    from vdep.eval.lmms import write_lmms_task
    from vdep.eval.questions import load_questions

    root = tmp_path / "images"
    root.mkdir()
    for i in range(40):
        Image.new("RGB", (16, 16), (i, 0, 0)).save(root / f"f{i}.png")
    record = {"id": "long", "video": [f"f{i}.png" for i in range(40)],
              "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]}
    (tmp_path / "q.json").write_text(json.dumps([record]))
    for sampling, count in ((VideoSampling(), 32), (VideoSampling(max_frames=5), 5)):
        (question,) = load_questions(tmp_path / "q.json", root, sampling).questions
        kept = sampling.indices(40, None)
        assert [path.name for path in question.video.frames] == [f"f{i}.png" for i in kept]
        assert torch.tensor(kept).unique().numel() == count
    with pytest.raises(VdepError, match="record long shows a video"):
        write_lmms_task(load_questions(tmp_path / "q.json", root), tmp_path / "task", 8)
