"""`run.report_to`: the same scalars in TensorBoard, wandb and MLflow as in metrics.jsonl, across a resume,
with loss alerts in every backend, and credentials kept out of the config.

No network: wandb runs with WANDB_MODE=offline (its .wandb files are read back below), MLflow with a local
file store (MLFLOW_ALLOW_FILE_STORE: MLflow 3 keeps that store only on request). The runs are real: 1 rank,
ZeRO-2, fp32 on CPU, stopped by a signal or killed, then resumed.
"""

from __future__ import annotations

import json
import math
import re
import signal
import statistics
import struct
import sys
import time
import zlib
from pathlib import Path

import pytest

from tests.conftest import read_metrics
from vdep.config import find_recipe, load_config
from vdep.errors import EXIT_PREEMPTED, ConfigError
from vdep.train.launch import launch_local, start_local_ranks, wait_for_ranks
from vdep.train.metrics import LossAlarm

STEPS = 8
SPIKE_FACTOR, SPIKE_WINDOW = 1.05, 2  # tight, so that the real losses below rise past it


def train_args(small_data, run_dir: Path, report_to: str, *extra: str) -> list[str]:
    return [
        "train", "demo-tiny", *small_data.overrides(run_dir), "stage=finetune", "stages.finetune.init_from=none",
        "stages.finetune.zero=zero2", f"stages.finetune.max_steps={STEPS}", "stages.finetune.save_every=2",
        "stages.finetune.global_batch_size=8", "stages.finetune.micro_batch_size=4",
        # A high learning rate, so that the loss rises now and then: real spikes for the alarm.
        "stages.finetune.lr=0.03", "run.log_every=1", f"run.report_to={report_to}",
        f"run.mlflow.tracking_uri=file:{run_dir.parent / 'mlruns'}", "run.mlflow.experiment=tests",
        "run.wandb.project=tests", f"run.alerts.spike_factor={SPIKE_FACTOR}", f"run.alerts.spike_window={SPIKE_WINDOW}",
        *extra,
    ]


def offline_env(faults: str = "") -> dict[str, str]:
    env = {"WANDB_MODE": "offline", "MLFLOW_ALLOW_FILE_STORE": "true"}
    if faults:
        env["VDEP_INJECT_FAULTS"] = faults
    return env


# ------------------------------------------------------------------------------------- reading back
def jsonl_values(run_dir: Path) -> dict[str, dict[int, float]]:
    """metrics.jsonl as key → step → value; no key twice at a step."""
    values: dict[str, dict[int, float]] = {}
    for record in read_metrics(run_dir, "finetune"):
        step = record.pop("step")
        record.pop("time")  # when the line was written: bookkeeping of metrics.jsonl, not a scalar
        for key, value in record.items():
            assert step not in values.setdefault(key, {}), f"metrics.jsonl: {key} twice at step {step}"
            values[key][step] = value
    return values


def same(a: float, b: float, rel: float = 0.0) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=rel, abs=0 if rel == 0 else 1e-12)


def assert_curves(backend: str, held: dict[str, list[tuple[int, float]]], expected: dict[str, dict[int, float]],
                  rel: float = 0.0, steps: set[int] | None = None) -> None:
    """Each key of `expected` holds each of its steps once (those in `steps`, if given), with its value."""
    for key, by_step in expected.items():
        want = {s: v for s, v in by_step.items() if steps is None or s in steps}
        points = held.get(key, [])
        got_steps = [step for step, _ in points]
        assert sorted(got_steps) == sorted(want), f"{backend}: {key} at steps {sorted(got_steps)}, not {sorted(want)}"
        for step, value in points:
            assert same(value, want[step], rel), f"{backend}: {key} at step {step} is {value}, not {want[step]}"


def tensorboard_curves(run_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard" / "finetune"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    curves = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    alerts = [e.step for e in events.Tensors("alerts/text_summary")] if "alerts/text_summary" in events.Tags()["tensors"] else []
    return curves, alerts


def mlflow_runs(run_dir: Path) -> list:
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"file:{run_dir.parent / 'mlruns'}")
    experiment = client.get_experiment_by_name("tests")
    return client.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL)


def mlflow_curves(run_dir: Path, run_id: str) -> dict[str, list[tuple[int, float]]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"file:{run_dir.parent / 'mlruns'}")
    keys = client.get_run(run_id).data.metrics
    return {key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)] for key in keys}


def wandb_records(path: Path) -> list:
    """The records of a .wandb file: wandb's own protobuf `Record`s, framed as a LevelDB log (32 KiB blocks of
    checksummed chunks, after a 7-byte header). wandb 0.31 ships no Python reader of its own any more."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:7] == struct.pack("<4sHB", b":W&B", 0xBEE1, 0), f"{path}: not a .wandb file"
    records, pending, at = [], b"", 7
    while at + 7 <= len(data):
        if 32768 - at % 32768 < 7:  # a block's tail too short for a chunk header is padding
            at += 32768 - at % 32768
            continue
        checksum, length, kind = struct.unpack("<IHB", data[at:at + 7])
        chunk = data[at + 7:at + 7 + length]
        if kind == 0 or len(chunk) < length:  # zeros after the last flush
            break
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == checksum, f"{path}: corrupt chunk at byte {at}"
        at += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL, FIRST; MIDDLE, LAST
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_segments(run_dir: Path) -> list[dict]:
    """Each offline run folder of the stage (one per attempt, in order): its run id, history and alerts."""
    segments = []
    for folder in sorted((run_dir / "finetune" / "wandb").glob("offline-run-*")):
        (file,) = folder.glob("run-*.wandb")
        # The folder is named for the run at init; the file holds what wandb flushed (every 15 s), which for an
        # attempt killed early may not include even the run record.
        segment: dict = {"id": folder.name.rpartition("-")[2], "history": {}, "alerts": []}
        for record in wandb_records(file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                assert record.run.run_id == segment["id"], f"{file}: run {record.run.run_id} in {folder.name}"
            elif kind == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                segment["history"][int(row["_step"])] = {k: v for k, v in row.items() if not k.startswith("_")}
            elif kind == "alert":
                segment["alerts"].append(record.alert.text)
        segments.append(segment)
    return segments


def wandb_curves(segments: list[dict]) -> dict[str, list[tuple[int, float]]]:
    curves: dict[str, list[tuple[int, float]]] = {}
    for segment in segments:
        for step, row in segment["history"].items():
            for key, value in row.items():
                curves.setdefault(key, []).append((step, float(value)))
    return curves


def alert_steps(texts: list[str]) -> list[int]:
    return sorted(int(re.search(r"at step (\d+)", text).group(1)) for text in texts)


def expected_alerts(values: dict[str, dict[int, float]]) -> list[int]:
    """The steps the alarm's definition picks, computed here from the logged values: a non-finite loss or
    gradient norm, or
    loss/total above SPIKE_FACTOR times the median of the previous SPIKE_WINDOW finite values."""
    alerts, previous = [], []
    for step, loss in sorted(values["loss/total"].items()):
        if any(not math.isfinite(v[step]) for k, v in values.items()
               if (k.startswith("loss/") or k == "grad_norm") and step in v):
            alerts.append(step)
            continue
        window = previous[-SPIKE_WINDOW:]
        if len(window) == SPIKE_WINDOW and loss > SPIKE_FACTOR * statistics.median(window):
            alerts.append(step)
        previous.append(loss)
    return alerts


# ------------------------------------------------------------------------------------------- config
def test_report_to_names_known_backends(small_data, tmp_path):
    base = small_data.overrides(tmp_path / "run")
    assert load_config("demo-tiny", base).run.report_to == ["tensorboard"]
    assert load_config("demo-tiny", [*base, "run.report_to=[]"]).run.report_to == []
    assert load_config("demo-tiny", [*base, "run.report_to=wandb"]).run.report_to == ["wandb"]
    with pytest.raises(ConfigError, match=r"run.report_to.*unknown backend 'wandbb' \(did you mean 'wandb'\?\); "
                                          r"choose from tensorboard, wandb, mlflow"):
        load_config("demo-tiny", [*base, "run.report_to=[tensorboard,wandbb]"])
    with pytest.raises(ConfigError, match="lists 'mlflow' twice"):
        load_config("demo-tiny", [*base, "run.report_to=[mlflow,mlflow]"])
    with pytest.raises(ConfigError, match=r"run.alerts.spike_factor.*must be above 1"):
        load_config("demo-tiny", [*base, "run.alerts.spike_factor=1"])


def test_a_credential_in_the_config_is_refused_by_name_without_echoing_it(small_data, tmp_path):
    base = small_data.overrides(tmp_path / "run")
    secret = "0123456789abcdef0123456789abcdef01234567"
    recipe = tmp_path / "recipe.yaml"
    source = find_recipe("demo-tiny").read_text()
    recipe.write_text(source + f"\n  wandb:\n    project: p\n    api_key: {secret}\n")
    with pytest.raises(ConfigError, match=r"'run.wandb.api_key' in .*recipe.yaml: credentials never go into a config.*"
                                          r"WANDB_API_KEY") as raised:
        load_config(str(recipe), base)
    assert secret not in str(raised.value)
    for override, variable in (
        (f"run.mlflow.token={secret}", "MLFLOW_TRACKING_TOKEN"),
        (f"run.mlflow.tags.password={secret}", "MLFLOW_TRACKING_PASSWORD"),
        (f"run.wandb.api-key={secret}", "WANDB_API_KEY"),
    ):
        with pytest.raises(ConfigError, match=f"override of '{override.partition('=')[0]}'.*{variable}") as raised:
            load_config("demo-tiny", [*base, override])
        assert secret not in str(raised.value)
    with pytest.raises(ConfigError, match=r"run.mlflow.tracking_uri.*holds a password") as raised:
        load_config("demo-tiny", [*base, f"run.mlflow.tracking_uri=https://me:{secret}@mlflow.example.com"])
    assert secret not in str(raised.value)
    with pytest.raises(ConfigError, match=r"'run.mlflow.tags.auth_token' \(from the command-line override of "
                                          r"'run.mlflow.tags'\): credentials never") as raised:
        load_config("demo-tiny", [*base, f"run.mlflow.tags={{auth_token: {secret}}}"])
    assert secret not in str(raised.value)
    # Names that only contain a credential's name are settings like any other.
    config = load_config("demo-tiny", [*base, "run.mlflow.tags={tokenizer: llama, keyword: x}",
                                       "run.mlflow.tracking_uri=https://me@mlflow.example.com"])
    assert config.run.mlflow.tags == {"tokenizer": "llama", "keyword": "x"}


@pytest.mark.parametrize("backend", ["wandb", "mlflow"])
def test_a_backend_whose_package_is_missing_fails_before_training(small_data, tmp_path, monkeypatch, backend):
    base = small_data.overrides(tmp_path / "run")
    load_config("demo-tiny", [*base, f"run.report_to=[{backend}]"])  # installed here
    monkeypatch.setitem(sys.modules, backend, None)  # Python's own mark of a module that cannot be imported
    with pytest.raises(ConfigError, match=rf"lists {backend}, but the {backend} package is not installed .*"
                                          rf"pip install 'vdep\[{backend}\]'"):
        load_config("demo-tiny", [*base, f"run.report_to=[tensorboard,{backend}]"])
    load_config("demo-tiny", [*base, f"run.report_to=[tensorboard,{backend}]"], files=False)  # --print-config


def test_loss_alarm_window_and_factor():
    alarm = LossAlarm(factor=2.0, window=3)
    # While the window fills, nothing is a spike (2.5 is above 2 × the median of 1, 1).
    assert [alarm.check(s, {"loss/total": v}) for s, v in enumerate([1.0, 1.0, 2.5], 1)] == [None] * 3
    assert alarm.check(4, {"loss/total": 2.0}) is None  # exactly factor × median(1, 1, 2.5) is not above it
    assert alarm.check(5, {"loss/total": 4.0}) is None  # the window moved on: 2 × median(1, 2.5, 2) = 4
    assert "loss spike at step 6: loss/total = 5.1" in alarm.check(6, {"loss/total": 5.1})  # median(2.5, 2, 4)
    text = alarm.check(7, {"loss/total": 1.0, "grad_norm": float("inf"), "loss/vdep": float("nan")})
    assert text == "non-finite loss or gradient norm at step 7: grad_norm = inf, loss/vdep = nan"
    assert list(alarm.recent) == [2.0, 4.0, 5.1]  # a non-finite step never enters the window


# ------------------------------------------------------------------------------- runs and resumes
@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_a_stopped_and_resumed_run_writes_the_same_curves_and_alerts_to_every_backend(small_data, tmp_path,
                                                                                       monkeypatch):
    """Stopped by SIGUSR1 (a checkpoint at the step it stops), resumed with mlflow added to run.report_to and a
    NaN loss injected: TensorBoard, wandb and MLflow each hold every step of metrics.jsonl once, with its value,
    and the alerts of the steps the alarm's definition picks."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # to read the store back here
    run_dir = tmp_path / "run"
    held_out = [f"stages.finetune.eval.data={small_data.raw / 'eval.json'}",
                f"stages.finetune.eval.image_root={small_data.raw / 'images'}", "stages.finetune.eval.every=4",
                "stages.finetune.eval.max_samples=4", "stages.finetune.eval.qa=false"]
    ranks = start_local_ranks(1, train_args(small_data, run_dir, "[tensorboard,wandb]", *held_out), offline_env())
    metrics = run_dir / "finetune" / "metrics.jsonl"
    while not (metrics.is_file() and any(m["step"] >= 3 for m in read_metrics(run_dir, "finetune"))):
        assert ranks[0].poll() is None, "the run ended before step 3"
        time.sleep(0.05)
    ranks[0].send_signal(signal.SIGUSR1)
    assert wait_for_ranks(ranks) == EXIT_PREEMPTED
    stopped_at = max(m["step"] for m in read_metrics(run_dir, "finetune"))
    assert stopped_at < STEPS

    nan_step = STEPS - 1
    args = train_args(small_data, run_dir, "[tensorboard,wandb,mlflow]", *held_out)
    assert launch_local(1, args, offline_env(f"nan_loss@{nan_step}")) == 0
    assert f"(step {stopped_at} of" in (run_dir / "logs" / "train.log").read_text()
    expected = jsonl_values(run_dir)
    assert sorted(expected["loss/total"]) == list(range(1, STEPS + 1))
    assert sorted(expected["val/loss_text"]) == [4, 8]
    # The injected NaN reaches the gradients (DeepSpeed skips the update), not the logged loss sums.
    assert math.isinf(expected["grad_norm"][nan_step]) and expected["train/nonfinite_steps"][nan_step] == 1

    tensorboard, tensorboard_alerts = tensorboard_curves(run_dir)
    assert_curves("tensorboard", tensorboard, expected, rel=1e-6)  # float32 events
    (run,) = mlflow_runs(run_dir)  # added on resume: the history up to the checkpoint came from metrics.jsonl
    assert (run.info.lifecycle_stage, run.info.status, run.info.run_name) == ("active", "FINISHED", "run/finetune")
    assert_curves("mlflow", mlflow_curves(run_dir, run.info.run_id), expected)
    segments = wandb_segments(run_dir)
    state = json.loads((run_dir / "finetune" / "reporting.json").read_text())
    assert [s["id"] for s in segments] == [state["wandb"]["run_id"]] * 2  # one run, continued
    assert sorted(segments[0]["history"]) == list(range(1, stopped_at + 1))
    assert_curves("wandb", wandb_curves(segments), expected)

    alerts = expected_alerts(expected)
    assert nan_step in alerts and len(alerts) > 1, f"the losses {expected['loss/total']} rose past no spike"
    # One alert before the checkpoint: MLflow, added on resume, gets it with the history from metrics.jsonl.
    assert min(alerts) <= stopped_at, f"no alert at or before step {stopped_at}: {alerts}"
    log_text = (run_dir / "logs" / "train.log").read_text()
    assert alert_steps(re.findall(r"finetune: ((?:loss spike|non-finite loss or gradient norm) at step \d+)", log_text)) == alerts
    assert sorted(tensorboard_alerts) == alerts
    assert alert_steps([text for s in segments for text in s["alerts"]]) == alerts
    tags = run.data.tags
    assert sorted(int(key.rpartition("_")[2]) for key in tags if key.startswith("vdep.alert.")) == alerts
    assert tags[f"vdep.alert.step_{nan_step:08d}"] == f"non-finite loss or gradient norm at step {nan_step}: grad_norm = inf"


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_a_killed_and_resumed_run_holds_each_step_once_in_every_backend(small_data, tmp_path, monkeypatch):
    """Killed in the step-4 save (the latest checkpoint stays step 2; steps 3 and 4 were logged) and resumed:
    TensorBoard purges the repeated steps; MLflow's run, which holds values for them, is replaced by one with
    the history up to step 2 and the resumed steps; wandb's run continues after the steps it may hold."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run_dir = tmp_path / "run"
    args = train_args(small_data, run_dir, "[tensorboard,wandb,mlflow]")
    assert launch_local(1, args, offline_env("kill_in_save@4")) == -signal.SIGKILL
    assert (run_dir / "finetune" / "checkpoints" / "latest").read_text() == "step_00000002"
    killed = jsonl_values(run_dir)
    assert sorted(killed["loss/total"]) == [1, 2, 3, 4]
    (old,) = mlflow_runs(run_dir)

    assert launch_local(1, args, offline_env()) == 0
    expected = jsonl_values(run_dir)
    assert sorted(expected["loss/total"]) == list(range(1, STEPS + 1))

    assert_curves("tensorboard", tensorboard_curves(run_dir)[0], expected, rel=1e-6)
    runs = {run.info.lifecycle_stage: run for run in mlflow_runs(run_dir)}
    assert sorted(runs) == ["active", "deleted"]
    new = runs["active"]
    assert runs["deleted"].info.run_id == old.info.run_id
    assert runs["deleted"].data.tags["vdep.replaced_by"] == new.info.run_id
    assert new.data.tags["vdep.replaces"] == old.info.run_id
    assert_curves("mlflow", mlflow_curves(run_dir, new.info.run_id), expected)

    killed_segment, resumed_segment = wandb_segments(run_dir)
    assert killed_segment["id"] == resumed_segment["id"]
    # The killed attempt's file holds what wandb had flushed of steps 1-4 (it writes every 15 s): the values
    # that attempt logged. The resumed attempt sends only the steps after those it may hold.
    assert set(killed_segment["history"]) <= {1, 2, 3, 4}
    assert_curves("wandb (killed attempt)", wandb_curves([killed_segment]), killed, steps=set(killed_segment["history"]))
    assert sorted(resumed_segment["history"]) == list(range(5, STEPS + 1))
    assert_curves("wandb (resumed)", wandb_curves([resumed_segment]), expected, steps=set(range(5, STEPS + 1)))
