"""Per-GPU memory of model states for LLaVA-1.5 + VDEP under ZeRO-2, ZeRO-3 and ZeRO-3 with optimizer
offload: computed from parameter counts (not measured), to choose a ds_configs preset.

    python benchmarks/zero_memory.py [--gpus 8] [--nodes 1] [--lora-r 128]

Model states in bf16 mixed precision with AdamW: 2 bytes per weight; for trainable parameters also
2 bytes of gradient and 12 bytes of optimizer state (fp32 master weight, Adam m and v). ZeRO-2 splits
gradients and optimizer state over the ranks, ZeRO-3 also the weights; offload moves the optimizer
state (and its update) to CPU memory. Activations, temporary buffers and the CUDA context come on top:
read memory/max_allocated_gib in TensorBoard for the measured peak.

LoRA rows (the llava15-7b-vdep-lora recipe): adapters of rank r on every Linear of the LLM plus the
projector train, the rest is frozen bf16. QLoRA rows: the LLM's Linear weights in NF4 with double
quantisation, 4 + 8/64 + 32/(64·256) bits per weight (bitsandbytes' block sizes); embeddings, norms,
the LM head and the vision tower in bf16. vdep runs QLoRA under ZeRO-2 only, so its ZeRO-3 cells are "-".
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class Llm:
    name: str
    hidden: int
    layers: int
    intermediate: int
    vocab: int = 32064  # Vicuna's 32000 + <image> and <pad>, padded to a multiple of 64

    @property
    def params(self) -> int:
        norms = 2 * self.hidden
        return self.linear_params + self.layers * norms + 2 * self.vocab * self.hidden + self.hidden

    @property
    def linear_params(self) -> int:
        """The decoder layers' Linear weights (q, k, v, o, gate, up, down): what LoRA adapts and QLoRA quantises."""
        return self.layers * (4 * self.hidden * self.hidden + 3 * self.hidden * self.intermediate)

    def lora_params(self, r: int) -> int:
        """Adapters on every Linear of the LLM: r·(in + out) each; q, k, v, o are h→h, gate and up h→i, down i→h."""
        return self.layers * r * (4 * 2 * self.hidden + 3 * (self.hidden + self.intermediate))


CLIP_L_336 = 303_507_456  # CLIPVisionModel ViT-L/14-336 (frozen)
MODELS = (Llm("Vicuna-7B", 4096, 32, 11008), Llm("Vicuna-13B", 5120, 40, 13824))


def projector_params(vision_hidden: int, text_hidden: int) -> int:
    return vision_hidden * text_hidden + text_hidden + text_hidden * text_hidden + text_hidden


NF4_BYTES = (4 + 8 / 64 + 32 / (64 * 256)) / 8  # per weight: 4 bits, an 8-bit absmax per 64, an fp32 per 256 absmax


def per_gpu(trainable: int, weight_bytes: float, preset: str, ranks: int) -> tuple[float, float]:
    """(GPU GiB, CPU GiB per rank) of weights, gradients and optimizer state."""
    grads, optimizer = 2 * trainable, 12 * trainable
    if preset == "zero2":
        return (weight_bytes + (grads + optimizer) / ranks) / GIB, 0.0
    if preset == "zero3":
        return (weight_bytes + grads + optimizer) / ranks / GIB, 0.0
    if preset == "zero3_offload":
        return (weight_bytes + grads) / ranks / GIB, optimizer / ranks / GIB
    raise ValueError(preset)


def stage_rows(llm: Llm, r: int) -> list[tuple[str, int, float, bool]]:
    """(stage, trainable parameters, weight bytes, runs under ZeRO-3) for each row of one LLM."""
    projector = projector_params(1024, llm.hidden)
    total = CLIP_L_336 + projector + llm.params
    lora = projector + llm.lora_params(r)
    qlora_weights = 2 * (total - llm.linear_params + lora) + NF4_BYTES * llm.linear_params
    return [
        ("align", projector, 2 * total, True),
        ("finetune", projector + llm.params, 2 * total, True),
        (f"finetune, LoRA r={r}", lora, 2 * (total + lora - projector), True),
        (f"finetune, QLoRA r={r} (nf4)", lora, qlora_weights, False),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--lora-r", type=int, default=128, help="LoRA rank of the LoRA rows (LLaVA: 128)")
    args = parser.parse_args()
    ranks = args.gpus * args.nodes
    print(f"model states per GPU, {args.nodes} node(s) x {args.gpus} GPU(s); activations not included\n")
    print("| LLM | stage | trainable | ZeRO-2 GPU | ZeRO-3 GPU | ZeRO-3 offload GPU | offload CPU per node |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for llm in MODELS:
        for stage, trainable, weight_bytes, zero3 in stage_rows(llm, args.lora_r):
            cells = []
            for preset in ("zero2", "zero3", "zero3_offload"):
                gpu, _ = per_gpu(trainable, weight_bytes, preset, ranks)
                cells.append(f"{gpu:.1f} GiB" if zero3 or preset == "zero2" else "-")
            cpu_node = per_gpu(trainable, weight_bytes, "zero3_offload", ranks)[1] * args.gpus
            offload = f"{cpu_node:.0f} GiB" if zero3 else "-"
            print(f"| {llm.name} | {stage} | {trainable / 1e9:.2f} B | {' | '.join(cells)} | {offload} |")


if __name__ == "__main__":
    main()
