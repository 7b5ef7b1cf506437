"""`vdep build-shards` and `vdep inspect-shards`: inputs, conversions, determinism, parts, resume, exit codes."""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import re
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from vdep.cli import main
from vdep.data.conversation import SampleError
from vdep.data.images import decode_image
from vdep.data.shards import discover_shards
from vdep.data_tools.build_shards import SHARD_STATS_DIR, BuildOptions, build_shards
from vdep.data_tools.inspect_shards import inspect_shards, make_length_encoder
from vdep.errors import DataError

REPO = Path(__file__).resolve().parents[1]


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    """A valid-looking PNG whose header claims width × height pixels (the data is tiny)."""
    data = bytearray(encoded(Image.new("L", (4, 4)), "PNG"))
    ihdr = 8 + 8  # PNG signature, then the IHDR chunk's length and type
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def caption(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def read_samples(folder: Path) -> list[dict]:
    return [s for shard in discover_shards([str(folder)]) for s in wds.tariterators.tarfile_samples([{"url": shard.path}])]


def options(inputs, image_root, out, **kwargs) -> BuildOptions:
    return BuildOptions(list(inputs), image_root, out, progress=False, **kwargs)


@pytest.fixture()
def image_folder(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    gradient = np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (48, 1, 3))
    (folder / "rgb.jpg").write_bytes(encoded(Image.fromarray(gradient), "JPEG", quality=90))
    (folder / "cmyk.jpg").write_bytes(encoded(Image.new("CMYK", (32, 24), (0, 255, 255, 0)), "JPEG"))
    palette = Image.new("P", (20, 20), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    (folder / "palette.png").write_bytes(encoded(palette, "PNG"))
    sixteen = Image.fromarray(np.full((10, 12), 65535, dtype=np.uint16))
    assert sixteen.mode.startswith("I;16")
    (folder / "sixteen.png").write_bytes(encoded(sixteen, "PNG"))
    (folder / "big.png").write_bytes(encoded(Image.new("RGB", (400, 100), (9, 99, 199)), "PNG"))
    (folder / "bomb.png").write_bytes(png_bomb(30_000, 30_000))
    (folder / "truncated.jpg").write_bytes((folder / "rgb.jpg").read_bytes()[:200])
    (folder / "notes.png").write_bytes(b"plain text, not a PNG")
    return folder


def test_image_modes_are_converted_bombs_rejected_and_max_side_applied(tmp_path, image_folder):
    names = ["rgb.jpg", "cmyk.jpg", "palette.png", "sixteen.png", "big.png", "bomb.png", "truncated.jpg", "notes.png"]
    records = [{"id": name, "image": name, "conversations": caption("<image>\nWhat?", "it")} for name in names]
    (tmp_path / "in.json").write_text(json.dumps(records))
    report = build_shards(options([tmp_path / "in.json"], image_folder, tmp_path / "out", max_side=200, samples_per_shard=4))
    assert report.written == 5 and report.rejected == {"bad_image": 3}
    assert report.counter("converted") == {"CMYK": 1, "P": 1, "I;16": 1} and report.total("resized") == 1
    samples = {json.loads(s["json"])["id"]: s for s in read_samples(tmp_path / "out")}
    assert samples["rgb.jpg"]["jpg"] == (image_folder / "rgb.jpg").read_bytes()  # untouched: original bytes
    cmyk = decode_image(samples["cmyk.jpg"]["jpg"])
    assert cmyk.mode == "RGB" and np.abs(np.asarray(cmyk, dtype=int) - (255, 0, 0)).max() <= 3  # C=0 M=Y=255: red
    palette = decode_image(samples["palette.png"]["png"])
    assert palette.mode == "RGB" and palette.getpixel((3, 3)) == (10, 200, 30)
    sixteen = decode_image(samples["sixteen.png"]["png"])
    assert sixteen.mode == "L" and sixteen.getpixel((0, 0)) == 255  # scaled, not clipped garbage
    big = decode_image(samples["big.png"]["png"])
    assert big.size == (200, 50) and big.getpixel((100, 25)) == (9, 99, 199)
    errors = {e["id"]: e for e in map(json.loads, (tmp_path / "out" / "errors.jsonl").read_text().splitlines())}
    assert set(errors) == {"bomb.png", "truncated.jpg", "notes.png"}
    assert "pixel limit" in errors["bomb.png"]["message"] or "decompression" in errors["bomb.png"]["message"].lower()
    # Each names the file under --image-root and the cause in words (Pillow's messages name a BytesIO object).
    assert errors["notes.png"]["message"] == ("notes.png: cannot decode the image: its bytes (starting b'plain text, not ') "
                                              "are in no image format Pillow reads: not an image, or its header is damaged")
    assert errors["truncated.jpg"]["message"].startswith("truncated.jpg: cannot decode the image: the file is cut short (200 bytes)")
    assert errors["bomb.png"]["message"].startswith("bomb.png: ")
    assert not any("BytesIO" in e["message"] for e in errors.values())
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["converted_modes"] == {"CMYK": 1, "P": 1, "I;16": 1} and stats["resized"] == 1


def write_img2dataset_tar(path: Path, count: int, broken: bool = True) -> None:
    with wds.TarWriter(str(path)) as tar:
        for index in range(count):
            key = f"{index:09d}"
            sample = {"__key__": key, "jpg": encoded(Image.new("RGB", (16, 16), (index * 20 % 255, 0, 0)), "JPEG"),
                      "txt": f"a red square number {index}".encode(),
                      "json": json.dumps({"url": f"http://example.com/{index}.jpg", "status": "success"}).encode()}
            if broken and index == 1:
                del sample["txt"]
            if broken and index == 2:
                sample["jpg"] = b"\xff\xd8 broken"
            tar.write(sample)


def test_img2dataset_llava_and_text_only_inputs_mix_in_one_build(tmp_path, image_folder):
    crawl = tmp_path / "crawl"
    crawl.mkdir()
    write_img2dataset_tar(crawl / "00000.tar", 4)
    llava = [{"id": "l0", "image": "rgb.jpg", "conversations": caption("<image>\nWhat is it?", "A gradient.")}]
    text = [{"id": f"t{i}", "conversations": caption(f"Say {i}.", f"{i}")} for i in range(2)]
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    (tmp_path / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in text))
    report = build_shards(options([crawl, tmp_path / "llava.json", tmp_path / "text.jsonl"], image_folder,
                                  tmp_path / "out", caption_prompt="Caption this."))
    assert (report.written, report.total("with_image"), report.total("text_only")) == (5, 3, 2)
    assert report.rejected == {"missing_caption": 1, "bad_image": 1}
    bad = next(e for e in report.shards[0].errors if e["reason"] == "bad_image")
    assert bad["message"].startswith(f"member 000000002.jpg of {crawl / '00000.tar'}: cannot decode the image: its bytes")
    metas = [json.loads(s["json"]) for s in read_samples(tmp_path / "out")]
    first = metas[0]
    assert first["conversations"] == caption("<image>\nCaption this.", "a red square number 0")
    assert first["source"] == {"file": "00000.tar", "index": 0}
    assert first["source_metadata"]["url"] == "http://example.com/0.jpg"
    assert [m["id"] for m in metas] == ["000000000", "000000003", "l0", "t0", "t1"]


def make_llava_input(tmp_path: Path, image_folder: Path, count: int) -> Path:
    records = []
    for index in range(count):
        kind = index % 5
        if kind == 0:
            records.append({"id": f"r{index}", "conversations": caption(f"Count to {index}.", "Done.")})
        elif kind == 4 and index % 3 == 0:
            records.append({"id": f"r{index}", "image": "missing.jpg", "conversations": caption("<image>\nQ", "A")})
        else:
            records.append({"id": f"r{index}", "image": "rgb.jpg" if kind % 2 else "big.png",
                            "conversations": caption("<image>\nWhat is this?", f"Answer {index}.")})
    path = tmp_path / "input.json"
    path.write_text(json.dumps(records))
    return path


def tar_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


def test_shuffled_builds_are_deterministic_across_workers_and_parts(tmp_path, image_folder):
    source = make_llava_input(tmp_path, image_folder, 60)
    serial = build_shards(options([source], image_folder, tmp_path / "serial", samples_per_shard=7, shuffle=True, seed=3))
    build_shards(options([source], image_folder, tmp_path / "parallel", samples_per_shard=7, shuffle=True, seed=3, workers=2))
    assert tar_bytes(tmp_path / "serial") == tar_bytes(tmp_path / "parallel")
    for part in (1, 0, 2):  # an array job's tasks, in any order, into one folder
        build_shards(options([source], image_folder, tmp_path / "parts", samples_per_shard=7, shuffle=True, seed=3,
                             part=part, num_parts=3))
    assert tar_bytes(tmp_path / "serial") == tar_bytes(tmp_path / "parts")
    for name in ("sizes.json", "stats.json", "errors.jsonl"):
        assert (tmp_path / "serial" / name).read_text() == (tmp_path / "parts" / name).read_text()
    ids = [json.loads(s["json"])["id"] for s in read_samples(tmp_path / "serial")]
    assert len(ids) == len(set(ids)) == serial.written == 60 - serial.rejected["missing_image"]
    assert ids != sorted(ids, key=lambda i: int(i[1:]))  # shuffled
    build_shards(options([source], image_folder, tmp_path / "other-seed", samples_per_shard=7, shuffle=True, seed=4))
    other = [json.loads(s["json"])["id"] for s in read_samples(tmp_path / "other-seed")]
    assert sorted(other) == sorted(ids) and other != ids


def test_an_unfinished_array_build_is_refused_by_name_until_its_last_part(tmp_path, image_folder, capsys):
    """Part 0 of 2 done, part 1 not yet: no sizes.json, and the loader and inspect-shards say so by name (a run
    started before the last part would otherwise train on half the data, its schedule sized to it)."""
    source = make_llava_input(tmp_path, image_folder, 40)  # 8 shards of 5: part 0 builds 0-3
    out = tmp_path / "out"
    build_shards(options([source], image_folder, out, samples_per_shard=5, part=0, num_parts=2))
    assert sorted(p.name for p in out.glob("*.tar")) == [f"00000{i}.tar" for i in range(4)]
    assert not (out / "sizes.json").exists()
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["complete"], stats["finished_shards"], stats["planned_shards"]) == (False, 4, 8)
    for spec in (out, out / "000001.tar"):
        with pytest.raises(DataError) as refused:
            discover_shards([str(spec)])
        message = str(refused.value)
        assert f"{out} holds an unfinished `vdep build-shards` build: 4 of 8 shards are finished" in message
        assert "--part K --num-parts P" in message and "--resume" in message
    assert main(["inspect-shards", str(out)]) == 1
    report = capsys.readouterr().out
    assert "an unfinished build: 4 of 8 shards are finished (the 4 shard(s) written so far are counted above)" in report
    # The build's own word refuses it: the same shards in a folder no build wrote (as img2dataset's, or hand-made),
    # listed in a sizes.json, are read.
    hand_made = tmp_path / "hand-made"
    hand_made.mkdir()
    for tar in out.glob("*.tar"):
        (hand_made / tar.name).write_bytes(tar.read_bytes())
    (hand_made / "sizes.json").write_text(json.dumps({f"00000{i}.tar": 4 for i in range(4)}))
    assert [shard.num_samples for shard in discover_shards([str(hand_made)])] == [4] * 4
    build_shards(options([source], image_folder, out, samples_per_shard=5, part=1, num_parts=2))
    assert json.loads((out / "stats.json").read_text())["complete"] is True
    sizes = json.loads((out / "sizes.json").read_text())
    assert {shard.path: shard.num_samples for shard in discover_shards([str(out)])} == \
        {str(out / name): count for name, count in sizes.items()} and len(sizes) == 8
    assert main(["inspect-shards", str(out)]) == 0
    assert "sizes.json matches the tars" in capsys.readouterr().out


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 60.0) -> None:
    """Poll until `condition()` holds, while `process` runs (a build that ends or stalls fails the test)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the build ended (status {process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f} s"
        time.sleep(0.01)


def stop(process: subprocess.Popen) -> None:
    """SIGKILL a build started with `start_new_session=True`, with any workers it left."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def fifo_readers(fifo: Path) -> list[int]:
    """Processes other than this one holding `fifo` open."""
    target, pids = os.path.realpath(fifo), []
    for link in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            if os.readlink(link) == target and int(link.parts[2]) != os.getpid():
                pids.append(int(link.parts[2]))
        except OSError:
            continue  # the process or descriptor went away meanwhile
    return sorted(set(pids))


@pytest.mark.timeout(120)
def test_resume_after_a_killed_build_gives_the_same_shards(tmp_path, image_folder):
    source = make_llava_input(tmp_path, image_folder, 400)
    records = json.loads(source.read_text())
    records[26]["image"] = "blocks.jpg"  # in shard 5 of 5-record shards
    source.write_text(json.dumps(records))
    blocking = image_folder / "blocks.jpg"
    blocking.write_bytes((image_folder / "rgb.jpg").read_bytes())
    arguments = [str(source), "--image-root", str(image_folder), "--samples-per-shard", "5", "--max-side", "40",
                 "--no-progress", "--workers", "1"]
    assert main(["build-shards", *arguments, "--out", str(tmp_path / "clean")]) == 0
    # As a named pipe that nothing writes to, the image stops the build when it reaches shard 5: the kill
    # below lands after shards 0-4 and before any later one, whatever the machine's speed.
    blocking.unlink()
    os.mkfifo(blocking)
    out = tmp_path / "crashed"
    marks = out / SHARD_STATS_DIR
    before = {f"{index:06d}.json" for index in range(5)}
    process = subprocess.Popen([sys.executable, "-m", "vdep", "build-shards", *arguments, "--out", str(out)],
                               cwd=REPO, start_new_session=True)
    try:
        wait_for(lambda: before <= {p.name for p in marks.glob("*.json")}, process, "the done marks of shards 0-4")
    finally:
        stop(process)
    assert {p.name for p in marks.glob("*.json")} == before
    assert list(out.glob("000005.tar*.tmp")), "the kill must leave shard 5 half-written"
    with pytest.raises(DataError, match="holds an unfinished `vdep build-shards` build: no part of it has finished"):
        discover_shards([str(out)])  # killed before any summary: build.json, no stats.json, no sizes.json
    blocking.unlink()
    blocking.write_bytes((image_folder / "rgb.jpg").read_bytes())
    with pytest.raises(DataError, match="--resume"):
        build_shards(options([source], image_folder, out, samples_per_shard=5, max_side=40))
    with pytest.raises(DataError, match="different settings.*samples_per_shard"):
        build_shards(options([source], image_folder, out, samples_per_shard=6, max_side=40, resume=True))
    report = build_shards(options([source], image_folder, out, samples_per_shard=5, max_side=40, resume=True))
    assert report.reused_shards == 5
    assert not list(out.rglob("*.tmp"))
    assert tar_bytes(out) == tar_bytes(tmp_path / "clean")
    for name in ("sizes.json", "stats.json", "errors.jsonl"):
        assert (out / name).read_text() == (tmp_path / "clean" / name).read_text()


def test_sample_errors_survive_pickling():
    error = pickle.loads(pickle.dumps(SampleError("bad_json", "line 4 is not valid JSON")))
    assert type(error) is SampleError and error.reason == "bad_json" and str(error) == "line 4 is not valid JSON"


@pytest.mark.timeout(120)
def test_a_malformed_jsonl_line_is_rejected_alike_by_one_and_two_workers(tmp_path, image_folder):
    """The broken line travels to a worker process as a `SampleError`; it used to kill the worker (the
    error did not unpickle) and leave the build waiting forever."""
    lines = [json.dumps({"id": f"t{i}", "conversations": caption(f"Say {i}.", f"{i}.")}) for i in range(7)]
    lines[3] = '{"id": "broken", "conversations": ['
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    for workers in (1, 2):
        assert main(["build-shards", str(tmp_path / "in.jsonl"), "--image-root", str(image_folder),
                     "--out", str(tmp_path / f"workers{workers}"), "--samples-per-shard", "2", "--workers",
                     str(workers), "--no-progress", "--max-error-rate", "0.5"]) == 0
    one, two = tmp_path / "workers1", tmp_path / "workers2"
    assert len(tar_bytes(one)) == 4 and tar_bytes(one) == tar_bytes(two)
    for name in ("sizes.json", "stats.json", "errors.jsonl"):
        assert (one / name).read_text() == (two / name).read_text()
    errors = [json.loads(line) for line in (two / "errors.jsonl").read_text().splitlines()]
    assert [(e["index"], e["id"], e["reason"]) for e in errors] == [(3, None, "bad_json")]
    assert errors[0]["message"].startswith("line 4 is not valid JSON")


@pytest.mark.timeout(120)
def test_a_worker_that_dies_ends_the_build_with_an_error(tmp_path, image_folder):
    records = [{"id": f"r{i}", "image": "blocks.jpg" if i == 2 else "rgb.jpg",
                "conversations": caption("<image>\nWhat?", f"{i}.")} for i in range(4)]
    (tmp_path / "in.json").write_text(json.dumps(records))
    blocking = image_folder / "blocks.jpg"
    os.mkfifo(blocking)
    out = tmp_path / "out"
    arguments = [str(tmp_path / "in.json"), "--image-root", str(image_folder), "--samples-per-shard", "1",
                 "--workers", "2", "--no-progress"]
    process = subprocess.Popen([sys.executable, "-m", "vdep", "build-shards", *arguments, "--out", str(out)],
                               cwd=REPO, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        writer = None

        def reader_waits() -> bool:  # our write end opens once the worker building shard 2 opens the pipe
            nonlocal writer
            try:
                writer = os.open(blocking, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                assert exc.errno == errno.ENXIO
            return writer is not None

        wait_for(reader_waits, process, "a worker reading the pipe")
        try:
            wait_for(lambda: fifo_readers(blocking), process, "the reading worker's pid")
            [worker] = fifo_readers(blocking)
            assert worker != process.pid
            os.kill(worker, signal.SIGKILL)  # as the out-of-memory killer would
        finally:
            os.close(writer)
        _, err = process.communicate(timeout=60)
    finally:
        stop(process)
    assert process.returncode == 2, err
    assert re.search(r"worker process died.*unfinished: [0-9., tar]*000002\.tar.*--resume", err), err
    assert not (out / "000002.tar").exists() and (out / f"000002.tar.{worker}.tmp").is_file()
    assert not (out / "sizes.json").exists()  # the build did not finish: no summary that looks final
    blocking.unlink()
    blocking.write_bytes((image_folder / "rgb.jpg").read_bytes())
    assert main(["build-shards", *arguments, "--out", str(out), "--resume"]) == 0
    assert not list(out.rglob("*.tmp"))
    assert main(["build-shards", *arguments, "--out", str(tmp_path / "clean")]) == 0
    assert tar_bytes(out) == tar_bytes(tmp_path / "clean") and len(tar_bytes(out)) == 4
    for name in ("sizes.json", "stats.json", "errors.jsonl"):
        assert (out / name).read_text() == (tmp_path / "clean" / name).read_text()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [1, 2])
def test_an_error_in_a_worker_ends_the_build_naming_the_shard(tmp_path, image_folder, workers):
    records = [{"id": f"t{i}", "conversations": caption(f"Say {i}.", f"{i}.")} for i in range(4)]
    (tmp_path / "in.json").write_text(json.dumps(records))
    out = tmp_path / "out"
    (out / SHARD_STATS_DIR / "000001.json").mkdir(parents=True)  # shard 1's done mark cannot be written
    with pytest.raises(IsADirectoryError) as raised:
        main(["build-shards", str(tmp_path / "in.json"), "--out", str(out), "--samples-per-shard", "1",
              "--workers", str(workers), "--no-progress"])
    assert any("shard 000001.tar" in note for note in getattr(raised.value, "__notes__", [])), raised.value
    assert not (out / "sizes.json").exists()


def test_progress_is_a_tqdm_bar_that_does_not_flood_a_log(tmp_path, image_folder, capsys):
    source = make_llava_input(tmp_path, image_folder, 30)
    build_shards(BuildOptions([source], image_folder, tmp_path / "out", samples_per_shard=2))
    updates = [line for line in re.split(r"[\r\n]", capsys.readouterr().err) if line.strip()]
    assert 1 <= len(updates) <= 2, updates  # stderr is not a terminal: the first and the last state only
    assert re.match(r"build-shards: 100%\|.*\| 30/30 .*records/s.*kept=28", updates[-1]), updates
    build_shards(BuildOptions([source], image_folder, tmp_path / "quiet", samples_per_shard=2, progress=False))
    assert capsys.readouterr().err == ""


def test_the_console_names_the_first_rejected_records(tmp_path, image_folder, capsys):
    records = [{"id": "ok", "image": "rgb.jpg", "conversations": caption("<image>\nQ", "A")}] + [
        {"id": f"bad{i}", "image": "notes.png", "conversations": caption("<image>\nQ", "A")} for i in range(7)
    ]
    (tmp_path / "in.json").write_text(json.dumps(records))
    assert main(["build-shards", str(tmp_path / "in.json"), "--image-root", str(image_folder), "--no-progress",
                 "--out", str(tmp_path / "out"), "--max-error-rate", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"  {tmp_path / 'in.json'} record 1 (id bad0): notes.png: cannot decode the image: its bytes" in lines[2]
    assert lines[2].endswith("[bad_image]") and "BytesIO" not in lines[2]
    assert len(lines) == 2 + 5 + 1 and lines[-1] == "  ... and 2 more"  # the rest are in errors.jsonl


def test_exit_status_follows_the_error_rate(tmp_path, image_folder, capsys):
    records = [{"id": "ok", "conversations": caption("Q", "A")}] + [
        {"id": f"bad{i}", "image": "missing.jpg", "conversations": caption("<image>\nQ", "A")} for i in range(3)
    ]
    (tmp_path / "in.json").write_text(json.dumps(records))
    base = ["build-shards", str(tmp_path / "in.json"), "--image-root", str(image_folder), "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "strict")]) == 1
    assert "75.00% of the records were rejected" in capsys.readouterr().err
    assert (tmp_path / "strict" / "000000.tar").is_file()  # written anyway: nothing is lost
    assert main([*base, "--out", str(tmp_path / "lenient"), "--max-error-rate", "0.8"]) == 0
    (tmp_path / "none.json").write_text(json.dumps(records[1:]))
    assert main(["build-shards", str(tmp_path / "none.json"), "--image-root", str(image_folder), "--no-progress",
                 "--out", str(tmp_path / "empty"), "--max-error-rate", "1"]) == 1
    assert "no sample was accepted" in capsys.readouterr().err
    assert main(["build-shards", str(tmp_path / "nope.json"), "--out", str(tmp_path / "x")]) == 2
    assert "nope.json does not exist" in capsys.readouterr().err


def test_inspect_shards_counts_checks_sizes_and_measures_token_lengths(tmp_path, image_folder, small_data, capsys):
    source = make_llava_input(tmp_path, image_folder, 30)
    build_shards(options([source], image_folder, tmp_path / "out", samples_per_shard=8))
    encode = make_length_encoder(str(small_data.tokenizer), "vicuna_v1", num_image_tokens=16)
    report = inspect_shards(tmp_path / "out", encode)
    assert report.ok and report.samples == 28 and (report.with_image, report.text_only) == (22, 6)
    assert len(report.lengths) == 28 and min(report.lengths) > 16  # image samples include 16 placeholders
    assert main(["inspect-shards", str(tmp_path / "out")]) == 0
    assert "sizes.json matches the tars" in capsys.readouterr().out
    sizes = json.loads((tmp_path / "out" / "sizes.json").read_text())
    sizes["000001.tar"] += 1
    (tmp_path / "out" / "sizes.json").write_text(json.dumps(sizes))
    os.remove(tmp_path / "out" / "000002.tar")
    assert main(["inspect-shards", str(tmp_path / "out")]) == 1
    output = capsys.readouterr().out
    assert f"000001.tar holds {sizes['000001.tar'] - 1} samples but sizes.json says {sizes['000001.tar']}" in output
    assert "000002.tar is listed in sizes.json but missing" in output


def test_parts_built_at_the_same_time_into_one_folder_equal_one_build(tmp_path, image_folder):
    """Array tasks start together: none may touch another's temporary files."""
    source = make_llava_input(tmp_path, image_folder, 300)
    arguments = [str(source), "--image-root", str(image_folder), "--samples-per-shard", "5", "--shuffle",
                 "--max-side", "40", "--no-progress", "--max-error-rate", "1"]
    assert main(["build-shards", *arguments, "--out", str(tmp_path / "one")]) == 0
    out = tmp_path / "parts"
    processes = [subprocess.Popen([sys.executable, "-m", "vdep", "build-shards", *arguments, "--out", str(out),
                                   "--part", str(part), "--num-parts", "4"], cwd=REPO, stderr=subprocess.PIPE, text=True)
                 for part in range(4)]
    for process in processes:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-2000:]
    assert build_shards(options([source], image_folder, out, samples_per_shard=5, shuffle=True, max_side=40,
                                resume=True, max_error_rate=1)).reused_shards == 60
    assert tar_bytes(out) == tar_bytes(tmp_path / "one")
    assert not [p for p in out.rglob("*.tmp")]


def test_a_part_removes_only_the_temporary_files_of_its_own_shards(tmp_path, image_folder):
    """Left by killed writers (temporary names carry the writer's pid); another part's may be in use."""
    source = make_llava_input(tmp_path, image_folder, 20)  # 4 shards of 5: part 1 of 2 builds shards 2 and 3
    out = tmp_path / "out"
    mine = [out / "000002.tar.4242.tmp", out / "000003.tar.tmp", out / SHARD_STATS_DIR / "000003.json.4242.tmp"]
    theirs = [out / "000000.tar.4343.tmp", out / "000001.tar.tmp", out / SHARD_STATS_DIR / "000001.json.4343.tmp"]
    for path in mine + theirs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a file")
    build_shards(options([source], image_folder, out, samples_per_shard=5, part=1, num_parts=2))
    assert [p.name for p in mine if p.exists()] == [] and all(p.exists() for p in theirs)
    assert sorted(p.name for p in out.glob("*.tar")) == ["000002.tar", "000003.tar"]
