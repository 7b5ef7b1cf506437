"""The `vdep` command.

    vdep train RECIPE.yaml [key=value ...]        # every stage in order, or stage=NAME
    vdep demo [--out DIR] [--nproc N] [--no-vdep]
    vdep build-shards INPUT... --image-root DIR --out DIR [--workers N] [--shuffle --seed S] [--resume] ...
    vdep inspect-shards DIR [--tokenizer PATH --template NAME]
    vdep export-hf --checkpoint PATH --out DIR [--dtype bf16|fp16|fp32] [--verify] [--adapter]
    vdep make-tokenizer --shards DIR --vocab-size N --out DIR
    vdep eval --model PATH --data FILE --image-root DIR [--out answers.jsonl] [--batch-size N]
    vdep eval --data FILE --image-root DIR --write-lmms-task DIR
    vdep attention-map --model PATH [--compare PATH2 ...] --image IMG --question Q --out FIG.png

Heavy imports happen inside the subcommands, so `vdep --help` answers at once. Errors caused by the
user's input (`VdepError`) are printed as one message without a traceback, exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import EXIT_PREEMPTED, TrainingPreempted, VdepError

TRAIN_EXAMPLES = """\
examples:
  vdep train llava15-7b-vdep model.language_model.path=/models/vicuna-7b-v1.5 \\
      model.vision_tower.path=/models/clip-vit-large-patch14-336
  vdep train my-recipe.yaml stage=align stages.align.lr=2e-3
  torchrun --nproc-per-node 8 -m vdep train my-recipe.yaml
  deepspeed --num_gpus 8 --module vdep train my-recipe.yaml
  vdep train my-recipe.yaml --print-config        # show the resolved config and exit

RECIPE is a YAML file or the name of a shipped recipe (llava15-7b-vdep, llava15-7b-vdep-lora, demo-tiny, demo-tiny-paper).
Overrides use dotted keys of the config (docs/config.md); values are YAML (1e-3, true, [a, b]).
"""

DEMO_EXAMPLES = """\
examples:
  vdep demo                       # 2 CPU ranks under ZeRO-3, output in ./vdep-demo
  vdep demo --nproc 1 --out /tmp/demo
  vdep demo --no-vdep             # the same run without the VDEP objective, for comparison
  vdep demo --regime paper        # text pretraining, then align with the LLM frozen (the paper's regime)
  vdep demo vdep.alpha=0.5 run.name=alpha05   # extra config overrides for the training run
"""

BUILD_EXAMPLES = """\
examples:
  vdep build-shards llava_v1_5_mix665k.json --image-root /data/llava/images --out /data/shards/mix665k \\
      --workers 16 --shuffle --seed 0
  vdep build-shards blip_laion_cc_sbu_558k.json --image-root /data/llava-pretrain --out /data/shards/558k
  vdep build-shards /data/cc3m-img2dataset/ --out /data/shards/cc3m --caption-prompt "Describe the image."
  vdep build-shards part1.jsonl text_only.json --image-root imgs --out shards --resume   # after a crash
  vdep build-shards mix665k.json --image-root /data/llava --out s3://my-bucket/shards/mix665k --workers 16

INPUT is a LLaVA .json list or .jsonl file (id, image relative to --image-root, conversations; records
without an image are text-only), an img2dataset .tar, or a folder of them. See docs/data.md.
"""

INSPECT_EXAMPLES = """\
examples:
  vdep inspect-shards /data/shards/mix665k
  vdep inspect-shards /data/shards/mix665k --tokenizer /models/vicuna-7b-v1.5 --template vicuna_v1
  vdep inspect-shards s3://my-bucket/shards/mix665k/      # credentials and endpoint from the environment
"""

EXPORT_EXAMPLES = """\
examples:
  vdep export-hf --checkpoint runs/llava15-7b-vdep --out exports/llava15-7b-vdep
  vdep export-hf --checkpoint runs/my-run/finetune/checkpoints --out exports/step --dtype fp32 --verify
  vdep export-hf --checkpoint runs/my-run/align/final --out exports/align-only
  vdep export-hf --checkpoint runs/my-lora-run --out exports/lora --adapter --verify   # OUT/adapter: PEFT

CHECKPOINT is a run directory (its last complete stage, in recipe order; the base weights if none is;
a later stage's checkpoint only when named), a stage folder or its final/ (that stage's final weights),
or a stage's checkpoints/ folder (its latest) or one step folder: a DeepSpeed checkpoint of any number
of ranks. `vdep eval` and `vdep attention-map` read --model by the same rule (docs/export.md).
A LoRA stage is merged into the weights, or with --adapter written as a PEFT adapter (docs/export.md).
"""

EVAL_EXAMPLES = """\
examples:
  vdep eval --model vdep-demo/run-vdep --data vdep-demo/data/raw/eval.json --image-root vdep-demo/data/raw/images
  vdep eval --model exports/llava15-7b-vdep --data questions.jsonl --image-root images --out answers.jsonl
  vdep eval --model runs/my-run/align --data held_out_shards/ --batch-size 32
  vdep eval --model runs/my-run/finetune/checkpoints --data questions.jsonl --image-root images
  vdep eval --data questions.jsonl --image-root images --write-lmms-task lmms_task/   # for lmms-eval

--model is a run directory (its last complete stage), a stage folder, a stage's checkpoints/ folder or
one step folder (the model `vdep export-hf --checkpoint` exports from the same path; docs/export.md), or
an exported Hugging Face folder (answered by transformers' generate). --data is a LLaVA .json/.jsonl
file (the first human turn is the question, the first gpt turn the reference) or a shard directory.
Answers are compared after the VQA normalisation (case, punctuation, articles, number words);
`category` groups the accuracy (docs/export.md).
"""

ATTENTION_EXAMPLES = """\
examples:
  vdep attention-map --model vdep-demo/run-novdep --compare vdep-demo/run-vdep --image img.png \\
      --question "What colour is the shape?" --out attention.png --layers 0,1,3
  vdep attention-map --model exports/llava15-7b-vdep --image cat.jpg --question "Where is the cat?" \\
      --out cat.png --from answer --heads max

Each cell: the attention from the question (or answer) tokens to the image tokens at one layer, reduced over
heads, on the patch grid over the image; one row per model. The arrays are written beside FIG as FIG.npz.
A vdep path stands for the model `vdep export-hf --checkpoint` exports from it (docs/export.md).
"""

TOKENIZER_EXAMPLES = """\
examples:
  vdep make-tokenizer --shards vdep-demo/data/shards/align --vocab-size 1000 --out my-tokenizer
"""


def _strip_launcher_args(argv: list[str]) -> list[str]:
    """Remove `--local_rank=N` / `--local-rank N`, which the deepspeed launcher inserts (LOCAL_RANK is set too)."""
    cleaned: list[str] = []
    skip_next = False
    for index, arg in enumerate(argv):
        if skip_next:
            skip_next = False
            continue
        if arg.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
            continue
        if arg in ("--local_rank", "--local-rank") and index + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[index + 1])
            skip_next = True
            continue
        cleaned.append(arg)
    return cleaned


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vdep", description="Train LLaVA-style multimodal LLMs with VDEP under DeepSpeed."
    )
    parser.add_argument("--version", action="version", version=f"vdep {__import__('vdep').__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    formatter = argparse.RawDescriptionHelpFormatter

    train = commands.add_parser("train", help="train with a recipe (its stages in order, or stage=NAME)", epilog=TRAIN_EXAMPLES, formatter_class=formatter)
    train.add_argument("recipe", help="recipe YAML file or shipped recipe name")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    train.add_argument("--print-config", action="store_true", help="print the resolved config and exit")

    demo = commands.add_parser("demo", help="generate data and train a tiny model on CPU, then evaluate it", epilog=DEMO_EXAMPLES, formatter_class=formatter)
    demo.add_argument("--out", type=Path, default=Path("vdep-demo"), help="output folder (default: ./vdep-demo)")
    demo.add_argument("--nproc", type=int, default=2, help="number of CPU ranks (default: 2)")
    demo.add_argument("--no-vdep", action="store_true", help="train without the VDEP objective")
    demo.add_argument("--seed", type=int, default=0, help="seed of the data and the run (default: 0)")
    demo.add_argument("--regime", choices=("demo", "paper"), default="demo",
                      help="demo: recipe demo-tiny; paper: demo-tiny-paper, the LLM pretrained on text, then frozen "
                           "in align (default: demo)")
    demo.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the demo-tiny recipe")

    build = commands.add_parser("build-shards", help="LLaVA JSON/JSONL + images → WebDataset shards", epilog=BUILD_EXAMPLES, formatter_class=formatter)
    build.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="LLaVA .json/.jsonl, img2dataset .tar or folder")
    build.add_argument("--image-root", type=Path, help="folder the LLaVA records' 'image' paths are relative to")
    build.add_argument("--out", required=True,
                       help="output folder for the shards, or a bucket prefix (s3://BUCKET/PREFIX, gs://...)")
    build.add_argument("--staging", type=Path,
                       help="with a bucket --out: local folder where each file is written before its upload "
                            "(default: a folder under the system's temporary directory)")
    build.add_argument("--samples-per-shard", type=int, default=1000, help="records planned per shard (default: 1000)")
    build.add_argument("--workers", type=int, default=1, help="processes building shards in parallel (default: 1)")
    build.add_argument("--shuffle", action="store_true", help="write records in a seeded random order")
    build.add_argument("--seed", type=int, default=0, help="seed of --shuffle (default: 0)")
    build.add_argument("--resume", action="store_true", help="keep the finished shards of an interrupted build")
    build.add_argument("--max-error-rate", type=float, default=0.1,
                       help="exit non-zero when more than this fraction of records is rejected (default: 0.1)")
    build.add_argument("--max-side", type=int, help="re-encode images whose longer side exceeds this many pixels")
    from vdep.data_tools.sources import DEFAULT_CAPTION_PROMPT  # light: no torch, no PIL

    build.add_argument("--caption-prompt", default=DEFAULT_CAPTION_PROMPT,
                       help=f"user turn of img2dataset caption samples (default: {DEFAULT_CAPTION_PROMPT!r})")
    build.add_argument("--video-fps", type=float, default=1.0,
                       help="frames kept per second of a record's video file (default: 1.0, as LLaVA-NeXT samples)")
    build.add_argument("--max-frames", type=int, default=32,
                       help="most frames kept of a video, spread over all of it (default: 32)")
    build.add_argument("--part", type=int, default=0, help="build only this part of the plan (SLURM array task id; default: 0)")
    build.add_argument("--num-parts", type=int, default=1, help="number of parts the plan is split into (default: 1)")
    build.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")

    inspect = commands.add_parser("inspect-shards", help="count, check and sample a shard folder", epilog=INSPECT_EXAMPLES, formatter_class=formatter)
    inspect.add_argument("folder", help="a folder written by vdep build-shards, or a remote prefix (https://, s3://)")
    inspect.add_argument("--tokenizer", help="tokenizer folder or name for the token-length histogram")
    inspect.add_argument("--template", default="vicuna_v1", help="template for the token lengths (default: vicuna_v1)")
    inspect.add_argument("--num-image-tokens", type=int, default=576, help="placeholders per image (default: 576)")
    inspect.add_argument("--examples", type=int, default=3, help="samples to print (default: 3)")

    export = commands.add_parser("export-hf", help="export a checkpoint as a Hugging Face Llava folder", epilog=EXPORT_EXAMPLES, formatter_class=formatter)
    export.add_argument("--checkpoint", type=Path, required=True,
                        help="run directory (its last complete stage), stage folder, or checkpoints/ or a step folder")
    export.add_argument("--out", type=Path, required=True, help="new folder for the export")
    export.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                        help="dtype of the exported weights (default: bf16)")
    export.add_argument("--max-shard-size", default="5GB", help="largest weight file (default: 5GB)")
    export.add_argument("--verify", action="store_true", help="load the export with transformers and check parity")
    export.add_argument("--adapter", action="store_true",
                        help="a LoRA stage: write its PEFT adapter to OUT/adapter over the model it started from (OUT), "
                             "instead of merging it")

    tokenizer = commands.add_parser("make-tokenizer", help="train a small SentencePiece tokenizer on shard texts", epilog=TOKENIZER_EXAMPLES, formatter_class=formatter)
    tokenizer.add_argument("--shards", nargs="+", required=True, help="shard folder(s) to read texts from")
    tokenizer.add_argument("--vocab-size", type=int, required=True)
    tokenizer.add_argument("--out", type=Path, required=True,
                           help="new tokenizer folder (an existing one is refused, never overwritten)")
    _add_eval_parsers(commands, formatter)
    return parser


def _add_eval_parsers(commands, formatter) -> None:
    evaluate = commands.add_parser("eval", help="answer held-out questions and report accuracy", epilog=EVAL_EXAMPLES,
                                   formatter_class=formatter)
    evaluate.add_argument("--model", type=Path, help="run directory (its last complete stage), stage folder, checkpoints/ "
                                                      "or a step folder, or an exported Hugging Face folder")
    evaluate.add_argument("--data", type=Path, required=True, help="LLaVA .json/.jsonl file or shard directory")
    evaluate.add_argument("--image-root", type=Path, help="folder the records' 'image' paths are relative to")
    evaluate.add_argument("--out", type=Path, help="write every answer here (JSON lines)")
    evaluate.add_argument("--batch-size", type=int, default=16, help="questions decoded together (default: 16)")
    evaluate.add_argument("--max-new-tokens", type=int, default=16, help="longest answer in tokens (default: 16)")
    evaluate.add_argument("--video-fps", type=float, default=1.0,
                          help="frames kept per second of a record's video file, as build-shards keeps them (default: 1.0)")
    evaluate.add_argument("--max-frames", type=int, default=32,
                          help="most frames kept of a video, spread over all of it, as build-shards (default: 32)")
    evaluate.add_argument("--write-lmms-task", type=Path, metavar="DIR",
                          help="write an lmms-eval task for --data into DIR (new) and exit; needs no --model")

    attention = commands.add_parser("attention-map", help="draw the attention of the question to the image, per layer",
                                    epilog=ATTENTION_EXAMPLES, formatter_class=formatter)
    attention.add_argument("--model", type=Path, required=True,
                           help="run directory (its last complete stage), stage folder, checkpoints/ or a step folder, "
                                "or an exported folder")
    attention.add_argument("--compare", type=Path, nargs="*", help="more models, one row each")
    attention.add_argument("--image", type=Path, required=True)
    attention.add_argument("--question", required=True)
    attention.add_argument("--out", type=Path, required=True, help="the figure (.png); the arrays go to FIG.npz")
    attention.add_argument("--layers", help="comma-separated layer indices (default: every layer)")
    attention.add_argument("--heads", choices=("mean", "max"), default="mean", help="reduction over heads (default: mean)")
    attention.add_argument("--from", dest="source", choices=("question", "answer", "both"), default="question",
                           help="which tokens attend: the question's, the greedy answer's, or both (default: question)")
    attention.add_argument("--max-new-tokens", type=int, default=8, help="longest answer for --from answer/both (default: 8)")


def _eval(args: argparse.Namespace) -> int:
    from vdep.data_tools.media import VideoSampling

    from .eval.questions import load_questions

    if args.write_lmms_task is not None:
        from .eval.lmms import write_lmms_task

        questions = load_questions(args.data, args.image_root)
        task = write_lmms_task(questions, args.write_lmms_task, args.max_new_tokens)
        print(f"lmms-eval task {task.stem} written to {task.parent} ({len(questions.questions)} questions, "
              f"{len(questions.bad)} bad records left out)")
        for bad in questions.bad[:10]:
            print(f"  left out: {bad.describe()}")
        return 0
    if args.model is None:
        raise VdepError("vdep eval needs --model (or --write-lmms-task DIR)")
    from .eval.run import run_eval
    from .log import setup_logging

    setup_logging(0, 1)
    report = run_eval(args.model, args.data, args.image_root, args.out, args.batch_size, args.max_new_tokens,
                      VideoSampling(args.video_fps, args.max_frames))
    print(report.summary())
    if args.out is not None:
        print(f"answers: {args.out}")
    return 0


def _attention_map(args: argparse.Namespace) -> int:
    from .attention_map import AttentionRequest, draw_attention_maps

    layers = None
    if args.layers:
        try:
            layers = [int(item) for item in args.layers.split(",") if item.strip()]
        except ValueError:
            raise VdepError(f"--layers {args.layers!r}: give comma-separated layer numbers, e.g. 0,4,8") from None
    request = AttentionRequest(models=[args.model, *(args.compare or [])], image=args.image, question=args.question,
                               layers=layers, heads=args.heads, source=args.source, max_new_tokens=args.max_new_tokens)
    figure, arrays = draw_attention_maps(request, args.out)
    print(f"attention maps: {figure} (arrays: {arrays})")
    return 0


def _train(args: argparse.Namespace) -> int:
    from .config import config_to_yaml, load_config

    # Printing a config needs no data or models: the file checks are for training.
    config = load_config(args.recipe, args.overrides, files=not args.print_config)
    if args.print_config:
        print(config_to_yaml(config), end="")
        return 0
    from .train.run import train

    train(config)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if args.nproc < 1:
        raise VdepError("--nproc must be at least 1")
    return run_demo(args.out, nproc=args.nproc, vdep_enabled=not args.no_vdep, seed=args.seed, overrides=args.overrides,
                    regime=args.regime)


def _build_shards(args: argparse.Namespace) -> int:
    from vdep.data_tools.build_shards import BuildOptions, build_shards
    from vdep.data_tools.media import VideoSampling

    options = BuildOptions(
        inputs=args.inputs, image_root=args.image_root, out=args.out, samples_per_shard=args.samples_per_shard,
        workers=args.workers, shuffle=args.shuffle, seed=args.seed, resume=args.resume,
        max_error_rate=args.max_error_rate, max_side=args.max_side, caption_prompt=args.caption_prompt,
        part=args.part, num_parts=args.num_parts, progress=not args.no_progress, staging=args.staging,
        video=VideoSampling(args.video_fps, args.max_frames),
    )
    report = build_shards(options)
    print(report.summary())
    if not report.written:
        print("vdep: error: no sample was accepted; see errors.jsonl in the output folder", file=sys.stderr)
        return 1
    if report.error_rate > args.max_error_rate:
        print(f"vdep: error: {100 * report.error_rate:.2f}% of the records were rejected, more than "
              f"--max-error-rate {args.max_error_rate}; the shards are written, see errors.jsonl", file=sys.stderr)
        return 1
    return 0


def _inspect_shards(args: argparse.Namespace) -> int:
    from vdep.data_tools.inspect_shards import format_report, inspect_shards, make_length_encoder

    encode = make_length_encoder(args.tokenizer, args.template, args.num_image_tokens) if args.tokenizer else None
    report = inspect_shards(args.folder, encode, args.examples)
    print(format_report(report))
    return 0 if report.ok else 1


def _export_hf(args: argparse.Namespace) -> int:
    from .export.hf import export_hf
    from .log import setup_logging

    setup_logging(0, 1)
    result = export_hf(args.checkpoint, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                       adapter=args.adapter)
    print(f"exported {result.source.description} to {result.out}"
          + (f" (adapter: {result.adapter})" if result.adapter is not None else ""))
    if not args.verify:
        return 0
    from .export.verify import verify_export

    report = verify_export(result)
    print(report.summary())
    return 0 if report.passed else 1


def _make_tokenizer(args: argparse.Namespace) -> int:
    from vdep.data_tools.make_tokenizer import make_tokenizer

    out = make_tokenizer(args.shards, args.vocab_size, args.out)
    print(f"tokenizer written to {out}")
    return 0


COMMANDS = {
    "train": _train,
    "demo": _demo,
    "build-shards": _build_shards,
    "inspect-shards": _inspect_shards,
    "export-hf": _export_hf,
    "make-tokenizer": _make_tokenizer,
    "eval": _eval,
    "attention-map": _attention_map,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(_strip_launcher_args(list(sys.argv[1:] if argv is None else argv)))
    try:
        return COMMANDS[args.command](args)
    except VdepError as exc:
        rank = os.environ.get("RANK")
        prefix = f"vdep: error (rank {rank}): " if rank not in (None, "0") else "vdep: error: "
        print(prefix + str(exc), file=sys.stderr)
        return 2
    except TrainingPreempted:  # already logged, with the checkpoint to continue from
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        return 130
