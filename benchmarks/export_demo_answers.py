"""Answer the demo's held-out questions with transformers alone, from a `vdep export-hf` folder.

Uses only `AutoProcessor` (chat template + image processor) and `LlavaForConditionalGeneration.generate`,
as a user of the export would, and compares every answer with the one vdep gave during `vdep demo`
(RUN_DIR/held_out_answers.json).

    vdep demo --out vdep-demo
    vdep export-hf --checkpoint vdep-demo/vdep --out vdep-demo/export --dtype fp32
    python benchmarks/export_demo_answers.py --export vdep-demo/export --demo vdep-demo --run vdep
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", type=Path, required=True)
    parser.add_argument("--demo", type=Path, required=True, help="the folder given to `vdep demo --out`")
    parser.add_argument("--run", default="vdep", help="the run name inside it")
    args = parser.parse_args()

    model = LlavaForConditionalGeneration.from_pretrained(str(args.export), dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(str(args.export))
    records = json.loads((args.demo / "data" / "raw" / "eval.json").read_text())
    vdep_answers = {a["id"]: a for a in json.loads((args.demo / args.run / "held_out_answers.json").read_text())["answers"]}
    same = correct = 0
    for record in records:
        question = record["conversations"][0]["value"].replace("<image>\n", "")
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
        image = Image.open(args.demo / "data" / "raw" / "images" / record["image"])
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=10, do_sample=False)
        answer = processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        same += answer == vdep_answers[record["id"]]["answer"]
        correct += " ".join(answer.strip().lower().rstrip(".").split()) == record["conversations"][1]["value"]
    total = len(records)
    print("| questions | transformers answer = vdep answer | transformers accuracy | vdep accuracy |")
    print("| --- | --- | --- | --- |")
    vdep_accuracy = sum(a["correct"] for a in vdep_answers.values()) / total
    print(f"| {total} | {same}/{total} | {100 * correct / total:.1f}% | {100 * vdep_accuracy:.1f}% |")


if __name__ == "__main__":
    main()
