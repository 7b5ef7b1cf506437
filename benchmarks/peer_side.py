"""What benchmarks/peers.py runs inside a peer's own venv: the entry points and a Trainer callback.

Both peers train through transformers' Trainer, so one callback records, the same way for both:
- the wall clock at the end of every optimizer step (rank 0, `steps.jsonl`), which peers.py times
  exactly as it times vdep's `metrics.jsonl`;
- each logged loss (`losses.jsonl`);
- per rank, the geometry the Trainer itself used (world size, micro-batch, accumulation) and the
  first micro-batch the model was called with (`first_batch_rank<r>.json`: input ids, labels,
  attention mask), for peers.py to compare token by token with vdep's encoding of the same samples.

LLaMA-Factory runs through this file (`peer_side.py llamafactory CONFIG.yaml RECORD_DIR`: its run_exp with
the callback and the `vdep_vicuna_v1` template); ms-swift through its own `swift.cli.sft`, which imports
this file by `--custom_register_path` (with VDEP_BENCHMARK_PEER=ms-swift: the template, and the callback as
`--callbacks vdep_benchmark`).

Only transformers, torch and the peer's own package are imported here (no vdep: it is not installed
in the peers' venvs).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

# vdep's vicuna_v1 system text (vdep/data/templates.py: VICUNA_SYSTEM); its tests hold the two equal.
VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
TEMPLATE_NAME = "vdep_vicuna_v1"


def make_callback(out: Path):
    from transformers import TrainerCallback

    class BenchmarkCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            rank = args.process_index
            out.mkdir(parents=True, exist_ok=True)
            (out / f"geometry_rank{rank}.json").write_text(json.dumps({
                "world_size": args.world_size, "per_device_train_batch_size": args.per_device_train_batch_size,
                "gradient_accumulation_steps": args.gradient_accumulation_steps, "max_steps": state.max_steps,
                "train_batch_size": state.train_batch_size}))
            if model is None:
                return

            def first_call(module, positional, keywords):
                handle.remove()
                batch = {key: keywords[key].tolist() for key in ("input_ids", "labels", "attention_mask", "position_ids")
                         if keywords.get(key) is not None}
                if keywords.get("pixel_values") is not None:
                    batch["pixel_values_shape"] = list(keywords["pixel_values"].shape)
                (out / f"first_batch_rank{rank}.json").write_text(json.dumps(batch))

            handle = model.register_forward_pre_hook(first_call, with_kwargs=True)

        def on_step_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                with (out / "steps.jsonl").open("a") as lines:
                    lines.write(json.dumps({"step": state.global_step, "time": time.time()}) + "\n")

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs and "loss" in logs:
                with (out / "losses.jsonl").open("a") as lines:
                    lines.write(json.dumps({"step": state.global_step, "loss": logs["loss"]}) + "\n")

    return BenchmarkCallback()


# ------------------------------------------------------------------------------------ LLaMA-Factory
def register_llamafactory_template() -> None:
    """vdep's vicuna_v1 in LLaMA-Factory's terms: BOS, the system text, `USER: q ASSISTANT:`, the answer and
    EOS. (The stock `llava` template has no BOS and another system text.)"""
    from llamafactory.data.formatter import EmptyFormatter, StringFormatter
    from llamafactory.data.mm_plugin import get_mm_plugin
    from llamafactory.data.template import register_template

    register_template(
        name=TEMPLATE_NAME,
        format_prefix=EmptyFormatter(slots=[{"bos_token"}]),
        format_system=StringFormatter(slots=["{{content}}"]),
        format_user=StringFormatter(slots=["USER: {{content}} ASSISTANT:"]),
        default_system=VICUNA_SYSTEM,
        mm_plugin=get_mm_plugin(name="llava", image_token="<image>"),
    )


def run_llamafactory(config: str, out: str) -> None:
    from llamafactory.train.tuner import run_exp

    register_llamafactory_template()
    run_exp(read_yaml(config), callbacks=[make_callback(Path(out))])


def read_yaml(path: str) -> dict:
    import yaml

    return yaml.safe_load(Path(path).read_text())


# ----------------------------------------------------------------------------------------- ms-swift
def register_swift() -> None:
    """vdep's vicuna_v1 for ms-swift's `llava1_5_hf` model type (its stock template writes another prompt),
    and the callback as `--callbacks vdep_benchmark` (records in $VDEP_BENCHMARK_RECORD)."""
    from swift.callbacks import callbacks_map
    from swift.template import TemplateMeta, register_template
    from swift.template.templates.llava import LlavaHfTemplate

    class VicunaLlavaTemplate(LlavaHfTemplate):
        def replace_tag(self, media_type, index, inputs):
            return ["<image>"]  # the data keeps its own newline after <image>, as LLaVA's does

    register_template(TemplateMeta(
        TEMPLATE_NAME, prefix=[["bos_token_id"]], system_prefix=[["bos_token_id"], "{{SYSTEM}} "],
        prompt=["USER: {{QUERY}} ASSISTANT:"], chat_sep=["</s>"], suffix=["</s>"], default_system=VICUNA_SYSTEM,
        template_cls=VicunaLlavaTemplate))
    callbacks_map["vdep_benchmark"] = lambda args, trainer: make_callback(Path(os.environ["VDEP_BENCHMARK_RECORD"]))


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "llamafactory":
        raise SystemExit(__doc__)
    run_llamafactory(sys.argv[2], sys.argv[3])
elif os.environ.get("VDEP_BENCHMARK_PEER") == "ms-swift":  # imported by ms-swift's --custom_register_path
    register_swift()
