"""vdep beside LLaMA-Factory and ms-swift on the same work: speed, memory, loss and held-out accuracy.

    python benchmarks/peers.py --out /tmp/peers                 # every tool, the full work (see --help)
    python benchmarks/peers.py --out /tmp/peers --tools vdep    # vdep alone (VDEP off and on)
    python benchmarks/peers.py --smoke --out /tmp/peers-smoke   # CI-sized: tiny data, a few steps; peers
                                                                # whose venv is absent are skipped

Run on purpose, never in CI (the peers' venvs are several GB; `python benchmarks/peer_envs.py` creates
them in .cache/peers/, pinned, in a few minutes each).

The same work for every tool:
- weights: a tiny LLaVA (the demo's shapes) that vdep builds and `vdep export-hf` writes; every tool
  starts from that Hugging Face folder, vdep too (`model.init_from`);
- data: the demo's finetune conversations (vdep/demo_data.py), as vdep shards and in each peer's format
  (LLaMA-Factory: sharegpt with `images` and a dataset_info.json; ms-swift: messages/images JSON lines);
- template: vicuna_v1 with vdep's system text, registered in each peer (benchmarks/peer_side.py); the
  first micro-batch every rank of a peer trained on is compared token by token (ids and labels) with
  vdep's encoding of the same samples;
- settings: global batch and micro-batch, LR and its schedule (3% linear warmup, cosine), steps,
  max_length, fp32, N CPU ranks (torchrun), one DeepSpeed JSON (vdep's preset, "auto" filled by each
  tool), packing on/off where the tool has it.

Per run: samples/s = samples of the steps after the first over the wall time from the first step's end
to the last's (each tool's own per-step clock: vdep's metrics.jsonl `time`, the peers' Trainer callback);
start-up = from the launch to the end of the first step; the peak RSS of each rank (VmHWM from /proc,
read while it runs); the final loss (mean of each tool's last logged losses); the global batch each tool
reports in its own log; the held-out accuracy of the saved model, scored by `vdep eval` on the demo's
held-out questions through transformers (one harness for all: each folder gets the starting export's
tokenizer, processor and chat template, so only the weights differ); and for a peer, its saved folder
imported by vdep (`model.init_from`) and exported again, tensor by tensor. Rows go to the terminal as a
table and to OUT/results.jsonl, each as soon as it is measured.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from peer_envs import PEERS, PeerEnv, environment, prebuild_ops

# Files of the starting export that make its prompt: every evaluated folder gets these, so the held-out
# accuracy compares weights, not a peer's idea of the chat template.
PROMPT_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "processor_config.json",
                "preprocessor_config.json", "generation_config.json", "special_tokens_map.json")
LOSS_TAIL = 10  # final loss: the mean of the last this many logged losses
DATA_SEED = 0  # the demo data and the starting weights: the same for every --seed


@dataclass(frozen=True)
class Work:
    """What every tool trains."""

    steps: int
    global_batch: int
    micro_batch: int
    nproc: int
    lr: float
    warmup_ratio: float
    max_length: int
    zero: int
    finetune_samples: int
    held_out: int
    seed: int = 0  # every tool's run seed (data order, VDEP modes); the data and starting weights stay DATA_SEED's

    @property
    def grad_accum(self) -> int:
        return self.global_batch // (self.micro_batch * self.nproc)


@dataclass(frozen=True)
class Prepared:
    """The shared inputs, under OUT/work."""

    folder: Path
    raw: Path  # the LLaVA JSON the others are made from
    images: Path
    held_out: Path
    shards: Path
    export: Path  # the starting weights: every tool loads this folder
    llamafactory_data: Path  # dataset_info.json + the sharegpt file
    swift_data: Path  # messages/images JSON lines
    ds_config: Path


@dataclass
class RunResult:
    tool: str
    variant: str  # "VDEP off", "VDEP on", or the peer's name
    packing: bool
    zero: int
    status: str = "ok"  # or why the row has no numbers
    versions: dict[str, str] = field(default_factory=dict)
    global_batch_logged: int | None = None
    steps: int = 0
    samples_per_s: float | None = None
    step_ms_quartiles: list[float] = field(default_factory=list)  # of the step-to-step intervals: 25%, median, 75%
    startup_s: float | None = None
    peak_rss_mib: list[float] = field(default_factory=list)
    final_loss: float | None = None
    accuracy: float | None = None
    by_kind: dict[str, float] = field(default_factory=dict)
    first_batch: str = "-"  # the token comparison's verdict
    imported: str = "-"  # a peer's saved folder through vdep's model.init_from and back out (import_check)
    wall_s: float | None = None
    folder: str = ""


# ------------------------------------------------------------------------------------------ shared inputs
def prepare(out: Path, work: Work) -> Prepared:
    """Data, shards, tokenizer, the starting export, each peer's data and the DeepSpeed JSON, once per OUT."""
    from vdep.config import load_config
    from vdep.data_tools.build_shards import BuildOptions, build_shards
    from vdep.data_tools.make_tokenizer import make_tokenizer
    from vdep.demo_data import write_demo_data
    from vdep.export.hf import export_hf
    from vdep.rundir import RunDir
    from vdep.train.deepspeed_config import load_preset
    from vdep.train.prepare import prepare_run_dir

    folder = out / "work"
    stamp = folder / "work.json"
    wanted = {"finetune_samples": work.finetune_samples, "held_out": work.held_out, "seed": DATA_SEED}
    prepared = Prepared(
        folder=folder, raw=folder / "raw" / "finetune.json", images=folder / "raw" / "images",
        held_out=folder / "raw" / "eval.json", shards=folder / "shards", export=folder / "start-export",
        llamafactory_data=folder / "llamafactory", swift_data=folder / "swift" / "finetune.jsonl",
        ds_config=folder / f"zero{work.zero}.json",
    )
    preset, _ = load_preset(f"zero{work.zero}")
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        print(f"reusing the data and starting weights in {folder}", flush=True)
        prepared.ds_config.write_text(json.dumps(preset, indent=1))  # "auto" left for each tool to fill
        return prepared
    if folder.exists():
        shutil.rmtree(folder)
    started = time.monotonic()
    write_demo_data(folder / "raw", DATA_SEED, 0, work.finetune_samples, work.held_out)
    build_shards(BuildOptions([prepared.raw], prepared.images, prepared.shards, samples_per_shard=512, progress=False))
    tokenizer = make_tokenizer([str(prepared.shards)], 1000, folder / "tokenizer")
    # The starting weights: the demo's tiny model as vdep builds it for a run (prepare_run_dir is what
    # `vdep train` runs first), exported before any step.
    base_run = folder / "start-run"
    overrides = [f"model.tokenizer={tokenizer}", f"stages.finetune.shards=[{prepared.shards}]",
                 f"stages.align.shards=[{prepared.shards}]", f"run.output_dir={folder}", "run.name=start-run",
                 f"run.seed={DATA_SEED}"]
    prepare_run_dir(load_config("demo-tiny", overrides), RunDir(base_run))
    export_hf(base_run, prepared.export, dtype="fp32")
    write_peer_data(prepared)
    prepared.ds_config.write_text(json.dumps(preset, indent=1))
    stamp.write_text(json.dumps(wanted))
    print(f"data and starting weights in {folder} ({time.monotonic() - started:.0f} s)", flush=True)
    return prepared


def write_peer_data(prepared: Prepared) -> None:
    """The finetune JSON in LLaMA-Factory's sharegpt format and ms-swift's messages format (same records,
    same order, absolute image paths)."""
    records = json.loads(prepared.raw.read_text())
    roles = {"human": "user", "gpt": "assistant"}
    prepared.llamafactory_data.mkdir(parents=True, exist_ok=True)
    sharegpt = [{"conversations": r["conversations"],
                 "images": [str(prepared.images / r["image"])] if r.get("image") else []} for r in records]
    (prepared.llamafactory_data / "finetune.json").write_text(json.dumps(sharegpt))
    (prepared.llamafactory_data / "dataset_info.json").write_text(json.dumps({"vdep_demo": {
        "file_name": "finetune.json", "formatting": "sharegpt", "columns": {"messages": "conversations", "images": "images"}}}))
    prepared.swift_data.parent.mkdir(parents=True, exist_ok=True)
    with prepared.swift_data.open("w") as lines:
        for r in records:
            row = {"messages": [{"role": roles[t["from"]], "content": t["value"]} for t in r["conversations"]]}
            if r.get("image"):
                row["images"] = [str(prepared.images / r["image"])]
            lines.write(json.dumps(row) + "\n")


# --------------------------------------------------------------------------------------- measuring a run
class RankMemory:
    """Peak RSS of each rank of a launched job: polls /proc for the launcher's descendants, and takes each
    rank's VmHWM (the kernel's own high-water mark, so a spike between two polls is not missed). A rank is
    a process with RANK in its environment whose parent has none (DataLoader workers, compilers and
    preprocessing pools inherit RANK from their rank)."""

    def __init__(self, root_pid: int, interval_s: float = 0.5):
        self.root_pid = root_pid
        self.interval_s = interval_s
        self.peaks_kib: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def stop(self) -> list[float]:
        """Peak RSS in MiB, by rank."""
        self._stop.set()
        self._thread.join()
        return [self.peaks_kib[rank] / 1024 for rank in sorted(self.peaks_kib)]

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            children = self._children()
            pending, seen = [self.root_pid], set()
            while pending:
                pid = pending.pop()
                if pid in seen:
                    continue
                seen.add(pid)
                pending += children.get(pid, [])
                rank, parent_rank = _rank_of(pid), _rank_of(_parent(pid))
                if rank is not None and parent_rank != rank:
                    peak = _vm_hwm_kib(pid)
                    if peak is not None:
                        self.peaks_kib[rank] = max(self.peaks_kib.get(rank, 0), peak)

    @staticmethod
    def _children() -> dict[int, list[int]]:
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                parent = _parent(int(entry.name))
                if parent is not None:
                    children.setdefault(parent, []).append(int(entry.name))
        return children


def _parent(pid: int | None) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _rank_of(pid: int | None) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in environ:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def _vm_hwm_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass(frozen=True)
class Launched:
    returncode: int
    started: float  # time.time() at the launch
    wall_s: float
    peak_rss_mib: list[float]
    log: Path


def launch(command: list[str], env: dict[str, str], log: Path, timeout_s: float) -> Launched:
    """Run a training command, its output to `log`, measuring its ranks' memory."""
    print("  $ " + " ".join(command), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with log.open("w") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, cwd=log.parent,
                                   start_new_session=True)
        memory = RankMemory(process.pid)
        try:
            returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            output.write(f"\n[peers.py] killed after {timeout_s:.0f} s\n")
        finally:  # also when peers.py itself is interrupted: the job runs in a session of its own
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            returncode = process.wait()
            peaks = memory.stop()
    return Launched(returncode, started, time.time() - started, peaks, log)


def step_rate(step_times: list[tuple[int, float]], global_batch: int, launched_at: float,
              result: RunResult) -> None:
    """Into `result`: samples/s over the steps after the first, the quartiles of the intervals between
    consecutive step ends (the median is robust to the machine's slow moments; the total is not), start-up
    seconds to the first step's end, and the steps."""
    step_times = sorted(step_times)
    if len(step_times) < 2:
        raise ValueError("fewer than two timed steps")
    (first_step, first), (last_step, last) = step_times[0], step_times[-1]
    intervals = [1000 * (b - a) for (sa, a), (sb, b) in itertools.pairwise(step_times) if sb == sa + 1]
    result.samples_per_s = (last_step - first_step) * global_batch / (last - first)
    result.step_ms_quartiles = statistics.quantiles(intervals, n=4) if len(intervals) >= 2 else []
    result.startup_s, result.steps = first - launched_at, last_step


def quartiles(q: list[float]) -> str:
    return f"{q[1]:.0f} ({q[0]:.0f}–{q[2]:.0f})" if q else "-"


def base_env(nproc: int) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    # Ranks share the cores: one thread each (what torchrun sets when nothing is set), for every tool alike.
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def torchrun(python: Path | str, nproc: int) -> list[str]:
    from vdep.train.distributed import free_port

    return [str(python), "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
            "--master-port", str(free_port())]


def logged_global_batch(log: Path) -> int | None:
    """What the tool's own log says it trained on: vdep's stage line, the HF Trainer's banner."""
    text = log.read_text(errors="replace")
    found = (re.findall(r"= global batch (\d+)", text)
             or re.findall(r"Total train batch size \(w\. parallel, distributed & accumulation\) = ([\d,]+)", text)
             or re.findall(r"total_train_batch_size\D+(\d+)", text))
    return int(found[-1].replace(",", "")) if found else None


# ------------------------------------------------------------------------------------------------- vdep
def vdep_recipe(prepared: Prepared, work: Work, vdep_on: bool, packing: bool) -> dict:
    import yaml

    import vdep

    demo = yaml.safe_load((Path(vdep.__file__).parent / "recipes" / "demo-tiny.yaml").read_text())
    return {
        "model": {"init_from": str(prepared.export), "projector": "mlp2x_gelu"},
        "data": {"pad_to_square": True, "max_length": work.max_length, "num_workers": 0, "packing": packing},
        "vdep": {**demo["vdep"], "enabled": vdep_on},  # the demo's VDEP settings, for "VDEP on"
        "stages": {"finetune": {
            "shards": [str(prepared.shards)], "template": "vicuna_v1", "trainable": ["projector", "language_model"],
            "lr": work.lr, "warmup_ratio": work.warmup_ratio, "global_batch_size": work.global_batch,
            "micro_batch_size": work.micro_batch, "max_steps": work.steps, "zero": f"zero{work.zero}",
            "init_from": "none"}},
        "run": {"seed": work.seed, "log_every": 1},
    }


def run_vdep(prepared: Prepared, work: Work, out: Path, vdep_on: bool, packing: bool, timeout_s: float) -> RunResult:
    import yaml

    from vdep.train.ds import prebuild_ops as vdep_prebuild_ops

    name = f"vdep-{'on' if vdep_on else 'off'}{'-packed' if packing else ''}"
    folder = out / name
    result = RunResult("vdep", f"VDEP {'on' if vdep_on else 'off'}", packing, work.zero, folder=str(folder),
                       versions=vdep_versions())
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    recipe = folder / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(vdep_recipe(prepared, work, vdep_on, packing)))
    vdep_prebuild_ops()  # once, untimed (the peers' op is built when their venv is made)
    env = base_env(work.nproc)
    env["PYTHONPATH"] = str(ROOT)
    launched = launch([*torchrun(sys.executable, work.nproc), "-m", "vdep", "train", str(recipe),
                       f"run.output_dir={folder}", "run.name=run"], env, folder / "train.log", timeout_s)
    result.wall_s, result.peak_rss_mib = launched.wall_s, launched.peak_rss_mib
    if launched.returncode != 0:
        result.status = f"failed (exit {launched.returncode}); see {launched.log}"
        return result
    metrics = [json.loads(line) for line in (folder / "run" / "finetune" / "metrics.jsonl").read_text().splitlines()]
    metrics = [m for m in metrics if "loss/text" in m]
    result.global_batch_logged = logged_global_batch(folder / "run" / "logs" / "train.log")
    step_rate([(m["step"], m["time"]) for m in metrics], work.global_batch, launched.started, result)
    result.final_loss = statistics.fmean(m["loss/text"] for m in metrics[-LOSS_TAIL:])
    result.first_batch = "vdep's own encoding (the reference)"
    export = folder / "export"
    exported = subprocess.run([sys.executable, "-m", "vdep", "export-hf", "--checkpoint", str(folder / "run"),
                               "--out", str(export), "--dtype", "fp32"], capture_output=True, text=True, env=env, check=False)
    if exported.returncode != 0:
        result.status = f"export failed: {exported.stderr[-2000:]}"
        return result
    score(result, export, prepared, folder)
    return result


def vdep_versions() -> dict[str, str]:
    from importlib import metadata

    return {name: metadata.version(name) for name in ("vdep", "torch", "transformers", "deepspeed")}


# ------------------------------------------------------------------------------------------------ peers
def peer_env_vars(env: PeerEnv, nproc: int) -> dict[str, str]:
    variables = environment(env)
    variables.update({key: value for key, value in base_env(nproc).items() if key in ("OMP_NUM_THREADS", "PYTHONUNBUFFERED")})
    variables["PYTHONPATH"] = str(ROOT / "benchmarks")
    return variables


def llamafactory_config(prepared: Prepared, work: Work, out: Path, packing: bool) -> dict:
    return {
        "model_name_or_path": str(prepared.export), "stage": "sft", "do_train": True, "finetuning_type": "full",
        "freeze_vision_tower": True, "freeze_multi_modal_projector": False, "freeze_language_model": False,
        "deepspeed": str(prepared.ds_config), "dataset": "vdep_demo", "dataset_dir": str(prepared.llamafactory_data),
        "template": "vdep_vicuna_v1", "cutoff_len": work.max_length, "overwrite_cache": True,
        "preprocessing_num_workers": 1, "packing": packing, "neat_packing": packing, "output_dir": str(out / "saved"),
        "disable_gradient_checkpointing": True,  # LLaMA-Factory's default is on; vdep's (and ms-swift's here) off
        "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8, "max_grad_norm": 1.0,
        "logging_steps": 1, "save_strategy": "no", "plot_loss": False, "overwrite_output_dir": True,
        "per_device_train_batch_size": work.micro_batch, "gradient_accumulation_steps": work.grad_accum,
        "learning_rate": work.lr, "max_steps": work.steps, "lr_scheduler_type": "cosine",
        "warmup_ratio": work.warmup_ratio, "bf16": False, "fp16": False, "report_to": "none", "seed": work.seed,
        "dataloader_num_workers": 0, "ddp_timeout": 1800,
    }


def run_llamafactory(prepared: Prepared, work: Work, out: Path, packing: bool, timeout_s: float) -> RunResult:
    import yaml

    env = PEERS["llamafactory"]
    folder = out / f"llamafactory{'-packed' if packing else ''}"
    result = RunResult(env.tool, env.tool, packing, work.zero, folder=str(folder), versions=env.versions())
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(llamafactory_config(prepared, work, folder, packing)))
    command = [*torchrun(env.python, work.nproc), str(ROOT / "benchmarks" / "peer_side.py"), "llamafactory",
               str(config), str(folder / "record")]
    return finish_peer_run(result, launch(command, peer_env_vars(env, work.nproc), folder / "train.log", timeout_s),
                           folder / "saved", prepared, work, folder, packing)


def swift_arguments(prepared: Prepared, work: Work, out: Path) -> list[str]:
    """ms-swift's sft flags for the same work. Its defaults differ from the HF Trainer's in places that
    change the training (weight decay 0.1, Adam β2 0.95, the projector frozen): each is set explicitly."""
    settings = {
        "model": prepared.export, "model_type": "llava1_5_hf", "template": "vdep_vicuna_v1",
        "custom_register_path": ROOT / "benchmarks" / "peer_side.py", "callbacks": "vdep_benchmark",
        "dataset": prepared.swift_data, "split_dataset_ratio": 0, "dataset_num_proc": 1, "tuner_type": "full",
        "freeze_vit": "true", "freeze_aligner": "false", "freeze_llm": "false", "deepspeed": prepared.ds_config,
        "torch_dtype": "float32", "fp16": "false", "bf16": "false", "attn_impl": "sdpa", "check_model": "false",
        "use_hf": "true", "max_length": work.max_length, "truncation_strategy": "right",
        "per_device_train_batch_size": work.micro_batch, "gradient_accumulation_steps": work.grad_accum,
        "learning_rate": work.lr, "max_steps": work.steps, "lr_scheduler_type": "cosine",
        "warmup_ratio": work.warmup_ratio, "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.999,
        "adam_epsilon": 1e-8, "max_grad_norm": 1.0, "gradient_checkpointing": "false", "logging_steps": 1,
        "eval_strategy": "no", "save_strategy": "epoch", "save_only_model": "true", "report_to": "none",
        "seed": work.seed, "data_seed": work.seed, "dataloader_num_workers": 0, "output_dir": out / "saved",
        "add_version": "false", "log_level": "info",  # info: the Trainer's banner with the global batch it uses
    }
    return [item for key, value in settings.items() for item in (f"--{key}", str(value))]


def run_swift(prepared: Prepared, work: Work, out: Path, packing: bool, timeout_s: float) -> RunResult:
    env = PEERS["ms-swift"]
    folder = out / f"ms-swift{'-packed' if packing else ''}"
    result = RunResult(env.tool, env.tool, packing, work.zero, folder=str(folder), versions=env.versions())
    if packing:  # sft_args.py: "The "packing" feature requires a flash attention implementation"
        result.status = "not run: ms-swift 4.6 packs only with flash-attn (--attn_impl flash_attn), which needs CUDA"
        return result
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    variables = peer_env_vars(env, work.nproc)
    variables.update({"VDEP_BENCHMARK_PEER": "ms-swift", "VDEP_BENCHMARK_RECORD": str(folder / "record")})
    command = [*torchrun(env.python, work.nproc), "-m", "swift.cli.sft", *swift_arguments(prepared, work, folder)]
    launched = launch(command, variables, folder / "train.log", timeout_s)
    saved = sorted((folder / "saved").glob("**/checkpoint-*/config.json"))
    return finish_peer_run(result, launched, saved[-1].parent if saved else folder / "saved", prepared, work, folder,
                           packing)


def finish_peer_run(result: RunResult, launched: Launched, saved: Path, prepared: Prepared, work: Work,
                    folder: Path, packing: bool) -> RunResult:
    """The numbers of a peer's run, from its callback's records and its own log; then its saved model scored."""
    result.wall_s, result.peak_rss_mib = launched.wall_s, launched.peak_rss_mib
    if launched.returncode != 0:
        result.status = f"failed (exit {launched.returncode}); see {launched.log}"
        return result
    record = folder / "record"
    steps = [json.loads(line) for line in (record / "steps.jsonl").read_text().splitlines()]
    losses = [json.loads(line)["loss"] for line in (record / "losses.jsonl").read_text().splitlines()]
    result.global_batch_logged = logged_global_batch(launched.log)
    step_rate([(s["step"], s["time"]) for s in steps], work.global_batch, launched.started, result)
    result.final_loss = statistics.fmean(losses[-LOSS_TAIL:])
    geometry = [json.loads(p.read_text()) for p in sorted(record.glob("geometry_rank*.json"))]
    used = {g["world_size"] * g["per_device_train_batch_size"] * g["gradient_accumulation_steps"] for g in geometry}
    if result.global_batch_logged != work.global_batch or used != {work.global_batch} or len(geometry) != work.nproc:
        result.status = (f"WRONG GLOBAL BATCH: asked for {work.global_batch}, its log says {result.global_batch_logged}, "
                         f"its Trainer on {len(geometry)} rank(s) used {sorted(used)}")
    if packing:  # LLaMA-Factory packs to cutoff_len rows, and its batch counts rows, not samples
        rows = re.findall(r"Num examples = ([\d,]+)", launched.log.read_text(errors="replace"))
        if rows:
            per_row = work.finetune_samples / int(rows[-1].replace(",", ""))
            result.samples_per_s *= per_row
            result.status = (f"ok; not the same work: {work.global_batch} packed rows a step, {per_row:.2f} samples a row "
                             f"(samples/s counts samples)")
    result.first_batch = compare_first_batches(record, prepared, work, packing)
    score(result, saved, prepared, folder)
    if result.status.startswith("ok"):
        result.imported = import_check(saved, prepared, work, folder)
    return result


def import_check(saved: Path, prepared: Prepared, work: Work, folder: Path) -> str:
    """A folder the peer saved, imported by vdep (`model.init_from`, as `vdep train` prepares a run) and
    exported again: every tensor must come back equal (compared as transformers loads both folders)."""
    import torch
    import yaml
    from transformers import LlavaForConditionalGeneration

    from vdep.config import load_config
    from vdep.export.hf import export_hf
    from vdep.rundir import RunDir
    from vdep.train.prepare import prepare_run_dir

    recipe = vdep_recipe(prepared, work, False, False)
    recipe["model"]["init_from"] = str(saved)
    (folder / "import-recipe.yaml").write_text(yaml.safe_dump(recipe))
    run, again = folder / "import-run", folder / "import-export"
    for path in (run, again):
        if path.exists():
            shutil.rmtree(path)
    try:
        prepare_run_dir(load_config(str(folder / "import-recipe.yaml"), [f"run.output_dir={folder}", "run.name=import-run"]),
                        RunDir(run))
        export_hf(run, again, dtype="fp32")
    except Exception as exc:  # noqa: BLE001 (reported in the row)
        return f"import failed: {exc}"
    theirs = LlavaForConditionalGeneration.from_pretrained(saved, dtype=torch.float32).state_dict()
    ours = LlavaForConditionalGeneration.from_pretrained(again, dtype=torch.float32).state_dict()
    differing = [name for name in theirs if name not in ours or not torch.equal(theirs[name], ours[name])]
    if differing or set(ours) - set(theirs):
        return f"differs after import and export: {(differing or sorted(set(ours) - set(theirs)))[:3]}"
    return f"model.init_from → export-hf: all {len(theirs)} tensors equal"


# ------------------------------------------------------------------------------------ same tokens?
def vdep_encodings(prepared: Prepared, work: Work) -> dict[tuple[int, ...], tuple[int, ...]]:
    """vdep's (input ids → labels) for every finetune sample: the template, tokenizer and truncation its data
    path runs (data/dataset.py: SamplePreprocessor), without decoding the images."""
    from vdep.data.conversation import parse_conversation
    from vdep.data.dataset import truncate
    from vdep.data.templates import TemplateTokenizer, make_template
    from vdep.model.tokenizer import image_token_id, load_tokenizer

    tokenizer = load_tokenizer(prepared.folder / "start-run" / "tokenizer")
    template = make_template("vicuna_v1", tokenizer)
    vision = json.loads((prepared.export / "config.json").read_text())["vision_config"]
    encoder = TemplateTokenizer(tokenizer, image_token_id(tokenizer), (vision["image_size"] // vision["patch_size"]) ** 2)
    table = {}
    for record in json.loads(prepared.raw.read_text()):
        has_image = bool(record.get("image"))
        tokens = truncate(encoder.encode(template.segments(parse_conversation(record["conversations"]), has_image)),
                          work.max_length, encoder.image_token_id)
        table[tuple(tokens.input_ids)] = tuple(tokens.labels)
    return table


def compare_first_batches(record: Path, prepared: Prepared, work: Work, packing: bool) -> str:
    """Each rank's first micro-batch against vdep's encodings: every row (its attended part) must be one of
    vdep's samples, with the same labels. Packed rows are not split here; they are only counted."""
    files = sorted(record.glob("first_batch_rank*.json"))
    if not files:
        return "no first batch recorded"
    if packing:
        return f"packed rows, not compared ({len(files)} rank(s))"
    table = vdep_encodings(prepared, work)
    rows = equal = 0
    first_difference = ""
    for path in files:
        batch = json.loads(path.read_text())
        for index, ids in enumerate(batch["input_ids"]):
            mask = batch.get("attention_mask", [[1] * len(ids)])[index]
            kept = [i for i, (token, m) in enumerate(zip(ids, mask)) if m]
            row_ids = tuple(ids[i] for i in kept)
            labels = batch["labels"][index]
            # ms-swift passes only the labels of the last positions (with `logits_to_keep`): the rest are -100.
            labels = [-100] * (len(ids) - len(labels)) + labels
            row_labels = tuple(labels[i] for i in kept)
            rows += 1
            if table.get(row_ids) == row_labels:
                equal += 1
            elif not first_difference:
                first_difference = describe_difference(row_ids, row_labels, table, prepared, path.name, index)
    verdict = f"{equal}/{rows} rows equal to vdep's ids and labels"
    return verdict if equal == rows else f"{verdict}; first difference: {first_difference}"


def describe_difference(ids: tuple[int, ...], labels: tuple[int, ...] | None, table: dict, prepared: Prepared,
                        where: str, row: int) -> str:
    """The nearest vdep sample (longest common prefix) and where the two part, decoded."""
    from vdep.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(prepared.folder / "start-run" / "tokenizer")
    best, common = None, -1
    for candidate in table:
        n = next((i for i, (a, b) in enumerate(zip(candidate, ids)) if a != b), min(len(candidate), len(ids)))
        if n > common:
            best, common = candidate, n
    if best is None:
        return f"{where} row {row}: no vdep sample to compare with"
    if best == ids:
        return f"{where} row {row}: same ids, labels differ: theirs {labels}, vdep's {table[best]}"
    context = max(0, common - 3)
    return (f"{where} row {row}: ids part at token {common}: theirs "
            f"{tokenizer.convert_ids_to_tokens(list(ids[context:common + 4]))}, vdep's "
            f"{tokenizer.convert_ids_to_tokens(list(best[context:common + 4]))}")


# -------------------------------------------------------------------------------------------- scoring
def score(result: RunResult, saved: Path, prepared: Prepared, folder: Path) -> None:
    """Held-out accuracy of the saved weights by `vdep eval`, with the starting export's prompt files."""
    if not (saved / "config.json").is_file():
        result.status = f"no saved model in {saved}"
        return
    model = folder / "eval-model"
    if model.exists():
        shutil.rmtree(model)
    model.mkdir()
    for item in saved.iterdir():
        if item.name not in PROMPT_FILES and (item.suffix in (".json", ".safetensors") or item.name.endswith(".index.json")):
            (model / item.name).symlink_to(item.resolve())
    for name in PROMPT_FILES:
        if (prepared.export / name).is_file():
            shutil.copy(prepared.export / name, model / name)
    answers = folder / "held_out_answers.jsonl"
    env = base_env(1)
    env["PYTHONPATH"] = str(ROOT)
    evaluated = subprocess.run([sys.executable, "-m", "vdep", "eval", "--model", str(model), "--data",
                                str(prepared.held_out), "--image-root", str(prepared.images), "--out", str(answers)],
                               capture_output=True, text=True, env=env, check=False)
    found = re.search(r"accuracy: ([\d.]+)%", evaluated.stdout)
    if evaluated.returncode != 0 or not found:
        result.status = f"vdep eval failed: {(evaluated.stderr or evaluated.stdout)[-2000:]}"
        return
    result.accuracy = float(found.group(1)) / 100
    for kind, value in re.findall(r"^\s+(\w+): ([\d.]+)%", evaluated.stdout, flags=re.MULTILINE):
        result.by_kind[kind] = float(value) / 100


# ----------------------------------------------------------------------------------------------- output
def seed_summary(rows: list[dict]) -> str:
    """OUT/results.jsonl's rows of the same work (all but the seed) and the same run, over their seeds: mean ±
    sample standard deviation, and each seed's accuracy. A run's latest row for a seed counts; failed rows
    do not."""
    from vdep_ablation import mean_std  # the ablation's table format; benchmarks/ is on sys.path
    latest: dict[tuple, dict] = {}
    for row in rows:
        if row["status"].startswith("ok"):
            work = tuple(sorted((k, v) for k, v in row["work"].items() if k != "seed"))
            latest[(work, row["tool"], row["variant"], row["packing"], row["work"]["seed"])] = row
    groups: dict[tuple, list[dict]] = {}
    for (work, tool, variant, packing, _), row in latest.items():
        groups.setdefault((work, tool, variant, packing), []).append(row)
    lines = [("| tool | run | packing | seeds | samples/s | median step ms | peak RSS MiB (rank 0) | final loss "
              "| held-out accuracy % | per seed % |"),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (_, tool, variant, packing), runs in groups.items():
        runs.sort(key=lambda r: r["work"]["seed"])
        accuracies = [100 * r["accuracy"] for r in runs if r["accuracy"] is not None]
        lines.append(
            f"| {tool} | {variant} | {'on' if packing else 'off'} | {','.join(str(r['work']['seed']) for r in runs)} | "
            f"{mean_std([r['samples_per_s'] for r in runs])} | "
            f"{mean_std([r['step_ms_quartiles'][1] for r in runs if r.get('step_ms_quartiles')], digits=0)} | "
            f"{mean_std([r['peak_rss_mib'][0] for r in runs if r['peak_rss_mib']], digits=0)} | "
            f"{mean_std([r['final_loss'] for r in runs if r['final_loss'] is not None], digits=4)} | "
            f"{mean_std(accuracies)} | {' / '.join(f'{a:.1f}' for a in accuracies) or '-'} |")
    return "\n".join(lines)


def table(results: list[RunResult], work: Work) -> str:
    lines = [
        (f"\n{work.steps} steps × global batch {work.global_batch} (micro-batch {work.micro_batch}, {work.nproc} CPU ranks, "
         f"accumulation {work.grad_accum}), ZeRO-{work.zero}, max_length {work.max_length}, lr {work.lr:g} cosine "
         f"({work.warmup_ratio:.0%} warmup), fp32, seed {work.seed}; held-out: {work.held_out} questions\n"),
        ("| tool | run | packing | samples/s | median step ms (IQR) | start-up s | peak RSS per rank (MiB) | final loss | held-out accuracy "
         "| global batch (its log) | first batch vs vdep's tokens | its saved folder into vdep | status |"),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        def number(value, spec):
            return "-" if value is None else format(value, spec)
        lines.append(
            f"| {r.tool} | {r.variant} | {'on' if r.packing else 'off'} | {number(r.samples_per_s, '.1f')} | "
            f"{quartiles(r.step_ms_quartiles)} | "
            f"{number(r.startup_s, '.1f')} | {' / '.join(f'{m:.0f}' for m in r.peak_rss_mib) or '-'} | "
            f"{number(r.final_loss, '.4f')} | {number(None if r.accuracy is None else 100 * r.accuracy, '.1f')}"
            f"{'%' if r.accuracy is not None else ''} | {number(r.global_batch_logged, 'd')} | {r.first_batch} | {r.imported} "
            f"| {r.status} |")
    by_run = {(r.tool, r.variant, r.packing): r for r in results if r.samples_per_s}
    off = by_run.get(("vdep", "VDEP off", False))
    on = by_run.get(("vdep", "VDEP on", False))
    if off:
        lines.append("\nparity (samples/s against vdep with VDEP off, padded): " + ", ".join(
            f"{r.tool}{' packed' if r.packing else ''} {r.samples_per_s / off.samples_per_s:.2f}×"
            for r in results if r.samples_per_s and r.tool != "vdep") + "")
    if off and on:
        lines.append(f"cost of VDEP (on / off, padded): samples/s {on.samples_per_s / off.samples_per_s:.2f}×")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="work folder; OUT/results.jsonl gets one line per run")
    parser.add_argument("--tools", default="vdep,llamafactory,ms-swift")
    parser.add_argument("--packing", default="off,on", help="off, on, or off,on")
    parser.add_argument("--vdep", default="off,on", help="vdep's runs: VDEP off, on, or off,on (packed: off only)")
    parser.add_argument("--steps", type=int, default=288, help="optimizer steps (288: one pass over 9216 samples)")
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--zero", type=int, default=3, choices=(2, 3))
    parser.add_argument("--seed", type=int, default=0, help="every tool's run seed; one seed is an anecdote (same data)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per training run")
    parser.add_argument("--smoke", action="store_true", help="tiny data and a few steps; peers without a venv skipped")
    parser.add_argument("--summary", action="store_true",
                        help="train nothing: print OUT/results.jsonl's runs over their seeds (mean ± standard deviation)")
    args = parser.parse_args()
    if args.summary:
        print(seed_summary([json.loads(line) for line in (args.out / "results.jsonl").read_text().splitlines() if line]))
        return
    tools = [t for t in args.tools.split(",") if t]
    unknown = [t for t in tools if t != "vdep" and t not in PEERS]
    if unknown:
        parser.error(f"unknown tool(s) {unknown}; known: vdep, {', '.join(PEERS)}")
    packings = [{"off": False, "on": True}[p] for p in args.packing.split(",")]
    if args.smoke:
        work = Work(steps=4, global_batch=8, micro_batch=4, nproc=2, lr=1e-3, warmup_ratio=0.03, max_length=384,
                    zero=args.zero, finetune_samples=64, held_out=12, seed=args.seed)
    else:
        work = Work(steps=args.steps, global_batch=args.global_batch, micro_batch=args.micro_batch, nproc=args.nproc,
                    lr=1e-3, warmup_ratio=0.03, max_length=384, zero=args.zero, finetune_samples=9216, held_out=300,
                    seed=args.seed)
    if work.global_batch % (work.micro_batch * work.nproc):
        parser.error("--global-batch must be a multiple of --micro-batch × --nproc")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    prepared = prepare(out, work)
    plans = []
    for tool in tools:
        if tool == "vdep":
            settings = [{"off": False, "on": True}[v] for v in args.vdep.split(",")]
            plans += [("vdep", on, False) for on in settings if False in packings]
            plans += [("vdep", False, True)] * (True in packings and False in settings)
            continue
        if not PEERS[tool].exists():
            message = f"{tool}: no venv at {PEERS[tool].folder}; `python benchmarks/peer_envs.py --tools {tool}` makes it"
            if args.smoke:
                print(f"skipped: {message}", flush=True)
                continue
            parser.error(message)
        plans += [(tool, None, packing) for packing in packings]
    results = []
    with (out / "results.jsonl").open("a") as jsonl:
        for tool, vdep_on, packing in plans:
            print(f"\n== {tool}{'' if vdep_on is None else ', VDEP ' + ('on' if vdep_on else 'off')}"
                  f"{', packed' if packing else ''}", flush=True)
            try:
                if tool == "vdep":
                    result = run_vdep(prepared, work, out, vdep_on, packing, args.timeout)
                else:
                    prebuild_ops(PEERS[tool])
                    result = PEER_RUNNERS[tool](prepared, work, out, packing, args.timeout)
            except Exception as exc:  # noqa: BLE001 (one failing run loses its own row, not the others)
                variant = tool if vdep_on is None else f"VDEP {'on' if vdep_on else 'off'}"
                result = RunResult(tool, variant, packing, work.zero, status=f"failed: {type(exc).__name__}: {exc}")
            print(f"  {result.status}: {json.dumps(asdict(result))}", flush=True)
            jsonl.write(json.dumps({"work": asdict(work), **asdict(result)}) + "\n")
            jsonl.flush()
            results.append(result)
    print(table(results, work))
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line]
    if len({row["work"]["seed"] for row in rows}) > 1:
        print("\nover the seeds in OUT/results.jsonl:\n" + seed_summary(rows))
    sys.exit(0 if all(r.status.startswith(("ok", "not run")) for r in results) else 1)


PEER_RUNNERS = {"llamafactory": run_llamafactory, "ms-swift": run_swift}


if __name__ == "__main__":
    main()
