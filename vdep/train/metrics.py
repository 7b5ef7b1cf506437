"""What a stage reports: its scalars, a progress bar or log lines, throughput and MFU, loss alerts.

Only rank 0 writes: the scalars, one JSON object per logged step, in RUN_DIR/<stage>/metrics.jsonl (with `time`: the wall clock, Unix seconds, when its line was written, so
that steps can be timed end to end from outside: benchmarks/peers.py), and
the same scalars to each backend of `run.report_to` (TensorBoard events in RUN_DIR/tensorboard/<stage>/,
wandb, MLflow: reporting.py). A resumed stage drops the lines after its checkpoint's step and the backends
do the same in their own way, so no step appears twice. The scalars: `loss/text`, `loss/vdep`,
`loss/total`, `lr/<group>`, `grad_norm`, `tokens/text`, `tokens/image`, `norm/hidden_at_image`,
`norm/target_at_image`, the VDEP probes `probe/reconstruction_cosine`, `probe/target_pairwise_cosine`,
`probe/target_variance` and `probe/target_relative_variance` (objectives/probes.py), `throughput/samples_per_s`,
`throughput/tokens_per_s`, `throughput/flops_per_s`, `perf/mfu` and `memory/max_allocated_gib` (GPU only),
`data/skipped/<reason>`, `train/nonfinite_steps`, and the held-out `val/*` (validation.py).
A non-finite or spiking training loss raises an alert (`LossAlarm`): a warning in the log and an alert in
every backend.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import torch

from ..atomic import atomic_write
from ..config import TrainConfig
from ..data.batch import Batch
from ..data.dataset import StreamReport
from ..log import get_logger
from ..objectives.losses import LossSums
from ..objectives.probes import probe_scalars
from ..rundir import RunDir
from .distributed import all_reduce_sum
from .global_batch import StepPlan
from .reporting import Outcome, Reporter, StageStart, StepRecord, build_reporters

log = get_logger("metrics")

# Skipped samples are named in the log this many times per stage; after that they are only counted.
MAX_SKIP_WARNINGS = 20

# Dense bf16/fp16 tensor-core peak per GPU, FLOP/s, by a substring of the device name.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "V100": 125e12,
}


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The device's peak for the training precision, or None where MFU would be meaningless (CPU, fp32)."""
    if device.type != "cuda" or precision not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), None)


@dataclass(frozen=True)
class FlopModel:
    """Parameter counts that decide a step's FLOPs (PaLM-style estimate, matmuls only)."""

    llm_params: int  # decoder + LM head, without the input embeddings
    llm_layers: int
    llm_hidden: int
    vision_params: int
    vision_tokens_per_view: int  # the tower's features per view, each of which the projector maps
    projector_params: int
    llm_trainable: bool

    def step_flops(self, tokens: int, squared_lengths: int, views: int) -> float:
        # Forward 2·N per token; backward 4·N when the LLM trains, 2·N when it only passes
        # gradients through to the projector. Causal attention: 2·L·d·T² forward per sequence.
        llm_factor = 6 if self.llm_trainable else 4
        llm = llm_factor * self.llm_params * tokens + llm_factor * self.llm_layers * self.llm_hidden * squared_lengths
        # Per view, not per image: an AnyRes image is its base view and tiles, a video its frames, and a sample
        # may hold several images. (The zero image a rank without images runs is not work, and not counted.)
        vision = 2 * self.vision_params * self.vision_tokens_per_view * views  # frozen: forward only
        projector = 6 * self.projector_params * self.vision_tokens_per_view * views
        return float(llm + vision + projector)


@dataclass
class LossAlarm:
    """Raises an alert for a logged training loss or gradient norm that is not finite, or a `loss/total` spike: above
    `factor` times the median of the previous `window` logged values (checked once there are that many, so
    the steep early descent never counts; the median is not moved by the spike itself)."""

    factor: float
    window: int
    recent: deque[float] = field(default_factory=deque)

    def check(self, step: int, scalars: dict[str, float]) -> str | None:
        """The alert's text for this step's scalars, or None."""
        broken = [f"{name} = {value}" for name, value in scalars.items()
                  if (name.startswith("loss/") or name == "grad_norm") and not math.isfinite(value)]
        if broken:  # a non-finite loss makes the gradient norm non-finite too, and DeepSpeed skips the update
            return f"non-finite loss or gradient norm at step {step}: {', '.join(broken)}"
        loss = scalars.get("loss/total")
        if loss is None:
            return None
        message = None
        if len(self.recent) == self.window:
            median = statistics.median(self.recent)
            if loss > self.factor * median > 0:
                message = (f"loss spike at step {step}: loss/total = {loss:.4g}, {loss / median:.1f} times the median "
                           f"{median:.4g} of the previous {self.window} logged values (run.alerts.spike_factor="
                           f"{self.factor:g})")
        self.recent.append(loss)
        if len(self.recent) > self.window:
            self.recent.popleft()
        return message


class StageMetrics:
    """Rank 0's reporter for one stage: metrics.jsonl, the backends of `run.report_to` (reporting.py), the
    progress bar or log lines, and loss alerts. On other ranks every method does nothing."""

    def __init__(self, run: RunDir, stage: str, total_steps: int, start_step: int, enabled: bool,
                 config: TrainConfig):
        self.enabled = enabled
        self.stage = stage
        self.total_steps = total_steps
        self.start_time = time.monotonic()
        self.start_step = start_step
        self.bar = None
        self.jsonl = run.stage(stage).metrics_file
        self.reporters: list[Reporter] = []
        alerts = config.run.alerts
        self.alarm = LossAlarm(alerts.spike_factor, alerts.spike_window)
        self.validation_keys: dict[int, set[str]] = {}  # step → the val/* scalars logged at it
        if not enabled:
            return
        history, logged_through = self._forget_steps_after(start_step)
        history_alerts: list[tuple[int, str]] = []
        for record in history:
            alert = self.alarm.check(record.step, record.scalars)  # the window as an uninterrupted stage would have it
            if alert is not None:
                history_alerts.append((record.step, alert))
            self.validation_keys.setdefault(record.step, set()).update(k for k in record.scalars if k.startswith("val/"))
        begin = StageStart(run, stage, config, resumed_at=start_step, logged_through=logged_through)
        try:
            for reporter in build_reporters(config.run.report_to):
                holds_history = reporter.start(begin)
                self.reporters.append(reporter)
                if history and not holds_history:  # its alerts too: the backend holds what it would have
                    reporter.log_history(history)
                    for step, text in history_alerts:
                        reporter.alert(step, self._alert_title(text), text)
        except Exception:
            self.close("failed")
            raise
        if sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=stage, dynamic_ncols=True)

    def _forget_steps_after(self, step: int) -> tuple[list[StepRecord], int]:
        """A resumed stage repeats the steps after its checkpoint: their old lines would be duplicates.
        Returns the lines kept, and the last step the file held before."""
        lines = self.jsonl.read_text().splitlines() if self.jsonl.is_file() else []
        records = [json.loads(line) for line in lines if line]
        kept = [line for line, record in zip(lines, records) if record["step"] <= step]
        atomic_write(self.jsonl, "".join(line + "\n" for line in kept))
        # The backends got the scalars, not the line's bookkeeping (its step and wall-clock time).
        history = [StepRecord(r["step"], {k: v for k, v in r.items() if k not in ("step", "time")})
                   for r in records if r["step"] <= step]
        return history, max((r["step"] for r in records), default=0)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._write(step, scalars)
        alert = self.alarm.check(step, scalars)
        if alert is not None:
            self._alert(step, alert)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(self._short(scalars), refresh=True)
        else:
            log.info("%s step %d/%d | %s | eta %s", self.stage, step, self.total_steps, self._short(scalars), self._eta(step))

    def log_validation(self, step: int, scalars: dict[str, float]) -> None:
        """A validation record of its own at `step` (not twice: a stage restored at its end validates again)."""
        if not self.enabled or set(scalars) <= self.validation_keys.get(step, set()):
            return
        self.validation_keys.setdefault(step, set()).update(scalars)
        self._write(step, scalars)
        log.info("%s step %d/%d | validation: " + ", ".join(f"{k.removeprefix('val/')} %.4g" for k in scalars),
                 self.stage, step, self.total_steps, *scalars.values())

    def _write(self, step: int, scalars: dict[str, float]) -> None:
        """One line of metrics.jsonl (first: it decides what a resume repeats), then to every backend."""
        with self.jsonl.open("a") as lines:
            lines.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")
        self._each_reporter("log", lambda reporter: reporter.log(step, scalars))

    def _alert(self, step: int, text: str) -> None:
        log.warning("%s: %s", self.stage, text)
        title = self._alert_title(text)
        self._each_reporter("alert", lambda reporter: reporter.alert(step, title, text))

    def _alert_title(self, text: str) -> str:
        return f"vdep {self.stage}: {text.partition(' at step')[0]}"

    def _each_reporter(self, what: str, action: Callable[[Reporter], None]) -> None:
        """Monitoring is not training: a backend that fails (its server unreachable after its own retries) is
        dropped for the rest of the stage with a warning; metrics.jsonl keeps every step."""
        for reporter in list(self.reporters):
            try:
                action(reporter)
            except Exception as exc:  # noqa: BLE001 (any library's error: reported, then that backend stops)
                self.reporters.remove(reporter)
                log.warning("%s: %s failed to %s (%s: %s); stage %s no longer reports to %s. metrics.jsonl holds "
                            "every step", self.stage, reporter.name, what, type(exc).__name__, exc, self.stage,
                            reporter.name)

    def _short(self, s: dict[str, float]) -> str:
        parts = [f"loss {s['loss/total']:.4f} (text {s['loss/text']:.4f}, vdep {s['loss/vdep']:.4f})"]
        if "grad_norm" in s:
            parts.append(f"gnorm {s['grad_norm']:.3f}")
        lr = next((v for k, v in s.items() if k.startswith("lr/")), None)
        if lr is not None:
            parts.append(f"lr {lr:.2e}")
        parts.append(f"{s['throughput/samples_per_s']:.1f} samples/s")
        if "perf/mfu" in s:
            parts.append(f"mfu {100 * s['perf/mfu']:.1f}%")
        return " | ".join(parts)

    def _eta(self, step: int) -> str:
        done = step - self.start_step
        if done <= 0:
            return "?"
        remaining = (time.monotonic() - self.start_time) / done * (self.total_steps - step)
        return str(timedelta(seconds=round(remaining)))

    def close(self, outcome: Outcome = "finished") -> None:
        """Finish every backend's run: `outcome` says how the stage ended."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self._each_reporter("finish", lambda reporter: reporter.finish(outcome))
        self.reporters = []


@dataclass
class IntervalStats:
    """Sums over the steps since the last log line (device tensors: no host sync per step)."""

    device: torch.device
    sums: torch.Tensor = field(init=False)
    image_positions: int = 0
    text_targets: int = 0
    image_targets: int = 0
    samples: int = 0
    tokens: int = 0
    flops: float = 0.0
    steps: int = 0
    started: float = field(default_factory=time.monotonic)
    # `probes.probe_sums` summed; sized by the first micro-batch (every rank runs one at every step, with the
    # same model, so all ranks reduce vectors of one size)
    probes: torch.Tensor | None = None

    def __post_init__(self) -> None:
        # text loss sum, vdep loss sum, ||h|| sum, ||e|| sum
        self.sums = torch.zeros(4, dtype=torch.float64, device=self.device)

    def add_micro(self, sums: LossSums, image_positions: int) -> None:
        self.sums += torch.stack([sums.text.detach(), sums.vdep.detach(), sums.hidden_norm, sums.target_norm]).double()
        self.image_positions += image_positions
        if sums.probes is not None:
            probes = sums.probes.double()
            self.probes = probes if self.probes is None else self.probes + probes

    def add_step(self, plan: StepPlan, flops: float) -> None:
        self.text_targets += plan.counts.text
        self.image_targets += plan.counts.image
        self.samples += plan.samples
        self.tokens += plan.tokens
        self.flops += flops
        self.steps += 1

    def scalars(self, alpha: float) -> dict[str, float]:
        """Collective (all ranks): global averages over the interval."""
        probes = self.probes if self.probes is not None else torch.zeros(0, dtype=torch.float64, device=self.device)
        count = torch.tensor([float(self.image_positions)], dtype=torch.float64, device=self.device)
        reduced = all_reduce_sum(torch.cat([self.sums, count, probes]))  # one collective for all of them
        text, vdep, hidden_norm, target_norm, positions = reduced[:5].tolist()
        elapsed = max(time.monotonic() - self.started, 1e-9)
        loss_text = text / max(self.text_targets, 1)
        loss_vdep = vdep / max(self.image_targets, 1)
        return {
            "loss/text": loss_text,
            "loss/vdep": loss_vdep,
            "loss/total": loss_text + alpha * loss_vdep,
            "tokens/text": self.text_targets / self.steps,
            "tokens/image": self.image_targets / self.steps,
            "norm/hidden_at_image": hidden_norm / max(positions, 1),
            "norm/target_at_image": target_norm / max(positions, 1),
            "throughput/samples_per_s": self.samples / elapsed,
            "throughput/tokens_per_s": self.tokens / elapsed,
            "throughput/flops_per_s": self.flops / elapsed,
            **probe_scalars(reduced[5:], int(positions)),
        }


class SkipReport:
    """This rank's skipped samples by reason, and the shards found shorter than sizes.json says
    (location → [listed, held]); the first few skips are named in the log."""

    def __init__(self, counts: dict[str, int], shortfalls: dict[str, list[int]] | None = None):
        self.counts: Counter[str] = Counter(counts)
        self.shortfalls: dict[str, list[int]] = {k: list(v) for k, v in (shortfalls or {}).items()}
        self.warnings_left = MAX_SKIP_WARNINGS

    def state_dict(self) -> dict:
        return {"counts": dict(self.counts), "shortfalls": {k: list(v) for k, v in self.shortfalls.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.counts = Counter(state["counts"])
        self.shortfalls = {k: list(v) for k, v in state["shortfalls"].items()}

    def add(self, batches: list[Batch] | list[StreamReport]) -> None:
        for batch in batches:
            self.counts.update(batch.skipped)
            self.shortfalls.update({location: list(counts) for location, counts in batch.shortfalls.items()})
            for message in batch.skip_messages:
                if self.warnings_left > 0:
                    log.warning("data: %s", message)
                    self.warnings_left -= 1
                    if self.warnings_left == 0:
                        log.warning("further skipped samples are counted, not named (see data/skipped in TensorBoard)")
