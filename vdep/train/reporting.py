"""Where a stage's scalars go besides RUN_DIR/<stage>/metrics.jsonl: the backends of `run.report_to`.

One interface, `Reporter` (start the stage, log scalars at a step, raise an alert, finish), one class per
backend: TensorBoard (RUN_DIR/tensorboard/<stage>/), Weights & Biases and MLflow (one run per stage, named
RUN_NAME/STAGE, grouped or tagged by the run's name). `StageMetrics` (metrics.py) drives them on rank 0 and
gives each the scalars it writes to metrics.jsonl, nothing more and nothing less.

A resumed stage repeats the steps after its checkpoint; each backend ends up holding every step once
(docs/monitoring.md, "Resumed runs"):
- TensorBoard: `purge_step` hides the events the interrupted attempt wrote after the checkpoint's step.
- wandb: the same run continues (its id is kept in RUN_DIR/<stage>/reporting.json; `resume="allow"`). A
  run's history only moves forward, so the steps after the checkpoint that the run already holds keep the
  values the interrupted attempt sent, and the resumed attempt sends the steps after them (`WandbReporter`).
- MLflow keeps every value logged at a step, so re-running a step would give it two. When the interrupted
  attempt logged steps after the checkpoint, its MLflow run is replaced: a new run gets the stage's history
  up to the checkpoint from metrics.jsonl and continues from there, and the old one is tagged
  `vdep.replaced_by` and deleted (MLflow keeps deleted runs until `mlflow gc`; `mlflow runs restore` undoes it).
A backend that holds none of a resumed stage's history (a new run, or a backend added to run.report_to on
resume) is given it first, from metrics.jsonl (`Reporter.start` returns False; `log_history`).

Credentials never pass through here: wandb and MLflow read them from the environment themselves.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

from ..atomic import atomic_write
from ..config import REPORT_BACKENDS, TrainConfig
from ..errors import ConfigError
from ..log import get_logger
from ..rundir import RunDir, StageDir
from ..structured import unstructure

log = get_logger("metrics")

# How a stage's reporting ended: it trained to its end, it stopped for a signal (and will resume), or it failed.
Outcome = Literal["finished", "stopped", "failed"]

STATE_FILE = "reporting.json"  # in RUN_DIR/<stage>/: the wandb and MLflow run ids of the stage


@dataclass(frozen=True)
class StepRecord:
    """One line of metrics.jsonl."""

    step: int
    scalars: dict[str, float]


@dataclass(frozen=True)
class StageStart:
    """What a backend needs to open (or reopen) a stage's run."""

    run: RunDir
    stage: str
    config: TrainConfig
    # The checkpoint step the stage continues from (0: from its start).
    resumed_at: int
    # The last step metrics.jsonl held before this attempt: beyond `resumed_at` when the interrupted attempt
    # logged steps after its last checkpoint (they are logged again).
    logged_through: int

    @property
    def stage_dir(self) -> StageDir:
        return self.run.stage(self.stage)

    @property
    def display_name(self) -> str:
        return f"{self.config.run.name}/{self.stage}"


def read_state(stage_dir: StageDir) -> dict:
    path = stage_dir.path / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_state(stage_dir: StageDir, backend: str, entry: dict) -> None:
    state = read_state(stage_dir)
    state[backend] = entry
    atomic_write(stage_dir.path / STATE_FILE, json.dumps(state, indent=2) + "\n")


def flat_config(config: TrainConfig) -> dict[str, str]:
    """The resolved config as dotted keys → text (MLflow's parameters)."""
    flat: dict[str, str] = {}

    def walk(node: object, key: str) -> None:
        if isinstance(node, dict) and node:
            for name, value in node.items():
                walk(value, f"{key}.{name}" if key else str(name))
        else:
            flat[key] = node if isinstance(node, str) else json.dumps(node)

    walk(unstructure(config), "")
    return flat


class Reporter(ABC):
    """One backend, for one stage, on rank 0."""

    name: ClassVar[str]

    @abstractmethod
    def start(self, stage: StageStart) -> bool:
        """Open the stage's run. True when the backend already holds the stage's steps up to
        `stage.resumed_at`; False when it holds none of them (they are then given to `log_history`)."""

    @abstractmethod
    def log(self, step: int, scalars: dict[str, float]) -> None:
        """The scalars of one step (a step may be logged twice: training, then validation)."""

    def log_history(self, records: list[StepRecord]) -> None:
        for record in records:
            self.log(record.step, record.scalars)

    @abstractmethod
    def alert(self, step: int, title: str, text: str) -> None:
        """An alert raised at `step`: a short `title` ("vdep finetune: loss spike") and the full `text`."""

    @abstractmethod
    def finish(self, outcome: Outcome) -> None: ...


class TensorBoardReporter(Reporter):
    name = "tensorboard"

    def start(self, stage: StageStart) -> bool:
        from torch.utils.tensorboard import SummaryWriter

        folder = stage.run.tensorboard(stage.stage)
        had_events = folder.is_dir() and any(folder.glob("events.out.tfevents.*"))
        # A resumed stage repeats the steps after its checkpoint: purge_step makes TensorBoard drop the events
        # the interrupted attempt wrote for them, so every step appears once.
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=stage.resumed_at + 1 if stage.resumed_at else None)
        return had_events

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def alert(self, step: int, title: str, text: str) -> None:
        self.writer.add_text("alerts", text, step)
        self.writer.flush()

    def finish(self, outcome: Outcome) -> None:
        self.writer.close()


class WandbReporter(Reporter):
    """A wandb run per stage. wandb keeps a run's steps increasing by renumbering a step that is not beyond
    the ones it holds (it would land on the wrong step), so a resumed stage never sends such a step: it
    sends from the step after the last one the run may hold (`first_step`)."""

    name = "wandb"

    def start(self, stage: StageStart) -> bool:
        import wandb

        settings = stage.config.run.wandb
        previous = read_state(stage.stage_dir).get(self.name)
        self.run = wandb.init(
            project=settings.project, entity=settings.entity, group=settings.group or stage.config.run.name,
            job_type=stage.stage, name=stage.display_name, tags=settings.tags or None,
            id=previous["run_id"] if previous else None, resume="allow",
            dir=str(stage.stage_dir.path), config=unstructure(stage.config),
        )
        write_state(stage.stage_dir, self.name, {"run_id": self.run.id, "project": settings.project,
                                                 "entity": settings.entity})
        self.first_step = stage.resumed_at + 1
        if previous is None or (not self.run.offline and not self.run.resumed):
            return False  # a new run (or one the server never received): it gets the history first
        if self.run.offline:
            # The earlier attempts' offline files are synced before this one (`wandb sync` takes a run's files
            # in order): they hold at most what metrics.jsonl held, less what a killed attempt had not yet
            # flushed (wandb writes its file every 15 s), which stays missing rather than misplaced.
            held = stage.logged_through
        else:
            held = self.run.starting_step - 1  # the server's last step of the run
        if held > stage.resumed_at:
            log.info("wandb: run %s may already hold stage %s's steps %d-%d, with the values of the attempt that was "
                     "interrupted; it continues from step %d", self.run.id, stage.stage, stage.resumed_at + 1, held,
                     held + 1)
            self.first_step = held + 1
        return True

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if step >= self.first_step:
            self.run.log(scalars, step=step)

    def log_history(self, records: list[StepRecord]) -> None:
        for record in records:
            self.run.log(record.scalars, step=record.step)

    def alert(self, step: int, title: str, text: str) -> None:
        import wandb

        if step >= self.first_step:
            self.run.alert(title=title, text=text, level=wandb.AlertLevel.WARN)

    def finish(self, outcome: Outcome) -> None:
        if outcome == "stopped":
            self.run.mark_preempting()
        self.run.finish(exit_code=0 if outcome == "finished" else 1)


class MlflowReporter(Reporter):
    name = "mlflow"
    STATUS: ClassVar[dict[str, str]] = {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}
    # MLflow's limits: a log_batch request carries at most 1000 metrics and 100 parameters; a parameter's
    # value has at most 6000 characters, a tag's 8000.
    METRICS_PER_BATCH = 1000
    PARAMS_PER_BATCH = 100
    PARAM_CHARS = 6000
    TAG_CHARS = 8000

    def start(self, stage: StageStart) -> bool:
        import mlflow
        from mlflow.tracking import MlflowClient

        settings = stage.config.run.mlflow
        uri = settings.tracking_uri or mlflow.get_tracking_uri()
        self.client = MlflowClient(tracking_uri=uri)
        experiment_id = self._experiment(settings.experiment)
        previous = read_state(stage.stage_dir).get(self.name)
        old = self._open_run(previous, uri)
        if old is not None and stage.logged_through <= stage.resumed_at:
            self.run_id = old
            self.client.update_run(self.run_id, status="RUNNING")
            return True
        tags = {**settings.tags, "vdep.run": stage.config.run.name, "vdep.stage": stage.stage}
        self.run_id = self.client.create_run(experiment_id, run_name=stage.display_name, tags=tags).info.run_id
        self._log_params(flat_config(stage.config))
        if old is not None:
            # It holds values of steps after the checkpoint that this attempt logs again: a second value per step.
            self.client.set_tag(self.run_id, "vdep.replaces", old)
            self.client.set_tag(old, "vdep.replaced_by", self.run_id)
            self.client.set_terminated(old, status="KILLED")
            self.client.delete_run(old)
            log.info("mlflow: run %s held stage %s's steps after its checkpoint (step %d), which are logged again; "
                     "run %s replaces it with the history up to the checkpoint (from metrics.jsonl), and %s was "
                     "deleted (`mlflow runs restore --run-id %s` brings it back)", old, stage.stage,
                     stage.resumed_at, self.run_id, old, old)
        write_state(stage.stage_dir, self.name, {"run_id": self.run_id, "experiment_id": experiment_id,
                                                 "tracking_uri": uri})
        return False

    def _experiment(self, name: str) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            return self.client.create_experiment(name)
        if experiment.lifecycle_stage != "active":
            raise ConfigError(f"run.mlflow.experiment: MLflow experiment '{name}' is deleted; restore it "
                              "(`mlflow experiments restore`) or choose another name")
        return experiment.experiment_id

    def _open_run(self, previous: dict | None, uri: str) -> str | None:
        """The stage's run from an earlier attempt, if it is on this tracking server and not deleted."""
        from mlflow.exceptions import MlflowException

        if previous is None or previous.get("tracking_uri") != uri:
            return None
        try:
            run = self.client.get_run(previous["run_id"])
        except MlflowException:
            return None
        return run.info.run_id if run.info.lifecycle_stage == "active" else None

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(key, value[: self.PARAM_CHARS]) for key, value in params.items()]
        for start in range(0, len(items), self.PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[start:start + self.PARAMS_PER_BATCH])

    def _log_metrics(self, records: list[StepRecord]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(name, float(value), now, record.step) for record in records
                   for name, value in record.scalars.items()]
        for start in range(0, len(metrics), self.METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + self.METRICS_PER_BATCH])

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self._log_metrics([StepRecord(step, scalars)])

    def log_history(self, records: list[StepRecord]) -> None:
        self._log_metrics(records)

    def alert(self, step: int, title: str, text: str) -> None:
        self.client.set_tag(self.run_id, f"vdep.alert.step_{step:08d}", text[: self.TAG_CHARS])

    def finish(self, outcome: Outcome) -> None:
        self.client.set_terminated(self.run_id, status=self.STATUS[outcome])


REPORTERS: dict[str, type[Reporter]] = {cls.name: cls for cls in (TensorBoardReporter, WandbReporter, MlflowReporter)}
assert set(REPORTERS) == set(REPORT_BACKENDS), "config.REPORT_BACKENDS and the reporter classes name the same backends"


def build_reporters(names: list[str]) -> list[Reporter]:
    return [REPORTERS[name]() for name in names]
