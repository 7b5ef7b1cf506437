"""Which attention kernels actually run, padded and packed, where vdep's `auto` choice sends them.

    python benchmarks/attention_kernels.py [--jsonl FILE]   # on a CUDA GPU: the 1.1B Llama shape, 2 layers
    python benchmarks/attention_kernels.py --smoke           # CPU, tiny shapes: checks that it runs

The language model is called as `VdepLlava.hidden_states` calls it: input embeddings, plus an attention
mask for padded rows, or per-sample position ids and no mask for packed rows (transformers then confines
attention to each sample: SDPA with a block-diagonal mask, a FlexAttention block mask, or varlen
flash-attn). One forward+backward runs under torch.profiler after a warm-up; the table lists the
kernels (CUDA) or operators (CPU) whose names say attention, with their time, and the step's time
(CUDA events).
"""

from __future__ import annotations

import argparse
import json
import re

import torch
from kernel_bench import timed

ATTENTION_NAME = re.compile(r"attn|attention|flash|fmha|flex|sdpa|triton_tem", re.IGNORECASE)


def rows_for(packed: bool, batch: int, length: int, device: torch.device) -> dict:
    """The LLM's inputs for `batch` samples of lengths between length/4 and length/2 (LLaVA-like)."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(length // 4, length // 2, (batch,), generator=generator).tolist()
    if not packed:
        mask = torch.zeros(batch, max(lengths), dtype=torch.long)
        for row, n in enumerate(lengths):
            mask[row, :n] = 1
        return {"attention_mask": mask.to(device), "shape": (batch, max(lengths))}
    rows, current = [], []
    for n in lengths:  # first fit into rows of `length` tokens, as data/batch.py packs
        if sum(current) + n > length:
            rows.append(current)
            current = []
        current.append(n)
    rows.append(current)
    positions = torch.zeros(len(rows), length, dtype=torch.long)
    for index, row in enumerate(rows):
        position = torch.cat([torch.arange(n) for n in row] + [torch.arange(length - sum(row))])
        positions[index] = position
    return {"position_ids": positions.to(device), "shape": (len(rows), length)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--jsonl", help="append one JSON line per row here")
    args = parser.parse_args()
    from transformers import LlamaConfig, LlamaModel

    from vdep.model.attention import choose_attention

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        raise SystemExit("no CUDA device: run with --smoke")
    if args.smoke:
        shape = {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "intermediate_size": 128}
        batch, length, dtype = 4, 128, torch.float32
    else:  # TinyLlama-1.1B's attention (train_throughput.py's 1b), 2 of its 22 layers
        shape = {"hidden_size": 2048, "num_hidden_layers": 2, "num_attention_heads": 32, "num_key_value_heads": 4,
                 "intermediate_size": 5632}
        batch, length, dtype = 16, 2048, torch.bfloat16
    out = open(args.jsonl, "a") if args.jsonl else None  # noqa: SIM115
    print("| rows | vdep's choice (auto) | attention kernels (fwd+bwd, profiler time) | fwd+bwd ms |\n| --- | --- | --- | --- |",
          flush=True)
    for packed in (False, True):
        choice = choose_attention("auto", device, packing=packed)
        model = LlamaModel(LlamaConfig(**shape, vocab_size=32, max_position_embeddings=length,
                                       attn_implementation=choice.implementation)).to(device=device, dtype=dtype)
        inputs = rows_for(packed, batch, length, device)
        shape_of = inputs.pop("shape")
        embeds = torch.randn(*shape_of, shape["hidden_size"], device=device, dtype=dtype, requires_grad=True)

        def step(model=model, inputs=inputs, embeds=embeds):
            model(inputs_embeds=embeds, use_cache=False, **inputs).last_hidden_state.float().sum().backward()

        seconds, _ = timed(step, device, 3)
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch.profiler.profile(activities=activities) as profile:
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
        kernels: dict[str, float] = {}
        for event in profile.events():
            on_device = device.type == "cuda" and event.device_type == torch.autograd.DeviceType.CUDA
            on_host = device.type == "cpu" and event.name.startswith("aten::")
            if (on_device or on_host) and ATTENTION_NAME.search(event.name):
                kernels[event.name] = kernels.get(event.name, 0.0) + (event.device_time if on_device else event.cpu_time)
        listed = "; ".join(f"`{name[:90]}` {us / 1e3:.2f} ms" for name, us in sorted(kernels.items(), key=lambda kv: -kv[1]))
        rows = f"{'packed' if packed else 'padded'}, {shape_of[0]}×{shape_of[1]}"
        print(f"| {rows} | {choice.implementation} ({choice.reason}) | {listed or 'none matched'} | {seconds * 1e3:.2f} |",
              flush=True)
        if out:
            out.write(json.dumps({"part": "attention", "row": rows, "implementation": choice.implementation,
                                  "reason": choice.reason, "kernels_ms": {k: v / 1e3 for k, v in kernels.items()},
                                  "fwd_bwd_ms": seconds * 1e3}) + "\n")
            out.flush()


if __name__ == "__main__":
    main()
