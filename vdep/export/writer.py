"""Sharded safetensors with an index, streamed tensor by tensor.

A shard is a list of references to the model's own tensors until it is written; writing streams each
tensor's bytes straight into the file (`safetensors.torch.save_file` would first build the whole shard
in memory: a second copy of the model when it fits in one shard). Files are named
`model-0000k-of-0000n.safetensors` (renamed once n is known) with `model.safetensors.index.json`, as
transformers writes them.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

INDEX_FILE = "model.safetensors.index.json"
SAFETENSORS_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file (8-byte header length, JSON header, raw little-endian data) without
    holding more than one tensor's conversion in memory."""
    header: dict[str, object] = {"__metadata__": metadata or {}}
    offset = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with path.open("wb") as out:
        out.write(len(encoded).to_bytes(8, "little"))
        out.write(encoded)
        for tensor in tensors.values():
            data = tensor.detach().to("cpu").contiguous()
            if data.numel():
                out.write(data.view(-1).view(torch.uint8).numpy().data)  # no copy for CPU tensors


def parse_size(size: str | int) -> int:
    """`5GB`, `500MB`, `2GiB` or a byte count."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", size, re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read the size {size!r} (examples: 5GB, 500MB)")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(number * base**power)


class ShardedWriter:
    def __init__(self, out: Path, max_shard_bytes: int):
        self.out = out
        self.max_shard_bytes = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []  # tensor names per written shard
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.out / f"shard-{len(self.shards):05d}.tmp"
        write_safetensors(path, self.pending, metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[Path]:
        if self.pending or not self.shards:
            self._flush()
        count = len(self.shards)
        weight_map, files = {}, []
        for index, names in enumerate(self.shards):
            final = self.out / f"model-{index + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.out / f"shard-{index:05d}.tmp", final)
            files.append(final)
            weight_map.update({name: final.name for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out / INDEX_FILE).write_text(json.dumps(index, indent=2))
        return files
