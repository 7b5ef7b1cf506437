"""One training stage as an object: `StageTrainer` owns the engine, the data stream and its position,
the train state, the metrics and the stop request, and runs the loop:

    restore()                          the latest checkpoint of the stage, if any
    while the stage is not done:       (StageLength: max_steps, or epochs of data)
        step()                         one optimizer step over the global batch (or the epoch's end)
        log()                          every run.log_every steps
        validate()                     held-out losses every eval.every steps (validation.py)
        checkpoint_if_due()            periodic save; stop after too many non-finite steps or on a signal
    finish()                           the last checkpoint, the final weights and the summary

A step:
1. take this rank's `grad_accum` micro-batches;
2. plan the global batch with the other ranks (VDEP modes, N_text, N_img; see global_batch.py);
3. for each micro-batch: forward (vision tower → projector → LLM → named loss sums), backward of
   this micro-batch's share of L, `engine.step()` (DeepSpeed updates at the accumulation boundary);
4. if DeepSpeed found the global gradient norm non-finite (any non-finite loss makes it so), the
   update was skipped on every rank: count it.
DeepSpeed averages gradients over data-parallel ranks, so each rank's share is multiplied by the world
size: summed over micro-batches and averaged over ranks, the gradient is exactly that of L.
"""

from __future__ import annotations

import gc
import itertools
from collections.abc import Iterator
from dataclasses import asdict

import torch

from ..config import StageConfig
from ..data.batch import Batch
from ..data.loader import DataPosition
from ..errors import DataError, TrainingHalted, TrainingPreempted
from ..log import get_logger
from ..rundir import checkpoint_tag
from .checkpoint import (
    CheckpointManager,
    ProcessRng,
    Stateful,
    TrainState,
    load_engine_checkpoint,
    save_final_weights,
)
from .distributed import broadcast_from_rank_zero, current_rank, merge_mappings, sum_counters
from .elastic import convert_to_universal, load_universal, rank_state
from .global_batch import StepPlan, plan_step
from .metrics import IntervalStats, SkipReport, StageMetrics, peak_flops
from .nonfinite import NonfiniteSteps
from .sample_log import SampleLog
from .setup import DTYPES, RunContext, StageParts, build_stage
from .together import together
from .validation import Validator, build_validator

log = get_logger("train")


def take(batches: Iterator[Batch], count: int) -> list[Batch]:
    """Up to `count` micro-batches (fewer at the end of this rank's share of the epoch)."""
    return list(itertools.islice(batches, count))


class StageTrainer:
    def __init__(self, ctx: RunContext, name: str, stage: StageConfig, parts: StageParts):
        self.ctx, self.name, self.stage, self.parts = ctx, name, stage, parts
        self.engine = parts.engine
        self.stage_dir = ctx.run.stage(name)
        self.checkpoints = CheckpointManager(self.stage_dir, ctx.config.run.keep_last, ctx.device, ctx.faults)
        self.state = TrainState(name, 0, 0, 0, ctx.launch.world_size, parts.fingerprint)
        self.position = DataPosition(0)
        self._batches: Iterator[Batch] | None = None
        self.skips = SkipReport({})
        self.nonfinite = NonfiniteSteps(parts.engine, self.state)
        self.interval = IntervalStats(ctx.device)
        self.metrics: StageMetrics | None = None
        self.missing = 0  # samples missing from short shards, all ranks, as of the last log line or epoch end
        self.last_scalars: dict[str, float] = {}
        self.sample_log = SampleLog.from_env(ctx.launch.rank)
        self.validator: Validator | None = None
        self.validated_step: int | None = None

    @classmethod
    def build(cls, ctx: RunContext, name: str, stage: StageConfig) -> StageTrainer:
        trainer = cls(ctx, name, stage, build_stage(ctx, name, stage))
        trainer.validator = build_validator(ctx, name, stage, trainer.parts.objective, trainer.engine)
        return trainer

    # ------------------------------------------------------------------------------------- the loop
    def train(self) -> dict:
        """Train the stage to its end; returns its summary."""
        self.restore()
        with together(self.ctx.device):  # rank 0 opens the backends' runs: a failure there stops every rank
            self.metrics = StageMetrics(self.ctx.run, self.name, self.parts.length.planned_steps, self.state.step,
                                        enabled=self.ctx.is_main, config=self.ctx.config)
        try:
            while not self.done:
                if self.step():
                    self.log(force=self.done)
                    self.validate(due_only=not self.done)
                    self.checkpoint_if_due()
            if self.interval.steps:  # the data ended between two log lines
                self.log(force=True)
            self.validate()  # the stage's end (nothing if just done; a stage restored at its end does it here)
            summary = self.finish()
        except TrainingPreempted:
            self.metrics.close("stopped")
            raise
        except BaseException:
            self.metrics.close("failed")
            raise
        self.metrics.close("finished")
        return summary

    @property
    def done(self) -> bool:
        state = self.state
        return self.parts.length.done(state.step, state.epoch, state.micro_batches_in_epoch // self.parts.grad_accum)

    # ---------------------------------------------------------------------------------- restoring
    def checkpoint_parts(self) -> dict[str, Stateful]:
        """What a checkpoint holds of this trainer besides the engine, by name: saved and restored alike."""
        return {"train": self.state, "skips": self.skips, "data_position": self.position, "rng": ProcessRng()}

    def restore(self) -> None:
        """Continue from the checkpoint the stage was built to resume (setup.build_stage), if there is one:
        the engine, then every part of the trainer from its own entry of the saved state."""
        point = self.parts.resume
        if point is None:
            return
        point.check_fingerprint(self.parts.fingerprint)
        world, rank = self.ctx.launch.world_size, current_rank()
        elastic = self.parts.elastic
        saved: dict = {}
        with together(self.ctx.device):  # each rank reads its own files: one that cannot, stops every rank
            saved = (rank_state(point, elastic, self.parts.loader, self.ctx.config.data.split, world, rank,
                                self.parts.grad_accum) if elastic is not None else point.state(rank))
        if elastic is not None:  # written on another number of ranks (elastic.py)
            load_universal(self.engine, point.folder, convert_to_universal(point.folder, self.ctx.device))
        else:
            load_engine_checkpoint(self.engine, point.folder)
        for name, part in self.checkpoint_parts().items():
            if name in saved:  # no "rng" for a rank beyond an elastic resume's old ones: a fresh start's seeding
                part.load_state_dict(saved[name])
        if (self.position.epoch, self.position.micro_batches) != (self.state.epoch, self.state.micro_batches_in_epoch):
            raise DataError(f"{point.folder}: rank {rank}'s data position (epoch {self.position.epoch}, "
                            f"{self.position.micro_batches} micro-batches) disagrees with its train state; the "
                            "checkpoint is damaged: remove it to resume from the one before")
        self.checkpoints.saved_step = self.state.step
        log.info("stage %s: resumed from %s (step %d of %d)", self.name, point.folder, self.state.step,
                 self.parts.length.planned_steps)

    @property
    def batches(self) -> Iterator[Batch]:
        """This rank's micro-batches from the data position on (opened on first use)."""
        if self._batches is None:
            self._batches = iter(self.parts.loader.micro_batches(self.state.epoch, self.position))
        return self._batches

    # ------------------------------------------------------------------------------------ stepping
    def step(self) -> bool:
        """One optimizer step; False when some rank ran out of data (every rank then starts the next epoch)."""
        # The DataLoader draws its workers' seed from torch's RNG whenever it (re)starts, which a resumed
        # stage does at another point than an uninterrupted one: kept off the RNG that dropout (LoRA's)
        # draws from, so both draw the same masks.
        error: BaseException | None = None
        micro_batches: list[Batch] = []
        try:
            with torch.random.fork_rng(devices=[]):
                micro_batches = take(self.batches, self.parts.grad_accum)
        except Exception as exc:  # noqa: BLE001 (every rank stops with it: plan_step shares it)
            error = exc
        plan = plan_step(
            micro_batches, step=self.state.step, micro_batches_per_step=self.parts.grad_accum,
            slots_per_rank=self.stage.micro_batch_size * self.parts.grad_accum,
            objective=self.parts.objective, device=self.ctx.device, error=error,
        )
        if plan is None:
            self.next_epoch(micro_batches)
            return False
        self.skips.add(micro_batches)
        self.sample_log.record(self.name, self.state.step + 1, self.state.epoch, micro_batches)
        for batch in micro_batches:
            self.position.advance(batch, self.parts.loader.workers)
        scale = self.nonfinite.loss_scale()
        self.forward_backward(plan)
        self.state.step += 1
        self.state.micro_batches_in_epoch += self.parts.grad_accum
        self.nonfinite.count(self.name, scale)
        return True

    def forward_backward(self, plan: StepPlan) -> None:
        world, dtype = self.ctx.launch.world_size, DTYPES[self.ctx.precision]
        poison = self.ctx.faults.nan_loss(self.state.step + 1)
        for inputs in plan.inputs:
            sums = self.engine(inputs.to(self.ctx.device, dtype))
            loss = self.parts.objective.loss(sums, plan.counts) * world
            self.engine.backward(loss * float("nan") if poison else loss, scale_wrt_gas=False)
            self.engine.step()
            self.interval.add_micro(sums, int(inputs.image_positions.sum()))
        flops = self.parts.flops.step_flops(plan.tokens, plan.squared_lengths, plan.views)
        self.interval.add_step(plan, flops)

    def next_epoch(self, partial: list[Batch]) -> None:
        """Collective (every rank ran out together): count what this rank's stream met to its end, stop if
        too much data was missing, and start the next epoch. `partial`: the micro-batches this rank took for a
        step that not every rank could fill. The samples this rank read in this epoch but did not train on
        (beyond the shortest rank's share, or short of a micro-batch) are counted as `unused_at_epoch_end`, so
        trained + skipped + missing + unused make up every sample sizes.json lists."""
        with together(self.ctx.device):  # reading on to the end of the stream may fail on this rank alone
            for batch in itertools.chain(partial, self._batches or ()):
                self.skips.add([batch])
                self.skips.counts["unused_at_epoch_end"] += batch.num_samples
            self.skips.add(self.parts.loader.reports)
            self.parts.loader.reports.clear()
        self.missing = sum_counters(self.skips.counts).get("missing_from_shard", 0)
        halt = self.missing_halt(epochs=self.state.epoch + 1)
        if halt is not None:
            self.save()
            log.error("%s", halt)
            raise halt
        if self.state.micro_batches_in_epoch == 0:
            raise DataError(f"stage {self.name}: epoch {self.state.epoch} produced no complete step; see the skipped samples")
        self.state.epoch += 1
        self.state.micro_batches_in_epoch = 0
        self.position = DataPosition(self.state.epoch)
        self._batches = None

    # ------------------------------------------------------------------------------------- logging
    def log(self, force: bool = False) -> None:
        """Collective, every `run.log_every` steps (and when forced): the interval's scalars to the metrics."""
        if self.state.step % self.ctx.config.run.log_every and not force:
            return
        scalars = self.interval.scalars(self.parts.objective.alpha)
        scalars["grad_norm"] = float(self.engine.get_global_grad_norm() or 0.0)
        # The LR of the latest update: DeepSpeed does not advance the schedule on a skipped step.
        scheduler_steps = self.engine.lr_scheduler.last_epoch
        for group, lr in self.parts.base_lrs.items():
            scalars[f"lr/{group}"] = lr * self.parts.schedule(max(0, scheduler_steps - 1))
        peak = peak_flops(self.ctx.device, self.ctx.precision)
        if peak is not None:
            scalars["perf/mfu"] = scalars["throughput/flops_per_s"] / (peak * self.ctx.launch.world_size)
        if self.ctx.device.type == "cuda":
            scalars["memory/max_allocated_gib"] = torch.cuda.max_memory_allocated(self.ctx.device) / 2**30
        skipped = sum_counters(self.skips.counts)
        for reason, count in skipped.items():
            scalars[f"data/skipped/{reason}"] = float(count)
        self.missing = skipped.get("missing_from_shard", 0)
        scalars["train/nonfinite_steps"] = float(self.state.nonfinite_steps)
        self.metrics.log(self.state.step, scalars)  # type: ignore[union-attr]
        self.last_scalars = scalars
        self.interval = IntervalStats(self.ctx.device)

    def validate(self, due_only: bool = False) -> None:
        """Collective: the held-out losses, when `eval.every` says so (or always), once per step."""
        if self.validator is None or (due_only and not self.validator.due(self.state.step)):
            return
        if self.validated_step == self.state.step:
            return
        result = self.validator.run(self.engine, self.ctx.device, DTYPES[self.ctx.precision])
        self.validated_step = self.state.step
        self.metrics.log_validation(self.state.step, result.scalars())  # type: ignore[union-attr]

    # -------------------------------------------------------------------------------- checkpoints
    def save(self) -> None:
        """Collective: a checkpoint of this step (the engine and every part of `checkpoint_parts`)."""
        self.checkpoints.save(self.engine, self.state.step, self.checkpoint_parts())

    def checkpoint_if_due(self) -> None:
        """The periodic save; then stop (after saving, if not just done) on too many non-finite steps in
        a row or a stop signal. The stop check comes after the periodic save, so a signal during it still
        stops this step."""
        save_every = self.stage.save_every
        saved = bool(save_every) and self.state.step % save_every == 0 and not self.done
        if saved:
            self.save()
        halt = self.nonfinite_halt() or self.missing_halt(epochs=self.state.epoch + 1)
        stop = halt is None and self.ctx.stop.agreed(self.ctx.device)
        if halt is None and not stop:
            return
        if not saved:
            self.save()
        if halt is not None:
            log.error("%s", halt)
            raise halt
        message = (
            f"stage {self.name}: stopped by {self.ctx.stop.signal_name or 'a signal to another rank'} after step "
            f"{self.state.step}; checkpoint {self.checkpoints.folder / checkpoint_tag(self.state.step)}. "
            "Run the same command to continue"
        )
        log.warning(message)
        raise TrainingPreempted(message)

    def nonfinite_halt(self) -> TrainingHalted | None:
        """The error that stops the run after too many non-finite steps in a row (None: go on).

        The checkpoint saved before raising it holds the weights from before the first of them: skipped
        steps change no weight.
        """
        limit = self.ctx.config.run.max_nonfinite_steps
        if self.state.nonfinite_in_a_row < limit:
            return None
        first = self.state.step - self.state.nonfinite_in_a_row + 1
        return TrainingHalted(
            f"stage {self.name}: steps {first}-{self.state.step} all had a non-finite loss or gradient norm "
            f"(run.max_nonfinite_steps={limit}); stopped. "
            f"{self.checkpoints.folder / checkpoint_tag(self.state.step)} holds the weights and optimizer state from "
            f"before step {first}, with the data position after the skipped batches. Lower the learning rate or "
            "inspect the data of those steps, then run the same command to continue from there"
        )

    def missing_halt(self, epochs: int) -> TrainingHalted | None:
        """The error that stops the run when more than `run.max_missing_fraction` of the samples that
        sizes.json lists for `epochs` epochs is missing from short shards (None: go on). The same on
        every rank: `self.missing` is the all-ranks count."""
        listed = self.parts.loader.samples_per_epoch * max(epochs, 1)
        limit = self.ctx.config.run.max_missing_fraction
        if self.missing <= limit * listed:
            return None
        shards = ", ".join(f"{location} ({held} of {listed_here})" for location, (listed_here, held)
                           in sorted(self.skips.shortfalls.items())[:5]) or "on other ranks"
        return TrainingHalted(
            f"stage {self.name}: {self.missing} of the {listed} samples that sizes.json lists are missing from their "
            f"shards (more than run.max_missing_fraction={limit:g}); stopped after step {self.state.step} with a "
            f"checkpoint. Short shards (samples held of listed): {shards}. Rebuild or re-upload them "
            "(vdep inspect-shards checks a folder), or raise run.max_missing_fraction to train on what is there"
        )

    # ------------------------------------------------------------------------------------ the end
    def finish(self) -> dict:
        """Collective: the end-of-stage checkpoint (unless the latest already is this step's), the final
        weights and the summary."""
        if self.checkpoints.saved_step != self.state.step:
            self.save()
        self.ctx.faults.kill_before_final(self.state.step)
        skipped = sum_counters(dict(self.skips.counts))
        shortfalls = merge_mappings(self.skips.shortfalls)
        planned = self.parts.length.planned_steps
        if self.ctx.is_main and self.state.step < planned:
            log.warning(
                "stage %s: its data ended after %d of the %d steps that sizes.json promised (%d sample(s) were "
                "skipped); the LR schedule stopped at %.3g of its peak", self.name, self.state.step, planned,
                sum(skipped.values()), self.parts.schedule(self.state.step - 1),
            )
        if self.ctx.is_main and skipped:
            log.warning("stage %s: skipped %d sample(s): %s", self.name, sum(skipped.values()), skipped)
        if self.ctx.is_main and shortfalls:
            log.warning("stage %s: shards shorter than sizes.json says (samples held of listed): %s", self.name,
                        ", ".join(f"{location} ({held} of {listed})" for location, (listed, held) in sorted(shortfalls.items())))
        summary = {
            "stage": self.name,
            "steps": self.state.step,
            "planned_steps": planned,
            # An epoch whose data ran out moved the state on to the next one, which has not started.
            "epochs_started": self.state.epoch + (1 if self.state.micro_batches_in_epoch else 0),
            "final": {k: v for k, v in self.last_scalars.items() if k.startswith(("loss/", "norm/", "tokens/"))},
            "skipped_samples": skipped,
            # Shards that held fewer samples than sizes.json lists: what they were missing is counted in
            # skipped_samples as missing_from_shard.
            "short_shards": {location: {"listed": listed, "held": held} for location, (listed, held) in shortfalls.items()},
            "vdep": asdict(self.stage.vdep),
        }
        save_final_weights(self.engine, self.stage_dir, summary, self.ctx.device)
        log.info("stage %s: done after %d steps; weights in %s", self.name, self.state.step, self.stage_dir.final)
        return summary

    def release(self) -> None:
        """Free the engine before the next stage builds its own (and ZeRO-3's hooks with it)."""
        destroy = getattr(self.engine, "destroy", None)
        if callable(destroy):
            destroy()
        del self.engine
        self.parts.engine = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_stage(ctx: RunContext, name: str, stage: StageConfig) -> dict:
    """Train one stage (or find it complete); returns its summary."""
    stage_dir = ctx.run.stage(name)
    # Decided on rank 0: ranks that read a shared file system at different moments must not disagree.
    summary = None
    with together(ctx.device):
        if ctx.is_main and stage_dir.is_complete:
            summary = stage_dir.read_summary()
    summary = broadcast_from_rank_zero(summary)
    if summary is not None:
        log.info("stage %s: already complete in %s; skipping it", name, stage_dir.final)
        return summary
    trainer = StageTrainer.build(ctx, name, stage)
    try:
        return trainer.train()
    finally:
        trainer.release()
