"""`vdep train`: set up the process group and the run directory, then run the stages in order.

The run directory's layout is in rundir.py; what rank 0 writes into it before the first stage, in
prepare.py; one stage's training, in trainer.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..config import TrainConfig, check_batch_geometry
from ..errors import PeerLost
from ..log import get_logger, setup_logging
from ..model.build import load_image_processing
from ..model.tokenizer import load_tokenizer
from ..rundir import RunDir
from .deepspeed_config import resolve_precision
from .distributed import (
    barrier,
    close_process_group,
    collective_failure_cause,
    current_rank,
    describe_hosts,
    detect_launch,
    init_distributed,
    is_lost_peer,
    rank_hosts,
)
from .faults import Faults
from .preemption import StopRequest
from .prepare import prepare_run_dir
from .setup import RunContext
from .together import together
from .trainer import run_stage

log = get_logger("run")


def on_rank_zero(action: Callable[[], None], device: torch.device) -> None:
    """Run `action` on rank 0 only; if it fails, every rank fails with its error (none is left waiting)."""
    with together(device):
        if current_rank() == 0:
            action()


def train(config: TrainConfig) -> list[dict]:
    # From the start, SIGUSR1/SIGTERM only raise a flag: training stops with a checkpoint at the next
    # step boundary (a signal during setup stops after the first step), never half-way through a save.
    with StopRequest(config.run.stop_timeout_s) as stop:
        try:
            summaries = _train(config, stop)
        except Exception as exc:
            if is_lost_peer(exc):
                # One paragraph instead of a traceback per rank: the cause is elsewhere (another node).
                # The process group is left as it is: tearing it down may wait for the rank that is gone.
                raise lost_peer_error(exc, config) from None
            close_process_group()
            raise
        close_process_group()
        return summaries


def lost_peer_error(exc: BaseException, config: TrainConfig) -> PeerLost:
    """What a rank says when a collective failed because another rank went away, and what comes next."""
    run = RunDir(config.run.directory)
    resume_from = "the start of the run (no checkpoint was complete yet)"
    for name, _ in config.stages_to_run():
        stage_dir = run.stage(name)
        if stage_dir.is_complete:
            continue
        checkpoint = stage_dir.latest_checkpoint()
        resume_from = (f"{name}'s last complete checkpoint, {checkpoint}" if checkpoint is not None
                       else f"the start of stage {name} (it had no complete checkpoint yet)")
        break
    return PeerLost(
        f"another rank stopped answering in a collective ({collective_failure_cause(exc)}): its node or "
        f"process was probably lost (crashed, killed or cut off from the network); its own log says why. "
        f"This rank cannot go on alone and stops without saving (a checkpoint needs every rank; a hung "
        f"collective waits at most deepspeed.timeout_minutes={config.deepspeed.timeout_minutes:g}). Running "
        f"the same command again continues from {resume_from}; under slurm/train.sbatch, SLURM requeues "
        f"the job once it marks a lost node down (if the node is fine and only a process died, submit the "
        f"job again). If the node does not come back, see \"Resuming on a different number of ranks\" in "
        f"docs/cluster.md."
    )


def _train(config: TrainConfig, stop: StopRequest) -> list[dict]:
    launch = detect_launch()
    device = init_distributed(launch, config.deepspeed.timeout_minutes)
    run = RunDir(config.run.directory)
    setup_logging(launch.rank, launch.world_size, run.log_file if launch.rank == 0 else None)
    for name, stage in config.stages_to_run():
        check_batch_geometry(name, stage, launch.world_size)  # fail before anything heavy
    precision = resolve_precision(config.deepspeed.precision, device)
    log.info(
        "vdep train: %d rank(s) via %s, device %s, precision %s, run directory %s",
        launch.world_size, launch.launcher, device, precision, run.path,
    )
    hosts = rank_hosts()
    log.info("vdep train: %d node(s): %s", len(set(hosts)), describe_hosts(hosts))
    on_rank_zero(lambda: prepare_run_dir(config, run), device)
    barrier()
    base = run.base_paths(config.model)
    context = RunContext(
        config=config,
        launch=launch,
        device=device,
        run=run,
        tokenizer=load_tokenizer(run.tokenizer),
        base=base,
        image_processing=load_image_processing(base, config.model.image_aspect_ratio == "pad"),
        precision=precision,
        stop=stop,
        faults=Faults.from_env(),
    )
    summaries = [run_stage(context, name, stage) for name, stage in config.stages_to_run()]
    barrier()
    log.info("vdep train: finished; run directory %s", run.path)
    return summaries
