"""Weight layers: named tensors that go on top of a model's base weights, read one tensor at a time.

A layer is a stage's final weights (`SafetensorsLayer`), the fp32 master weights of a DeepSpeed
checkpoint merged from any number of ranks' partitions (`ZeroCheckpointLayer`, through DeepSpeed's
`zero_to_fp32`), or tensors already in memory (`TensorsLayer`). Nothing is read until a layer is
opened, and then one tensor at a time, so a 7B stage result never sits in memory twice.

`rundir.resolve_model` says which layers make a model; `model.loading.load_layers` copies them in.
"""

from __future__ import annotations

import contextlib
import pickle
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from .errors import CheckpointError


class LayerReader(Protocol):
    def names(self) -> list[str]:
        """Every tensor name of the layer, in the layer's order (the same on every rank)."""
        ...

    def read(self, name: str) -> torch.Tensor:
        """One tensor, read now; each name is read once."""
        ...


class WeightLayer(ABC):
    """Named tensors applied on top of the model, read lazily."""

    @property
    @abstractmethod
    def description(self) -> str:
        """Where the tensors are, for messages: a path, or what made them."""

    @abstractmethod
    def open(self) -> contextlib.AbstractContextManager[LayerReader]:
        """The layer's reader; errors in reading it are `CheckpointError`s that name it."""


@dataclass(frozen=True)
class SafetensorsLayer(WeightLayer):
    """A safetensors file: a stage's `final/trainable.safetensors`, or the projector's initial weights."""

    path: Path

    @property
    def description(self) -> str:
        return str(self.path)

    @contextlib.contextmanager
    def open(self) -> Iterator[LayerReader]:
        from safetensors import SafetensorError, safe_open

        if not self.path.is_file():
            raise CheckpointError(f"{self.path} does not exist")
        try:
            with safe_open(str(self.path), framework="pt") as weights:
                yield _SafetensorsReader(weights, self.path)
        except SafetensorError as exc:
            raise CheckpointError(f"{self.path} is not a readable safetensors file ({exc}); was its writing "
                                  "interrupted? Train the stage again, or pass another stage's result") from None


class _SafetensorsReader:
    def __init__(self, weights, path: Path):
        self.weights, self.path = weights, path

    def names(self) -> list[str]:
        return list(self.weights.keys())

    def read(self, name: str) -> torch.Tensor:
        return self.weights.get_tensor(name)


# What reading a DeepSpeed checkpoint that lost files, or was cut short, raises inside zero_to_fp32.
_ZERO_READ_ERRORS = (OSError, ValueError, RuntimeError, KeyError, EOFError, pickle.UnpicklingError)


@dataclass(frozen=True)
class ZeroCheckpointLayer(WeightLayer):
    """The fp32 master weights of a DeepSpeed checkpoint (ZeRO-2 or ZeRO-3, any number of ranks): what
    the optimizer updates, so an export or evaluation of the checkpoint sees the values training had."""

    checkpoints: Path  # a stage's checkpoints/ folder
    tag: str  # the step folder inside it

    @property
    def description(self) -> str:
        return str(self.checkpoints / self.tag)

    @contextlib.contextmanager
    def open(self) -> Iterator[LayerReader]:
        # DeepSpeed is imported here, not through train/ds.py, so that the run directory's modules import
        # nothing of train/. Reading files compiles no op, and DeepSpeed, left to choose, picks the
        # accelerator ds.configure_environment would set (CUDA when a GPU is visible, else the CPU).
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            state = get_fp32_state_dict_from_zero_checkpoint(str(self.checkpoints), tag=self.tag, lazy_mode=True)
        except _ZERO_READ_ERRORS as exc:
            raise CheckpointError(
                f"{self.description}: DeepSpeed cannot read this checkpoint's weights ({type(exc).__name__}: {exc}); "
                f"pass {self.checkpoints} for the latest checkpoint that every rank finished writing"
            ) from None
        yield _ZeroReader(state)


class _ZeroReader:
    def __init__(self, state: dict):
        self.state = state

    def names(self) -> list[str]:
        return list(self.state)

    def read(self, name: str) -> torch.Tensor:
        return self.state.pop(name).contiguous()  # materialises one parameter, merged from every rank's partition


@dataclass(frozen=True, eq=False)
class TensorsLayer(WeightLayer):
    """Tensors already in memory (merged LoRA weights, tests)."""

    tensors: dict[str, torch.Tensor]
    source: str  # what the tensors are, for messages

    @property
    def description(self) -> str:
        return self.source

    @contextlib.contextmanager
    def open(self) -> Iterator[LayerReader]:
        yield _TensorsReader(self.tensors)


class _TensorsReader:
    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def read(self, name: str) -> torch.Tensor:
        return self.tensors[name]
