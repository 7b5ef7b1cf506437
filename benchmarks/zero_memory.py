"""Per-GPU memory of model states for LLaVA-1.5 + VDEP under ZeRO-2, ZeRO-3 and ZeRO-3 with optimizer
offload: computed from parameter counts (not measured), to choose a ds_configs preset.

    python benchmarks/zero_memory.py [--gpus 8] [--nodes 1]

Model states in bf16 mixed precision with AdamW: 2 bytes per weight; for trainable parameters also
2 bytes of gradient and 12 bytes of optimizer state (fp32 master weight, Adam m and v). ZeRO-2 splits
gradients and optimizer state over the ranks, ZeRO-3 also the weights; offload moves the optimizer
state (and its update) to CPU memory. Activations, temporary buffers and the CUDA context come on top:
read memory/max_allocated_gib in TensorBoard for the measured peak.
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
        attention = 4 * self.hidden * self.hidden
        mlp = 3 * self.hidden * self.intermediate
        norms = 2 * self.hidden
        return self.layers * (attention + mlp + norms) + 2 * self.vocab * self.hidden + self.hidden


CLIP_L_336 = 303_507_456  # CLIPVisionModel ViT-L/14-336 (frozen)
MODELS = (Llm("Vicuna-7B", 4096, 32, 11008), Llm("Vicuna-13B", 5120, 40, 13824))


def projector_params(vision_hidden: int, text_hidden: int) -> int:
    return vision_hidden * text_hidden + text_hidden + text_hidden * text_hidden + text_hidden


def per_gpu(trainable: int, frozen: int, preset: str, ranks: int) -> tuple[float, float]:
    """(GPU GiB, CPU GiB per rank) of weights, gradients and optimizer state."""
    weights = 2 * (trainable + frozen)
    grads, optimizer = 2 * trainable, 12 * trainable
    if preset == "zero2":
        return (weights + (grads + optimizer) / ranks) / GIB, 0.0
    if preset == "zero3":
        return (weights + grads + optimizer) / ranks / GIB, 0.0
    if preset == "zero3_offload":
        return (weights + grads) / ranks / GIB, optimizer / ranks / GIB
    raise ValueError(preset)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    parser.add_argument("--nodes", type=int, default=1)
    args = parser.parse_args()
    ranks = args.gpus * args.nodes
    print(f"model states per GPU, {args.nodes} node(s) x {args.gpus} GPU(s); activations not included\n")
    print("| LLM | stage | trainable | ZeRO-2 GPU | ZeRO-3 GPU | ZeRO-3 offload GPU | offload CPU per node |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for llm in MODELS:
        projector = projector_params(1024, llm.hidden)
        for stage, trainable in (("align", projector), ("finetune", projector + llm.params)):
            frozen = CLIP_L_336 + projector + llm.params - trainable
            cells = []
            for preset in ("zero2", "zero3", "zero3_offload"):
                gpu, cpu = per_gpu(trainable, frozen, preset, ranks)
                cells.append(f"{gpu:.1f} GiB")
            cpu_node = per_gpu(trainable, frozen, "zero3_offload", ranks)[1] * args.gpus
            print(f"| {llm.name} | {stage} | {trainable / 1e9:.2f} B | {' | '.join(cells)} | {cpu_node:.0f} GiB |")


if __name__ == "__main__":
    main()
