#!/usr/bin/env bash
# One prepared GPU session, in one call of at most 8 minutes (docs/benchmarks.md, "On a GPU"):
#
#   bash benchmarks/gpu_run.sh OUT            # on one H100/H200, with the wheels in .whl/ beside the checkout
#   bash benchmarks/gpu_run.sh --smoke OUT    # on a CPU: tiny shapes, the same scripts (CI runs this)
#
# Five parts, each capped by `timeout` so that a failure or a hang loses only its own rows:
#   1. ceilings: device-to-device copy bandwidth (1 GiB) and the bf16 matmul rate (benchmarks/gpu_ceilings.py)
#   2. the fused VDEP kernel: GB/s, % of copy, × eager, and its increment inside a step (benchmarks/kernel_bench.py)
#   3. attention: the kernels that run for padded and packed rows (benchmarks/attention_kernels.py)
#   4. training: a ~1B LLaVA (CLIP ViT-L/14-336 + a 1.1B Llama) at ZeRO-2: vdep with VDEP on, with VDEP off, and
#      the HF Trainer from the same weights and config; samples/s, MFU against part 1's matmul rate, peak
#      memory, VDEP's overhead as median and IQR of step times (benchmarks/train_throughput.py)
#   5. anyres: the same model with VDEP on, pad against LLaVA-NeXT's AnyRes (up to 2,928 image tokens an image),
#      at a micro-batch of 8 and 4096 tokens: samples/s, tokens/s, MFU and peak memory of each (train_throughput.py)
# Every timing on the GPU comes from CUDA events (do_bench) or, for training, the wall clock between step
# ends after a CUDA sync. Rows are printed as they are measured and appended, one JSON line each, to
# OUT/results.jsonl; each part's full output is in OUT/<part>.log.
set -u
smoke=0
if [ "${1:-}" = "--smoke" ]; then smoke=1; shift; fi
if [ $# -ne 1 ]; then echo "usage: bash benchmarks/gpu_run.sh [--smoke] OUT" >&2; exit 2; fi
mkdir -p "$1" && out=$(cd "$1" && pwd) || exit 2
cd "$(dirname "$0")/.." || exit 2
results=$out/results.jsonl
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
started=$(date +%s)
failed=0

# part NAME LIMIT_S COMMAND...: run it under timeout, show its output as it comes, record how it ended.
part() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit} s)"
    local t0
    t0=$(date +%s)
    timeout --kill-after=15 "$limit" "$@" > >(tee "$out/$name.log" | grep --line-buffered -v -e "Loading weights" \
        -e "Writing model shards" -e "real_accelerator.py") 2>&1
    local code=$?
    wait  # for tee
    local status=ok
    if [ $code -eq 124 ] || [ $code -eq 137 ]; then status="timed out"; elif [ $code -ne 0 ]; then status="failed ($code)"; fi
    [ "$status" = ok ] || failed=1
    echo "{\"part\": \"$name\", \"status\": \"$status\", \"seconds\": $(( $(date +%s) - t0 ))}" >> "$results"
    echo "-- $name: $status after $(( $(date +%s) - t0 )) s (total $(( $(date +%s) - started )) s)"
}

if [ $smoke -eq 1 ]; then
    echo "smoke run on the CPU with $python (tiny shapes: the numbers mean nothing)"
    smoke_flag=--smoke
    export TRITON_INTERPRET=1  # the Triton kernels in the interpreter
    # generous: on the loaded 2-core dev machine they took 6, 21, 22 and 284 s (with a first op build); on 2026-12-03
    # 2, 7, 11, 46 and 53 s (part 5: anyres)
    limits=(120 240 120 600 300)
    steps=5
    anyres_steps=5
else
    # The device has no network: vdep's wheel and what its image lacks come in .whl/ (docs/benchmarks.md).
    if ! ls .whl/*.whl > /dev/null 2>&1; then echo "no wheels in $PWD/.whl (docs/benchmarks.md lists them)" >&2; exit 2; fi
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/vdep-site \
        .whl/*.whl || exit 2
    export PYTHONPATH=/tmp/vdep-site
    smoke_flag=
    # 460 s: with the install and the version line, within 8 minutes. Not measured on a GPU yet: a split of the
    # budget, part 4's steps cut from 36 to 28 to give part 5 its two runs.
    limits=(35 65 50 195 115)
    steps=28  # 25 timed step intervals after 3 warm-up steps
    anyres_steps=15  # 12 timed
fi
"$python" -c "import torch, transformers, deepspeed, vdep; print('torch', torch.__version__, '| transformers', \
transformers.__version__, '| deepspeed', deepspeed.__version__, '| device', torch.cuda.get_device_name() \
if torch.cuda.is_available() else 'cpu')" 2>&1 | grep -v real_accelerator

part ceilings "${limits[0]}" "$python" benchmarks/gpu_ceilings.py $smoke_flag --jsonl "$results"
part kernel "${limits[1]}" "$python" benchmarks/kernel_bench.py $smoke_flag --no-compile --jsonl "$results"
part attention "${limits[2]}" "$python" benchmarks/attention_kernels.py $smoke_flag --jsonl "$results"
# MFU against the matmul rate part 1 measured (none if it failed).
peak=$("$python" -c "import json, sys; rates = [r['tflops'] for r in map(json.loads, open(sys.argv[1])) \
if r.get('part') == 'ceilings' and 'tflops' in r]; print(rates[-1] if rates else '')" "$results")
part training "${limits[3]}" "$python" benchmarks/train_throughput.py $smoke_flag --steps $steps \
    --configs finetune:on:padded,finetune:off:padded ${peak:+--peak-tflops $peak} --jsonl "$results" \
    --workdir "${TMPDIR:-/tmp}"

# AnyRes against pad, the same model, data and steps: no baseline (LlavaForConditionalGeneration has no tiles).
part anyres "${limits[4]}" "$python" benchmarks/train_throughput.py $smoke_flag --steps $anyres_steps \
    --micro-batch-size 8 --max-length 4096 --configs finetune:on:padded --image-aspect-ratio pad,anyres --no-baseline \
    ${peak:+--peak-tflops $peak} --jsonl "$results" --part-name anyres --workdir "${TMPDIR:-/tmp}"

echo "done in $(( $(date +%s) - started )) s; rows in $results"
exit $failed
