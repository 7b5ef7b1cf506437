"""Logging setup: rank 0 reports progress; every rank reports its warnings and errors.

Rank 0 writes INFO and above to stdout and to RUN_DIR/logs/train.log; the other ranks write WARNING and
above to stderr, prefixed with their rank.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

LOGGER_NAME = "vdep"


def get_logger(name: str = "") -> logging.Logger:
    return logging.getLogger(f"{LOGGER_NAME}.{name}" if name else LOGGER_NAME)


def setup_logging(rank: int, world_size: int, log_file: Path | None = None) -> logging.Logger:
    logger = get_logger()
    logger.handlers.clear()
    logger.propagate = False
    prefix = f"[rank {rank}] " if world_size > 1 else ""
    formatter = logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(message)s", "%H:%M:%S")
    if rank == 0:
        logger.setLevel(logging.INFO)
        stream = logging.StreamHandler(sys.stdout)
        if log_file is not None:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            file_handler = logging.FileHandler(log_file)
            file_handler.setFormatter(formatter)
            logger.addHandler(file_handler)
    else:
        logger.setLevel(logging.WARNING)
        stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(formatter)
    logger.addHandler(stream)
    # DeepSpeed still calls collectives that torch has deprecated; the warning is not for our users.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    # Libraries' own chatter (DeepSpeed's INFO lines, transformers' progress bars) stays out of the way.
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    return logger
