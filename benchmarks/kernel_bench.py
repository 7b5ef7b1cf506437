"""The VDEP image term: fused Triton kernel vs eager PyTorch vs torch.compile of the reference.

    python benchmarks/kernel_bench.py                 # on a CUDA GPU: LLaVA-1.5 shapes, bf16
    TRITON_INTERPRET=1 python benchmarks/kernel_bench.py --smoke   # CPU: tiny shapes, checks it runs

For forward and forward+backward: median time, achieved bandwidth (bytes the fused kernel must move:
the selected hidden and target rows read once, the gradient rows written once) against a measured
device-to-device copy, and peak memory above the inputs. Prints a markdown table.

    python benchmarks/kernel_bench.py --num-warps 4,8,16   # also the fused kernel at other launch widths
    python benchmarks/kernel_bench.py --head linear        # the linear VDEP head (chunked GEMMs + kernel)

With the identity head a second table times the term inside a step: a dense stand-in for the text
loss's gradient flows into the same hidden states, and each variant's increment over that step alone
is what the term costs in training; there the pass-through form adds its rows into the text gradient.

The bandwidth counts the bytes the term needs. Every implementation's backward also fills the whole
(B·T, D) gradient of the hidden states (and of the targets when not detached) with zeros first, as
autograd needs a full-size gradient; the header gives those bytes, which the GB/s figures leave out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from torch import nn


def make_inputs(batch: int, length: int, hidden: int, image_tokens: int, dtype: torch.dtype, device: torch.device):
    h = torch.randn(batch, length, hidden, dtype=dtype, device=device, requires_grad=True)
    e = torch.randn(batch, length, hidden, dtype=dtype, device=device, requires_grad=True)
    targets = torch.zeros(batch, length, dtype=torch.bool, device=device)
    targets[:, 2:2 + image_tokens] = True  # LLaVA: the image span after BOS and the first token
    targets[:, 2] = False  # the first image token has no image predecessor (skip_first_image_token)
    return h, e, targets


def timed(fn, device: torch.device, repeats: int) -> tuple[float, float]:
    """(median seconds, peak bytes allocated above the start) of fn(). On CUDA the time comes from CUDA
    events around many back-to-back calls (`triton.testing.do_bench`, which also clears the L2 cache
    between them): a host clock around one ~35 µs call would mostly time its launch. On CPU (the smoke run
    in Triton's interpreter) a host clock; those numbers mean nothing."""
    if device.type == "cuda":
        from triton.testing import do_bench

        seconds = do_bench(fn, warmup=25, rep=max(100, 5 * repeats), return_mode="median") / 1e3
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return seconds, torch.cuda.max_memory_allocated() - base
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), float("nan")


class Rows:
    """Each measured row as one JSON line (`--jsonl`), written and flushed as soon as it is measured."""

    def __init__(self, path: str | None):
        self.file = open(path, "a") if path else None  # noqa: SIM115 (open for the whole run)

    def write(self, **row) -> None:
        if self.file:
            self.file.write(json.dumps({"part": "kernel", **row}) + "\n")
            self.file.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU with TRITON_INTERPRET=1)")
    parser.add_argument("--norm", default="layernorm", choices=["none", "layernorm", "l2"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--head", default="identity", choices=["identity", "linear"],
                        help="vdep.head: linear adds a D×D GEMM per selected row (its GB/s figures then mean little)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows (their compile is slow)")
    parser.add_argument("--jsonl", help="append one JSON line per row here")
    parser.add_argument("--num-warps", default="",
                        help="comma-separated warps per program to time the fused kernel at, besides its default")
    args = parser.parse_args()
    try:
        warp_counts = [int(w) for w in args.num_warps.split(",") if w.strip()]
    except ValueError:
        parser.error(f"--num-warps takes comma-separated integers such as 4,8,16, not {args.num_warps!r}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("no CUDA device: run with TRITON_INTERPRET=1 and --smoke")

    from vdep.kernels import fused_vdep
    from vdep.kernels.fused_vdep import fused_vdep_sum
    from vdep.objectives.losses import reference_vdep_sum

    if args.smoke:
        batch, length, hidden, image_tokens, dtype, repeats = 2, 40, 64, 16, torch.float32, 2
    else:  # LLaVA-1.5-7B finetune micro-batch: 576 image tokens, hidden 4096, bf16
        batch, length, hidden, image_tokens, dtype, repeats = 16, 2048, 4096, 576, torch.bfloat16, args.repeats
    h, e, targets = make_inputs(batch, length, hidden, image_tokens, dtype, device)
    rows = int(targets.sum())
    element = h.element_size()
    forward_bytes = 2 * rows * hidden * element  # one predictor row and one target row per selected position
    backward_bytes = forward_bytes + 2 * rows * hidden * element  # reread both, write both gradients

    copy_source = torch.empty(rows * hidden * 2, dtype=dtype, device=device)
    copy_target = torch.empty_like(copy_source)
    copy_time, _ = timed(lambda: copy_target.copy_(copy_source), device, repeats)
    copy_bandwidth = 2 * copy_source.numel() * element / copy_time  # read + write

    if args.head == "linear":
        head = nn.Linear(hidden, hidden, bias=False).to(device=device, dtype=dtype)
        # Each side's GEMM on the selected rows, forward and backward (input and weight gradients).
        gemm_flops = 2 * rows * hidden * hidden
        print(f"linear head: {gemm_flops / 1e9:.0f} GFLOP forward, {3 * gemm_flops / 1e9:.0f} forward+backward")
    else:
        head = nn.Identity()
    default_warps = fused_vdep.launch_warps(fused_vdep.row_block(hidden))
    implementations = {"eager reference": (reference_vdep_sum, None),
                       f"fused (Triton, {default_warps} warps)": (fused_vdep_sum, None)}
    for warps in warp_counts:
        implementations[f"fused (Triton, {warps} warps)"] = (fused_vdep_sum, warps)
    if device.type == "cuda" and not args.no_compile:
        implementations["torch.compile(reference)"] = (torch.compile(reference_vdep_sum, dynamic=False), None)
    records = Rows(args.jsonl)
    zero_filled = 2 * h.numel() * element  # grad of hidden and of the targets (detach_target=False below)

    print(f"VDEP term: {batch}x{length}x{hidden} {str(dtype).removeprefix('torch.')}, {rows} selected rows, "
          f"norm {args.norm}, head {args.head}, device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu (interpreter)'}; "
          f"copy bandwidth {copy_bandwidth / 1e9:.0f} GB/s; the backward's zero-filled full-size gradients: "
          f"{zero_filled / 2**20:.0f} MiB, against {backward_bytes / 2**20:.0f} MiB that fwd+bwd needs\n")
    records.write(row="copy", copy_gb_s=copy_bandwidth / 1e9, device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
    print("| implementation | fwd ms | fwd GB/s | fwd+bwd ms | fwd+bwd GB/s | % of copy bw (fwd+bwd) | × eager (fwd+bwd) "
          "| peak MiB (fwd+bwd) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
    eager = None
    for name, (fn, warps) in implementations.items():
        fused_vdep.NUM_WARPS_OVERRIDE = warps

        def forward(fn=fn):
            with torch.no_grad():
                fn(h, e, targets, head, target_norm=args.norm, detach_target=False)

        def forward_backward(fn=fn):
            h.grad = e.grad = None
            fn(h, e, targets, head, target_norm=args.norm, detach_target=False).backward()

        fwd, _ = timed(forward, device, repeats)
        both, peak = timed(forward_backward, device, repeats)
        eager = both if eager is None else eager  # the eager reference is the first row
        print(f"| {name} | {fwd * 1e3:.3f} | {forward_bytes / fwd / 1e9:.0f} | {both * 1e3:.3f} | "
              f"{backward_bytes / both / 1e9:.0f} | {100 * backward_bytes / both / copy_bandwidth:.0f}% | "
              f"{eager / both:.2f} | {peak / 2**20:.0f} |", flush=True)
        records.write(row=name, table="term", head=args.head, fwd_ms=fwd * 1e3, fwd_gb_s=forward_bytes / fwd / 1e9,
                   fwd_bwd_ms=both * 1e3, fwd_bwd_gb_s=backward_bytes / both / 1e9,
                   percent_of_copy=100 * backward_bytes / both / copy_bandwidth, times_eager=eager / both,
                   peak_mib=peak / 2**20)
    fused_vdep.NUM_WARPS_OVERRIDE = None
    if args.head == "identity":
        in_a_step(h, e, targets, args.norm, device, repeats, copy_bandwidth, records, compile_reference=not args.no_compile)


def in_a_step(h, e, targets, norm: str, device, repeats: int, copy_bandwidth: float, records: Rows,
              compile_reference: bool = True) -> None:
    """What the term adds to a step in which a dense text-loss gradient already flows into the hidden
    states (detached targets, the default): that is where the pass-through saves the zero-filled
    gradient and the extra full-size sum."""
    from vdep.kernels.fused_vdep import fused_vdep_pass_through, fused_vdep_sum
    from vdep.objectives.losses import reference_vdep_sum

    weights = torch.randn_like(h)  # the text stand-in: its gradient is a fresh dense tensor, as the LM head's path gives

    def text_loss(hidden):
        return (hidden * weights).sum().float()

    def sum_form(fn):
        return lambda: (h, fn(h, e, targets, nn.Identity(), target_norm=norm, detach_target=True))

    variants = {
        "text stand-in alone": lambda: (h, h.new_zeros((), dtype=torch.float32)),
        "+ eager reference": sum_form(reference_vdep_sum),
        "+ fused (Triton)": sum_form(fused_vdep_sum),
        "+ fused pass-through (Triton)": lambda: fused_vdep_pass_through(h, e, targets, target_norm=norm, detach_target=True),
    }
    if device.type == "cuda" and compile_reference:
        variants["+ torch.compile(reference)"] = sum_form(torch.compile(reference_vdep_sum, dynamic=False))
    rows = int(targets.sum())
    needed = 5 * rows * h.shape[-1] * h.element_size()  # forward reads 2 row sets; backward reads 2, writes 1
    print(f"\nIn a step: text stand-in + VDEP, forward+backward, detached targets. The VDEP increment is the time "
          f"over the text stand-in alone; its GB/s count {needed / 2**20:.0f} MiB (the rows the term must move).\n")
    print("| variant | fwd+bwd ms | VDEP increment ms | increment GB/s | % of copy bw | peak MiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    alone = None
    for name, forward in variants.items():
        def step(forward=forward):
            h.grad = e.grad = None
            text_hidden, vdep = forward()
            (text_loss(text_hidden) + vdep).backward()

        seconds, peak = timed(step, device, repeats)
        if alone is None:
            alone = seconds
            print(f"| {name} | {seconds * 1e3:.3f} | - | - | - | {peak / 2**20:.0f} |", flush=True)
            continue
        increment = seconds - alone
        rate = needed / increment if increment > 0 else float("inf")
        print(f"| {name} | {seconds * 1e3:.3f} | {increment * 1e3:.3f} | {rate / 1e9:.0f} | "
              f"{100 * rate / copy_bandwidth:.0f}% | {peak / 2**20:.0f} |", flush=True)
        records.write(row=name, table="in a step", step_ms=seconds * 1e3, increment_ms=increment * 1e3,
                   increment_gb_s=rate / 1e9, percent_of_copy=100 * rate / copy_bandwidth, peak_mib=peak / 2**20)


if __name__ == "__main__":
    main()
