"""Shard building with broken inputs, the shard plan, and the streaming loader."""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from tests.helpers import POSITION_CASES, batch_fingerprint, loader_for_case, make_loader
from vdep.data.shards import discover_shards, plan_epoch, resolve_split
from vdep.data_tools.build_shards import BuildOptions, build_shards
from vdep.errors import DataError


def png_bytes(colour=(200, 10, 10), size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def conversation(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def test_build_shards_counts_and_explains_every_rejection(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "good.png").write_bytes(png_bytes())
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), (0, 0, 255)).save(jpeg, format="JPEG")
    (images / "truncated.jpg").write_bytes(jpeg.getvalue()[:100])
    (images / "text.png").write_bytes(b"this is not a png")
    (images / "anim.gif").write_bytes(b"GIF89a")
    records = [
        {"id": "ok-image", "image": "good.png", "conversations": conversation("<image>\nWhat?", "red")},
        {"id": "ok-text", "conversations": conversation("Hi?", "hello")},
        {"id": "missing", "image": "nope.png", "conversations": conversation("<image>\nWhat?", "red")},
        {"id": "truncated", "image": "truncated.jpg", "conversations": conversation("<image>\nWhat?", "blue")},
        {"id": "not-image", "image": "text.png", "conversations": conversation("<image>\nWhat?", "red")},
        {"id": "gif", "image": "anim.gif", "conversations": conversation("<image>\nWhat?", "red")},
        {"id": "no-marker", "image": "good.png", "conversations": conversation("What?", "red")},
        {"id": "marker-no-image", "conversations": conversation("<image>\nWhat?", "red")},
        {"id": "bad-turns", "conversations": [{"from": "gpt", "value": "x"}]},
        "not a record",
    ]
    (tmp_path / "part1.json").write_text(json.dumps(records))
    (tmp_path / "part2.jsonl").write_text(
        json.dumps({"id": "ok-line", "conversations": conversation("Q?", "A")}) + "\n{broken json\n"
    )
    options = BuildOptions([tmp_path / "part1.json", tmp_path / "part2.jsonl"], images, tmp_path / "out", samples_per_shard=2,
                           progress=False)
    report = build_shards(options)
    assert (report.written, report.total("with_image"), report.total("text_only")) == (3, 1, 2)
    assert dict(report.rejected) == {
        "missing_image": 1, "bad_image": 2, "unsupported_image_format": 1, "image_marker_mismatch": 2,
        "bad_conversation": 1, "bad_record": 1, "bad_json": 1,
    }
    errors = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert len(errors) == 9
    assert {e["id"] for e in errors if e["reason"] == "bad_image"} == {"truncated", "not-image"}
    assert any(e["file"].endswith("part2.jsonl") and e["index"] == 1 for e in errors)
    # Shard i holds the accepted records of plan positions [2i, 2i+2); shards with none are not written.
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == {"000000.tar": 2, "000005.tar": 1}
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["samples"] == 3 and stats["rejected"]["bad_image"] == 2 and stats["complete"]
    assert stats["records"] == 12 and stats["error_rate"] == pytest.approx(9 / 12, abs=1e-6)
    shards = discover_shards([str(tmp_path / "out")])
    keys = [s["__key__"] for shard in shards for s in wds.tariterators.tarfile_samples([{"url": shard.path}])]
    assert keys == ["000000000", "000000001", "000000010"]  # the position in the plan
    with pytest.raises(DataError, match="already holds a build"):
        build_shards(BuildOptions([tmp_path / "part1.json"], images, tmp_path / "out", progress=False))


def test_shard_plan_is_deterministic_and_covers_every_shard_once(small_data):
    shards = discover_shards([str(small_data.finetune_shards)])
    assert len(shards) == 4 and sum(s.num_samples for s in shards) == 64
    plans = plan_epoch(shards, seed=1, epoch=0, num_consumers=2, split="shards")
    assert plans == plan_epoch(shards, seed=1, epoch=0, num_consumers=2, split="shards")
    assert sorted(s.path for p in plans for s in p.shards) == sorted(s.path for s in shards)
    assert plan_epoch(shards, 1, 1, 2, "shards") != plans  # a new order each epoch
    assert resolve_split("auto", 4, 8) == "samples" and resolve_split("auto", 4, 2) == "shards"
    with pytest.raises(DataError, match="at least one shard per consumer"):
        resolve_split("shards", 4, 8)


@pytest.mark.parametrize("split", ["shards", "samples"])
def test_ranks_read_disjoint_samples_in_a_reproducible_order(small_data, tokenizer, split):
    keys = []
    for rank in range(2):
        loader = make_loader(small_data, tokenizer, rank, 2, split)
        first = [k for b in loader.micro_batches(0) for k in b.keys]
        again = [k for b in make_loader(small_data, tokenizer, rank, 2, split).micro_batches(0) for k in b.keys]
        assert first == again
        keys.append(set(first))
    assert not keys[0] & keys[1]
    assert len(keys[0] | keys[1]) == 64  # 64 samples, 2 ranks × 8 batches × 4
    assert make_loader(small_data, tokenizer, 0, 2, split).steps_in_epoch(0) == 8


def test_loader_workers_split_a_ranks_share(small_data, tokenizer):
    single = make_loader(small_data, tokenizer, 0, 1, "shards", workers=0)
    double = make_loader(small_data, tokenizer, 0, 1, "shards", workers=2)
    a = {k for b in single.micro_batches(0) for k in b.keys}
    b = [k for batch in double.micro_batches(0) for k in batch.keys]
    assert len(b) == len(set(b)) == 64 and set(b) == a
    assert double.stage_length(1.0, None).planned_steps == 16 and double.stage_length(1.5, None).planned_steps == 24
    assert double.stage_length(1.0, max_steps=5).planned_steps == 5


def test_a_stage_of_epochs_ends_with_its_last_pass_and_max_steps_repeats_the_data():
    from vdep.data.loader import StageLength

    one_and_a_half = StageLength(planned_steps=24, max_steps=None, whole_epochs=1, final_epoch_steps=8)
    assert one_and_a_half.describe() == "24 steps (1 epoch(s) and a part, by sizes.json)"
    assert not one_and_a_half.done(step=14, epoch=0, steps_in_epoch=14)
    assert not one_and_a_half.done(step=14, epoch=1, steps_in_epoch=0)  # the first pass ended early (skips)
    assert one_and_a_half.done(step=22, epoch=1, steps_in_epoch=8)  # the part of the second pass is done
    assert one_and_a_half.done(step=20, epoch=2, steps_in_epoch=0)  # the second pass ended before its part
    one = StageLength(planned_steps=16, max_steps=None, whole_epochs=1, final_epoch_steps=0)
    assert not one.done(step=15, epoch=0, steps_in_epoch=15) and one.done(step=15, epoch=1, steps_in_epoch=0)
    steps = StageLength(planned_steps=40, max_steps=40, whole_epochs=1, final_epoch_steps=0)
    assert not steps.done(step=39, epoch=3, steps_in_epoch=1) and steps.done(step=40, epoch=3, steps_in_epoch=2)
    assert steps.describe() == "40 steps (max_steps)"


def test_corrupt_samples_are_skipped_counted_and_named(small_data, tokenizer, tmp_path):
    out = tmp_path / "shards"
    out.mkdir()
    good = json.dumps({"conversations": conversation("Hi?", "hello")}).encode()
    with wds.TarWriter(str(out / "000000.tar")) as tar:
        for index in range(6):
            tar.write({"__key__": f"{index:09d}", "json": good})
        tar.write({"__key__": "000000006", "json": b"{not json"})
        tar.write({"__key__": "000000007", "json": good, "png": b"garbage"})  # image without marker + bad bytes
        tar.write({"__key__": "000000008", "json": json.dumps({"conversations": conversation("<image>\nq", "a")}).encode(),
                   "png": png_bytes()[:50]})  # truncated image
        tar.write({"__key__": "000000009", "json": json.dumps({"conversations": conversation("<image>\nq", "a")}).encode(),
                   "png": b"<html>not found</html>"})  # not an image
    (out / "sizes.json").write_text(json.dumps({"000000.tar": 10}))
    loader = make_loader(small_data, tokenizer, 0, 1, "shards", micro=3, shard_dir=out)
    batches = list(loader.micro_batches(0))
    assert sum(len(b.keys) for b in batches) == 6
    skipped = {}
    for batch in batches:
        for reason, count in batch.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + count
    assert skipped == {"bad_json": 1, "image_marker_mismatch": 1, "bad_image": 2}
    messages = [m for b in batches for m in b.skip_messages]
    assert any("000000006" in m and "bad_json" in m for m in messages)
    not_an_image = next(m for m in messages if "000000009" in m)  # the cause in words, not Pillow's BytesIO repr
    assert "cannot decode the image: its bytes (starting b'<html>not found<') are in no image format" in not_an_image
    assert "BytesIO" not in " ".join(messages)


def test_vdeps_tar_reader_yields_webdatasets_samples_and_restarts_at_any_sample(small_data):
    """The shard format is WebDataset's: the same samples as its reader, and opening a shard at a
    sample's first byte yields exactly the samples from there on."""
    from vdep.data.remote import RemoteSettings
    from vdep.data.tar_reader import iterate_samples, read_samples

    for shard in discover_shards([str(small_data.finetune_shards)]):
        theirs = [{k: v for k, v in s.items() if k != "__url__"} for s in wds.tariterators.tarfile_samples([{"url": shard.path}])]
        with open(shard.path, "rb") as handle:
            ours = list(iterate_samples(handle, shard.path, 0))
        assert [{k: v for k, v in s.items() if k not in ("__url__", "__ref__")} for s in ours] == theirs
        middle = ours[len(ours) // 2]["__ref__"]
        with open(shard.path, "rb") as handle:
            handle.seek(middle.start)
            rest = list(iterate_samples(handle, shard.path, 0, middle.start))
        assert [s["__ref__"] for s in rest] == [s["__ref__"] for s in ours[len(ours) // 2:]]
        assert read_samples([shard.path], [middle], RemoteSettings())[0]["json"] == ours[len(ours) // 2]["json"]


def test_missing_sizes_file_is_explained(tmp_path):
    (tmp_path / "000000.tar").write_bytes(b"")
    with pytest.raises(DataError, match="no sizes.json"):
        discover_shards([str(tmp_path)])
    with pytest.raises(DataError, match="holds no .tar files"):
        discover_shards([str(Path(tmp_path / "empty").mkdir() or tmp_path / "empty")])


# ------------------------------------------------------------------------------------- data position
@pytest.mark.parametrize("case", list(POSITION_CASES))
def test_a_restored_data_position_continues_with_exactly_the_next_batches(small_data, tokenizer, case):
    import subprocess
    import sys

    from vdep.data.loader import DataPosition

    loader = loader_for_case(small_data, tokenizer, case)
    uninterrupted = [batch_fingerprint(b) for b in loader.micro_batches(0)]
    assert sum(sum(f[5].values()) for f in uninterrupted) > 0, "the case should skip some samples"
    consumed = 5
    position = DataPosition(0)
    for batch in itertools.islice(loader.micro_batches(0), consumed):
        position.advance(batch, loader.workers)
    args = {"small_data": [str(p) for p in (small_data.root, small_data.raw, small_data.align_shards,
                                            small_data.finetune_shards, small_data.tokenizer)],
            "case": case, "position": json.loads(json.dumps(position.to_json()))}
    code = "from tests.helpers import restored_batches_main; restored_batches_main()"
    result = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1], timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]  # (checked here, to show the child's stderr)
    restored = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(uninterrupted) > consumed + 2
    assert restored == json.loads(json.dumps(uninterrupted[consumed:]))


def test_a_position_written_by_vdep_0_1_is_restored_by_replaying_the_stream(small_data, tokenizer):
    """vdep 0.1 recorded [read, carried indices, window, drop] per consumer: no byte ranges. Such a
    position is restored by replaying the epoch's raw stream, without decoding, to the same batches."""
    from vdep.data.loader import DataPosition

    loader = loader_for_case(small_data, tokenizer, "2 workers, grouped, packed")
    uninterrupted = [batch_fingerprint(b) for b in loader.micro_batches(0)]
    position = DataPosition(0)
    for batch in itertools.islice(loader.micro_batches(0), 5):
        position.advance(batch, loader.workers)
    saved = position.to_json()
    for number, state in saved["consumers"].items():  # the old form
        saved["consumers"][number] = [state["read"], [i for i, _ in state["carry"]], state["window"], state["drop"]]
    old = DataPosition.from_json(saved)
    assert all(state.stream is None for state in old.consumers.values())
    assert [batch_fingerprint(b) for b in loader.micro_batches(0, old)] == uninterrupted[5:]


def test_grouping_makes_single_modality_batches_of_similar_length(small_data, tokenizer):
    plain = make_loader(small_data, tokenizer, 0, 1, "shards", micro=4)
    grouped = make_loader(small_data, tokenizer, 0, 1, "shards", micro=4, group_by_modality_length=True, group_window=4)
    plain_batches, grouped_batches = list(plain.micro_batches(0)), list(grouped.micro_batches(0))
    assert sorted(k for b in plain_batches for k in b.keys) == sorted(k for b in grouped_batches for k in b.keys)

    def mixed(batches) -> int:
        return sum(0 < int(b.has_image.sum()) < b.num_samples for b in batches)

    def padding(batches) -> int:
        return sum(int((b.attention_mask == 0).sum()) for b in batches)

    windows = -(-len(grouped_batches) // 4)
    assert mixed(grouped_batches) <= windows < mixed(plain_batches)
    assert padding(grouped_batches) < padding(plain_batches) / 2
    packed = make_loader(small_data, tokenizer, 0, 1, "shards", micro=4, group_by_modality_length=True,
                         group_window=4, packing=True, pack_capacity=400)
    packed_batches = list(packed.micro_batches(0))
    assert [sorted(b.keys) for b in packed_batches] == [sorted(b.keys) for b in grouped_batches]
    assert padding(packed_batches) < padding(grouped_batches)


def test_resampled_shards_give_every_consumer_its_share_deterministically(small_data):
    shards = discover_shards([str(small_data.finetune_shards)])
    plans = plan_epoch(shards, seed=2, epoch=0, num_consumers=3, split="resample")
    assert [p.num_samples for p in plans] == [64 // 3] * 3
    assert plans == plan_epoch(shards, seed=2, epoch=0, num_consumers=3, split="resample")
    assert plans != plan_epoch(shards, seed=2, epoch=1, num_consumers=3, split="resample")
    assert resolve_split("resample", 1, 8) == "resample"  # fewer shards than consumers is fine


def test_grouping_gives_every_rank_the_same_modality_at_each_micro_batch(small_data, tokenizer, tmp_path):
    """LLaVA's grouping is global: the k-th micro-batch of every rank holds the same modality."""
    import random
    import shutil

    from vdep.data.shards import count_image_samples, image_fraction

    records = json.loads((small_data.raw / "finetune.json").read_text())
    images = [{**r, "id": f"{r['id']}-{copy}"} for copy in range(5) for r in records if "image" in r][:250]
    texts = [{"id": f"t{i}", "conversations": conversation(f"Say {i}.", f"{i} it is.")} for i in range(150)]
    mixed = images + texts
    random.Random(1).shuffle(mixed)
    (tmp_path / "mixed.json").write_text(json.dumps(mixed))
    build_shards(BuildOptions([tmp_path / "mixed.json"], small_data.raw / "images", tmp_path / "shards",
                              samples_per_shard=25, progress=False))
    shards = discover_shards([str(tmp_path / "shards")])
    fraction = image_fraction(shards)
    assert fraction == 250 / 400  # from build-shards' shard_stats
    sequences = []
    for rank in range(2):
        loader = make_loader(small_data, tokenizer, rank, 2, "shards", workers=2, micro=1, seed=4,
                             shard_dir=tmp_path / "shards", group_by_modality_length=True, group_window=4,
                             image_fraction=fraction, shuffle_buffer=50)
        batches = list(loader.micro_batches(0))[: loader.steps_in_epoch(0)]
        sequences.append(["I" if bool(b.has_image.all()) else "T" if not bool(b.has_image.any()) else "M"
                          for b in batches])
    # Near its end a consumer's stream may lack one modality (here each reads 100 samples, 37.5% text
    # on average): those last windows are filled with what is left. Before that, every rank agrees.
    aligned = len(sequences[0]) - 5 * 4 * 2  # all but the last five windows of each of the 2 workers
    assert len(sequences[0]) == 200, len(sequences[0])
    mismatches = [i for i, (a, b) in enumerate(zip(sequences[0][:aligned], sequences[1][:aligned])) if a != b]
    assert not mismatches, (mismatches, ["".join(q) for q in sequences])
    assert "M" not in sequences[0] and {"I", "T"} <= set(sequences[0][:aligned])
    # Without build-shards' stats the count comes from the tar headers, and agrees.
    shutil.copytree(tmp_path / "shards", tmp_path / "bare", ignore=shutil.ignore_patterns("shard_stats"))
    bare = discover_shards([str(tmp_path / "bare")])
    assert [count_image_samples(s) for s in bare] == [count_image_samples(s) for s in shards]
