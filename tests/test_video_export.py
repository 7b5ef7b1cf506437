"""Videos through a OneVision export (`anyres_max_N` → LlavaOnevisionForConditionalGeneration): the export's `<video>`
token, processor and chat template; `--verify`'s video probe."""

from __future__ import annotations

import json

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


def test_the_export_chat_template_marks_a_video_part_with_video(small_data, tmp_path):
    from vdep.export.hf import export_hf
    from vdep.export.processors import load_processor

    export_hf(prepared_run(small_data, tmp_path / "run"), tmp_path / "hf", dtype="fp32")
    processor = load_processor(tmp_path / "hf", "llava_onevision")
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}],
        add_generation_prompt=True)
    assert "<video>\nWhat happens?" in prompt and "<image>" not in prompt
