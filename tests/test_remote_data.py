"""Shards read from real servers on 127.0.0.1 (nginx with Range, an S3 API server, a faulty server of
our own): the same batches as from disk, transport faults retried and never counted as bad data, and a
restored position that reads only what was not consumed."""

from __future__ import annotations

import itertools
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest

from tests.helpers import batch_fingerprint, make_loader, unconsumed_bytes
from tests.remote_servers import Faults, FaultyHTTP
from vdep.data.loader import DataPosition
from vdep.data.remote import MissingShardError, RemoteSettings, TransportError
from vdep.data.shards import discover_shards
from vdep.errors import DataError

FAST = RemoteSettings(retries=4, backoff_s=0.01, max_backoff_s=0.05, request_mb=0.05)  # 52 KB requests


def fingerprints(loader, epoch: int = 0, position: DataPosition | None = None) -> list:
    return [batch_fingerprint(b) for b in loader.micro_batches(epoch, position)]


@pytest.mark.parametrize("split", ["shards", "samples"])
def test_http_and_s3_shards_give_the_batches_of_local_ones(small_data, tokenizer, nginx, s3, split):
    local = fingerprints(make_loader(small_data, tokenizer, 1, 2, split, micro=3, seed=2))
    for prefix in (f"{nginx.url}/finetune/", "s3://shards/finetune"):
        remote = make_loader(small_data, tokenizer, 1, 2, split, micro=3, seed=2, shard_dir=prefix, remote=FAST)
        assert fingerprints(remote) == local, prefix


def test_dropped_connections_503s_and_429s_change_neither_the_batches_nor_the_skip_counts(small_data, tokenizer,
                                                                                          served):
    local = fingerprints(make_loader(small_data, tokenizer, 0, 1, "shards", micro=4, seed=1, workers=2))
    # Request 1 reads sizes.json; then shard sizes and ranges: cut several bodies part-way, refuse others,
    # throttle some (429, as an object store answers a reader that asks too fast).
    faults = Faults(unavailable={4, 9, 10, 17}, throttled={6, 14, 23},
                    drop_after={5: 1000, 8: 0, 12: 30000, 20: 512, 26: 7})
    server = FaultyHTTP(served, faults).start()
    # Two workers and their read-ahead threads share the request numbers, so one range can meet several faults
    # in a row (CI once saw 5: 503, drop, 503, drop, 429): retries enough for every fault keeps the test about
    # the bytes, not about how the requests interleave.
    patient = replace(FAST, retries=len(faults.unavailable) + len(faults.throttled) + len(faults.drop_after))
    try:
        remote = make_loader(small_data, tokenizer, 0, 1, "shards", micro=4, seed=1, workers=2,
                             shard_dir=f"{server.url}/finetune", remote=patient)
        assert fingerprints(remote) == local  # the skip counts are part of each fingerprint
        assert all(not f[5] for f in local)
        assert server.requests > 26  # every scheduled fault was met
    finally:
        server.stop()


def test_a_transport_failure_that_outlasts_the_retries_stops_with_the_url_and_cause(small_data, tokenizer, served):
    server = FaultyHTTP(served, Faults(unavailable=set(range(3, 1000)))).start()
    try:
        loader = make_loader(small_data, tokenizer, 0, 1, "shards", micro=4, shard_dir=f"{server.url}/finetune",
                             remote=FAST)
        with pytest.raises(TransportError) as raised:
            next(iter(loader.micro_batches(0)))
        message = str(raised.value)
        assert f"{server.url}/finetune/0000" in message and "failed 5 times" in message and "503" in message
        assert "was not skipped" in message
    finally:
        server.stop()


def test_a_stalled_request_is_retried_after_data_remote_timeout_s(served):
    """The server sends a range's headers, then nothing for 30 s: after timeout_s (1 s) the request is a
    transport fault, retried, and the read completes with the file's bytes, in about the timeout (aiohttp's
    own default would wait 300 s)."""
    from vdep.data.remote import open_remote

    shard = served / "finetune" / "000000.tar"
    server = FaultyHTTP(served, Faults(stall={2: 30.0, 5: 30.0})).start()  # 1: the size; 2...: the ranges
    patient = replace(FAST, timeout_s=1.0)
    try:
        started = time.monotonic()
        with open_remote(f"{server.url}/finetune/{shard.name}", patient) as stream:
            data = b"".join(iter(lambda: stream.read(4096), b""))  # as the tar reader reads: buffer fills
        elapsed = time.monotonic() - started
        assert data == shard.read_bytes()
        assert 2.0 <= elapsed < 8.0, elapsed  # two stalls, each given up after 1 s
        assert server.requests == 1 + -(-len(data) // patient.request_bytes) + 2  # every range, 2 of them twice
    finally:
        server.stop()


def test_a_stalled_s3_request_is_given_up_after_data_remote_timeout_s(served, s3):
    """The same through s3fs: the first connection to the S3 server answers nothing for 30 s; botocore's
    read timeout (timeout_s, where s3fs's own default is 15 s) gives it up and the read completes."""
    from tests.remote_servers import StallingProxy
    from vdep.data.remote import open_remote

    shard = served / "finetune" / "000001.tar"
    proxy = StallingProxy(s3.port, {1: 30.0}).start()
    settings = replace(FAST, timeout_s=1.0, storage_options={"endpoint_url": proxy.url, "skip_instance_cache": True})
    try:
        started = time.monotonic()
        with open_remote(f"s3://shards/finetune/{shard.name}", settings) as stream:
            data = b"".join(iter(lambda: stream.read(4096), b""))
        elapsed = time.monotonic() - started
        assert data == shard.read_bytes()
        assert proxy.connections >= 2  # the stalled one, given up, and a fresh one
        assert 1.0 <= elapsed < 8.0, elapsed
    finally:
        proxy.stop()


def test_a_resume_may_change_how_remote_data_is_fetched_but_not_where_from(small_data, tmp_path, caplog):
    """A TransportError says to raise data.remote.retries and run the same command: the resume checks of
    that run directory accept it (and the other transport settings); another store is refused by name."""
    import logging

    from vdep.config import load_config
    from vdep.errors import CheckpointError
    from vdep.rundir import RunDir
    from vdep.train.prepare import check_resume_changes, save_resolved_config

    run_dir = tmp_path / "run"
    remote = ["stages.finetune.shards=[s3://bucket/shards/]"]
    save_resolved_config(load_config("demo-tiny", small_data.overrides(run_dir) + remote), RunDir(run_dir))
    patient = ["data.remote.retries=20", "data.remote.backoff_s=2", "data.remote.max_backoff_s=120",
               "data.remote.request_mb=32", "data.remote.timeout_s=300"]
    with caplog.at_level(logging.INFO):
        check_resume_changes(RunDir(run_dir), load_config("demo-tiny", small_data.overrides(run_dir) + remote + patient))
    assert "resume: data.remote.retries changed from 8 to 20" in caplog.text
    assert "resume: data.remote.timeout_s changed from 60.0 to 300.0" in caplog.text
    elsewhere = ["data.remote.storage_options={endpoint_url: 'http://10.0.0.5:9000'}"]
    with pytest.raises(CheckpointError) as refused:
        check_resume_changes(RunDir(run_dir), load_config("demo-tiny", small_data.overrides(run_dir) + remote + patient
                                                          + elsewhere))
    message = str(refused.value)
    assert "data.remote.storage_options.endpoint_url: None → 'http://10.0.0.5:9000'" in message
    assert "data.remote.retries" not in message.partition("(only")[0]  # refused for the store alone


def test_request_timeouts_are_set_by_data_remote_timeout_s_only(small_data, tmp_path):
    from vdep.config import load_config
    from vdep.errors import ConfigError

    base = small_data.overrides(tmp_path / "run")
    with pytest.raises(ConfigError, match="sets client_kwargs.timeout: the request timeout is data.remote.timeout_s"):
        load_config("demo-tiny", base + ["data.remote.storage_options={client_kwargs: {timeout: 5}}"])
    with pytest.raises(ConfigError, match="sets config_kwargs.read_timeout"):
        load_config("demo-tiny", base + ["data.remote.storage_options={config_kwargs: {read_timeout: 5}}"])
    with pytest.raises(ConfigError, match="timeout_s and request_mb positive"):
        load_config("demo-tiny", base + ["data.remote.timeout_s=0"])


def test_a_shard_the_manifest_names_but_the_server_lacks_is_an_error_not_a_skip(small_data, tokenizer, served,
                                                                                  nginx, tmp_path):
    root = tmp_path / "www"
    shutil.copytree(served / "finetune", root / "finetune")
    (root / "finetune" / "000002.tar").unlink()
    server = FaultyHTTP(root).start()
    try:
        loader = make_loader(small_data, tokenizer, 0, 1, "shards", micro=4, shard_dir=f"{server.url}/finetune",
                             remote=FAST)
        with pytest.raises(MissingShardError, match="000002.tar.*does it exist"):
            list(loader.micro_batches(0))
    finally:
        server.stop()
    with pytest.raises(DataError, match="has no sizes.json.*upload the one `vdep build-shards` wrote"):
        make_loader(small_data, tokenizer, 0, 1, "shards", shard_dir=f"{nginx.url}/no-sizes", remote=FAST)


@pytest.mark.parametrize("grouped", [False, True])
def test_a_restored_position_reads_only_the_bytes_not_yet_consumed(small_data, tokenizer, served, grouped):
    """Position taken mid-shard; the restored loader asks the server for the unconsumed samples only:
    the shuffle buffer's and the carried ones by range, then the plan on from its byte."""
    settings = {"micro": 2, "seed": 3, "workers": 2, "shuffle_buffer": 6}
    if grouped:  # the grouping windows carry samples: they are read again, by range
        settings.update(group_by_modality_length=True, group_window=3)
    server = FaultyHTTP(served).start()
    try:
        prefix = f"{server.url}/finetune"
        loader = make_loader(small_data, tokenizer, 0, 1, "shards", shard_dir=prefix, remote=FAST, **settings)
        full_start = server.body_bytes
        uninterrupted = fingerprints(loader)
        full = server.settle().body_bytes - full_start
        consumed = 7
        position = DataPosition(0)
        for batch in itertools.islice(loader.micro_batches(0), consumed):
            position.advance(batch, loader.workers)
        position = DataPosition.from_json(json.loads(json.dumps(position.to_json())))  # as a checkpoint holds it
        unconsumed, trailers, gaps = unconsumed_bytes(position, loader.consumer_plans(0), served / "finetune",
                                                      FAST.request_bytes)
    finally:
        server.stop()  # (its loader's workers may still be prefetching: the restored run gets a server of its own)
    server = FaultyHTTP(served).start()
    try:
        restored = fingerprints(make_loader(small_data, tokenizer, 0, 1, "shards", shard_dir=f"{server.url}/finetune",
                                            remote=FAST, **settings), 0, position)
        assert restored == uninterrupted[consumed:]
        server.settle()
        # The waiting samples are read in spans that take in gaps below one request (docs/design.md): those
        # consumed bytes may be read again, no others.
        assert unconsumed <= server.body_bytes <= unconsumed + trailers + gaps
        assert unconsumed + trailers + gaps < full  # so the consumed samples further apart are not read again
    finally:
        server.stop()


@pytest.mark.parametrize("stride", [1, 2])  # whole shards, or every other sample (data.split=samples)
def test_a_restore_reads_the_shuffle_buffer_in_a_few_requests_per_shard_not_two_per_sample(served, stride):
    """A consumer's shuffle buffer, restored from a remote prefix: the same stream on, and its samples read
    in spans per shard (a few requests per shard), where a request per sample and a size request each cost
    2 × the buffer's samples."""
    from vdep.data.shards import ConsumerPlan
    from vdep.data.stream import ShardEvents, ShuffledStream

    def stream(url: str, state=None) -> ShuffledStream:
        plan = ConsumerPlan(tuple(discover_shards([url], FAST)), stride, stride - 1)
        events = ShardEvents(lambda *a: pytest.fail(f"corrupt: {a}"), lambda *a: pytest.fail(f"short: {a}"))
        before = server.requests  # (discovery's)
        built = ShuffledStream(plan, FAST, 24 // stride, "seed", events, state)
        built.requests = server.requests - before  # type: ignore[attr-defined]
        return built

    def keys(samples) -> list:
        return [(s["__key__"], s["__ref__"], s.get("json")) for s in samples]

    server = FaultyHTTP(served).start()
    try:
        uninterrupted = keys(stream(f"{server.url}/finetune"))
        consumed = stream(f"{server.url}/finetune")
        head = keys(itertools.islice(consumed, 36 // stride - 4))
        state = consumed.state()
    finally:
        server.stop()
    assert len(state.buffer) == 24 // stride and not state.draining and len({ref.shard for ref in state.buffer}) >= 2
    server = FaultyHTTP(served).start()
    try:
        restored = stream(f"{server.url}/finetune", state)
        restore_requests = restored.requests  # type: ignore[attr-defined]
        assert head + keys(restored) == uninterrupted
    finally:
        server.stop()
    spans = {ref.shard: (min(r.start for r in state.buffer if r.shard == ref.shard),
                         max(r.end for r in state.buffer if r.shard == ref.shard)) for ref in state.buffer}
    # At most one request per request_mb of each shard's span (the samples and the gaps between them).
    bound = sum(-(-(end - start) // FAST.request_bytes) for start, end in spans.values())
    assert restore_requests <= bound < 2 * len(state.buffer)


# ---------------------------------------------------------------------------------- the shard tools
def bucket_files(prefix: str) -> dict[str, bytes]:
    """A bucket prefix's summaries and shards, by name (the done marks hold timings: left out)."""
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    names = [path.rsplit("/", 1)[-1] for path in fs.glob(prefix + "/*")]
    return {name: fs.cat_file(f"{prefix}/{name}") for name in names if name.endswith((".tar", ".json", ".jsonl"))
            and name != "build.json"}


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != "build.json"}


def test_build_shards_into_a_bucket_equals_a_local_build_in_parts_and_on_resume(small_data, s3, tmp_path, capsys):
    import fsspec

    from vdep.cli import main
    from vdep.data_tools.inspect_shards import inspect_shards

    arguments = [str(small_data.raw / "finetune.json"), "--image-root", str(small_data.raw / "images"),
                 "--samples-per-shard", "10", "--shuffle", "--no-progress", "--staging", str(tmp_path / "staging")]
    assert main(["build-shards", *arguments, "--out", str(tmp_path / "local")]) == 0
    expected = folder_files(tmp_path / "local")
    assert main(["build-shards", *arguments, "--out", "s3://shards/built", "--workers", "2"]) == 0
    assert bucket_files("s3://shards/built") == expected
    # Every staged file was uploaded and removed, and the staging areas of the build and its 2 workers went.
    assert not list((tmp_path / "staging").rglob("*"))
    for part in (1, 0):  # an array job's two tasks, into one prefix
        assert main(["build-shards", *arguments, "--out", "s3://shards/parts", "--part", str(part), "--num-parts", "2"]) == 0
        if part == 1:  # half the plan is there: no sizes.json, and the prefix is refused by name until part 0 is
            assert "sizes.json" not in bucket_files("s3://shards/parts")
            with pytest.raises(DataError, match=r"s3://shards/parts holds an unfinished `vdep build-shards` build: "
                                                r"4 of 7 shards are finished"):
                discover_shards(["s3://shards/parts"], FAST)
            assert inspect_shards("s3://shards/parts").unfinished.startswith("4 of 7 shards are finished")
    assert bucket_files("s3://shards/parts") == expected
    # As after a crash: one shard uploaded without its done mark, another's object gone with its mark left.
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.rm("s3://shards/built/shard_stats/000002.json")
    fs.rm("s3://shards/built/000004.tar")
    assert main(["build-shards", *arguments, "--out", "s3://shards/built", "--resume"]) == 0
    assert bucket_files("s3://shards/built") == expected
    assert main(["build-shards", *arguments, "--out", "s3://shards/built"]) == 2
    assert "s3://shards/built already holds a build" in capsys.readouterr().err


@pytest.mark.timeout(180)
def test_a_build_killed_mid_upload_leaves_no_staged_file_after_its_resume(small_data, s3, tmp_path):
    """SIGKILLed while the upload of shard 2's done mark waits for its answer (the S3 server has stored it;
    the staged copy is not removed yet), then resumed with --resume: the killed process's staging area goes
    (shard 2 is done, so nothing rebuilds it), the staging folder ends empty, and the prefix equals a
    local build."""
    import os
    import signal
    import subprocess
    import sys

    import fsspec

    from tests.remote_servers import StallingProxy
    from vdep.cli import main

    staging = tmp_path / "staging"
    arguments = [str(small_data.raw / "finetune.json"), "--image-root", str(small_data.raw / "images"),
                 "--samples-per-shard", "10", "--shuffle", "--no-progress", "--staging", str(staging)]
    assert main(["build-shards", *arguments, "--out", str(tmp_path / "local")]) == 0
    proxy = StallingProxy(s3.port, hold=rb"PUT /shards/killed/shard_stats/000002\.json ").start()
    process = subprocess.Popen([sys.executable, "-m", "vdep", "build-shards", *arguments, "--out", "s3://shards/killed"],
                               cwd=Path(__file__).resolve().parents[1], start_new_session=True,
                               env={**os.environ, "AWS_ENDPOINT_URL": proxy.url})
    try:
        deadline = time.monotonic() + 120
        while not proxy.held.wait(0.05):
            assert process.poll() is None, f"the build ended (status {process.returncode}) before the held upload"
            assert time.monotonic() < deadline, "the upload of shard 2's done mark never came"
        time.sleep(0.2)  # the build waits for the answer
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        proxy.stop()
    staged = [p.relative_to(staging) for p in staging.rglob("*") if p.is_file()]
    assert [p for p in staged if p.name == "000002.json"], staged  # the killed build's: uploaded, not yet removed
    assert fsspec.filesystem("s3", skip_instance_cache=True).exists("s3://shards/killed/shard_stats/000002.json")
    assert main(["build-shards", *arguments, "--out", "s3://shards/killed", "--resume"]) == 0
    assert not list(staging.rglob("*")), list(staging.rglob("*"))
    assert bucket_files("s3://shards/killed") == folder_files(tmp_path / "local")


def test_inspect_shards_and_make_tokenizer_read_remote_prefixes_like_folders(small_data, nginx, s3, tmp_path):
    from vdep.data_tools.inspect_shards import format_report, inspect_shards
    from vdep.data_tools.make_tokenizer import make_tokenizer

    local = format_report(inspect_shards(small_data.finetune_shards))
    assert "sizes.json matches the tars" in local
    for prefix in (f"{nginx.url}/finetune", "s3://shards/finetune"):
        assert format_report(inspect_shards(prefix)) == local.replace(str(small_data.finetune_shards), prefix)
    make_tokenizer([str(small_data.finetune_shards)], 400, tmp_path / "local")
    make_tokenizer([f"{nginx.url}/finetune"], 400, tmp_path / "remote")
    assert (tmp_path / "local" / "tokenizer.model").read_bytes() == (tmp_path / "remote" / "tokenizer.model").read_bytes()
