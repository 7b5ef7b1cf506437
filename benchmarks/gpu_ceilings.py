"""The device's ceilings: device-to-device copy bandwidth and the dense bf16 matmul rate.

    python benchmarks/gpu_ceilings.py [--jsonl FILE]     # on a CUDA GPU: a 1 GiB copy, 8192³ bf16 matmuls
    python benchmarks/gpu_ceilings.py --smoke            # CPU, tiny sizes: checks that it runs

Timed with CUDA events (`triton.testing.do_bench`, through kernel_bench.timed). The copy's GB/s counts the
bytes read and written. The other GPU figures are read against these: the fused VDEP kernel's bandwidth
against the copy, the training runs' MFU against the matmul rate (benchmarks/gpu_run.sh).
"""

from __future__ import annotations

import argparse
import json

import torch
from kernel_bench import timed


def copy_seconds(size: int, device: torch.device) -> float:
    """Median time of one device-to-device copy of `size` bytes (the buffers are freed on return)."""
    source = torch.empty(size // 2, dtype=torch.bfloat16, device=device)
    target = torch.empty_like(source)
    seconds, _ = timed(lambda: target.copy_(source), device, 10)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (a CPU can run it; the numbers mean nothing)")
    parser.add_argument("--jsonl", help="append one JSON line per row here")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        raise SystemExit("no CUDA device: run with --smoke")
    copy_bytes = 4 * 2**20 if args.smoke else 2**30
    side = 256 if args.smoke else 8192
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16  # CPU bf16 matmuls are emulated and slow

    copy_gb_s = 2 * copy_bytes / copy_seconds(copy_bytes, device) / 1e9
    a = torch.randn(side, side, dtype=dtype, device=device)
    b = torch.randn(side, side, dtype=dtype, device=device)
    seconds, _ = timed(lambda: a @ b, device, 10)
    matmul_tflops = 2 * side**3 / seconds / 1e12

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    rows = [
        {"part": "ceilings", "row": "device-to-device copy", "bytes": copy_bytes, "gb_s": copy_gb_s, "device": name},
        {"part": "ceilings", "row": f"{str(dtype).removeprefix('torch.')} matmul {side}³", "tflops": matmul_tflops,
         "device": name},
    ]
    print(f"| ceiling ({name}) | rate |\n| --- | --- |")
    print(f"| device-to-device copy, {copy_bytes / 2**20:g} MiB (read + write) | {copy_gb_s:.0f} GB/s |")
    print(f"| {rows[1]['row']} | {matmul_tflops:.1f} TFLOP/s |", flush=True)
    if args.jsonl:
        with open(args.jsonl, "a") as out:
            out.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
    main()
