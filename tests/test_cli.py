"""The `vdep` command as users and scripts call it."""

from __future__ import annotations

import json
import subprocess
import sys

from transformers import AutoTokenizer


def vdep(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vdep", *args], check=False, capture_output=True, text=True, cwd=cwd, timeout=300)


def test_help_lists_every_subcommand_with_examples():
    result = vdep("--help")
    assert result.returncode == 0
    for command in ("train", "demo", "build-shards", "export-hf", "make-tokenizer"):
        assert command in result.stdout
        sub = vdep(command, "--help")
        assert sub.returncode == 0 and "examples:" in sub.stdout, command


def test_every_option_with_a_default_states_it_in_its_help():
    import argparse

    from vdep.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    silent = [
        f"{name} {option.option_strings[0]}"
        for name, command in commands.choices.items() for option in command._actions
        if option.option_strings and option.default not in (None, argparse.SUPPRESS) and option.default is not False
        and not option.required and not ("default: " in (option.help or "") and str(option.default) in option.help)
    ]
    assert silent == []
    assert "(default: bf16)" in " ".join(vdep("export-hf", "--help").stdout.split())


def test_bad_input_is_one_message_without_a_traceback(small_data, tmp_path):
    result = vdep("train", "demo-tiny", *small_data.overrides(tmp_path / "run"), "stages.align.learnig_rate=1")
    assert result.returncode == 2
    assert "vdep: error: unknown key 'stages.align.learnig_rate'" in result.stderr
    assert "did you mean 'stages.align.lr'" in result.stderr
    assert "Traceback" not in result.stderr
    missing = vdep("train", "no-such-recipe.yaml")
    assert missing.returncode == 2 and "neither a file nor a shipped recipe" in missing.stderr


def test_print_config_shows_the_resolved_config_and_accepts_launcher_arguments(small_data, tmp_path):
    # The deepspeed launcher passes --local_rank=N before the subcommand.
    result = vdep("--local_rank=0", "train", "demo-tiny", *small_data.overrides(tmp_path / "run"), "vdep.alpha=0.3", "--print-config")
    assert result.returncode == 0, result.stderr
    assert "alpha: 0.3" in result.stdout and "template: vicuna_v1" in result.stdout
    assert not (tmp_path / "run").exists()  # printing the config trains nothing


def test_print_config_needs_neither_data_nor_models(tmp_path):
    printed = vdep("train", "demo-tiny", "--print-config", cwd=tmp_path)  # no vdep-demo/ here
    assert printed.returncode == 0, printed.stderr
    assert "tokenizer: vdep-demo/data/tokenizer" in printed.stdout
    trained = vdep("train", "demo-tiny", cwd=tmp_path)  # training checks the files
    assert trained.returncode == 2 and "tokenizer folder vdep-demo/data/tokenizer does not exist" in trained.stderr


def test_build_shards_and_make_tokenizer(tmp_path, small_data):
    records = json.loads((small_data.raw / "align.json").read_text())[:10]
    records.append({"id": "broken", "image": "missing.png", "conversations": records[0]["conversations"]})
    (tmp_path / "in.json").write_text(json.dumps(records))
    result = vdep("build-shards", str(tmp_path / "in.json"), "--image-root", str(small_data.raw / "images"),
                  "--out", str(tmp_path / "shards"), "--samples-per-shard", "4")
    assert result.returncode == 0, result.stderr
    assert "wrote 10 samples" in result.stdout and "missing_image: 1" in result.stdout
    assert json.loads((tmp_path / "shards" / "sizes.json").read_text()) == {"000000.tar": 4, "000001.tar": 4, "000002.tar": 2}
    made = vdep("make-tokenizer", "--shards", str(tmp_path / "shards"), "--vocab-size", "320", "--out", str(tmp_path / "tok"))
    assert made.returncode == 0, made.stderr
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert tokenizer.decode(tokenizer("a red circle", add_special_tokens=False).input_ids) == "a red circle"
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<s>", "</s>")
    too_small = vdep("make-tokenizer", "--shards", str(tmp_path / "shards"), "--vocab-size", "50", "--out", str(tmp_path / "t2"))
    assert too_small.returncode == 2 and "too small" in too_small.stderr
    written = {path.name: path.read_bytes() for path in (tmp_path / "tok").iterdir()}
    again = vdep("make-tokenizer", "--shards", str(small_data.align_shards), "--vocab-size", "330", "--out", str(tmp_path / "tok"))
    assert again.returncode == 2 and f"--out {tmp_path / 'tok'} already exists and is not an empty folder" in again.stderr
    assert {path.name: path.read_bytes() for path in (tmp_path / "tok").iterdir()} == written  # not overwritten
