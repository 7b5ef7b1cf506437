"""The peers' virtual environments for benchmarks/peers.py: one per tool, pinned, created on demand.

Each peer lives in `.cache/peers/<tool>-<version>/` (git-ignored), with its own Python packages, because
the peers need transformers < 5.7 (LLaMA-Factory) and < 5.20 (ms-swift) while vdep runs a newer one.
torch is pinned to the build of the interpreter running this script (a constraints file written here), so
no peer pulls a CUDA torch and several GB of CUDA packages. Pins and fixes are ../shared/PEERS.md's
findings: accelerate 1.11.0 for ms-swift (1.16 trains 2-rank runs on the wrong global batch, silently),
LLaMA-Factory's CUDA torchvision removed and torchaudio's bundled CUDA libraries deleted (else its import
fails without CUDA), deepspeed 0.19.8 built without isolation (against the pinned torch).

    python benchmarks/peer_envs.py            # create the missing environments (a few minutes each)
    python benchmarks/peer_envs.py --check    # say which exist, with their versions
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import venv
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "peers"


@dataclass(frozen=True)
class PeerEnv:
    """One peer's pinned environment."""

    tool: str  # what the tables call it
    package: str
    version: str
    pins: tuple[str, ...]  # beside the package: versions PEERS.md found working
    module: str  # imported to check the install
    remove_cuda_leftovers: bool = False  # LLaMA-Factory: torchvision, torchaudio/lib/*.so
    extra: tuple[str, ...] = field(default=())

    @property
    def folder(self) -> Path:
        return CACHE / f"{self.package}-{self.version}"

    @property
    def python(self) -> Path:
        return self.folder / "bin" / "python"

    @property
    def stamp(self) -> Path:
        return self.folder / "installed.json"

    def exists(self) -> bool:
        return self.stamp.is_file()

    def versions(self) -> dict[str, str]:
        return json.loads(self.stamp.read_text())["versions"] if self.exists() else {}


DEEPSPEED = "deepspeed==0.19.8"
PEERS = {
    "llamafactory": PeerEnv("LLaMA-Factory", "llamafactory", "0.9.5", ("transformers==5.6.0", "peft==0.18.1"),
                            "llamafactory", remove_cuda_leftovers=True),
    "ms-swift": PeerEnv("ms-swift", "ms-swift", "4.6.0", ("transformers==5.19.0", "accelerate==1.11.0"), "swift"),
}
REPORTED = ("torch", "transformers", "accelerate", "peft", "deepspeed", "trl", "datasets")


def torch_pin() -> str:
    """`torch==<the running interpreter's torch>`, e.g. torch==2.13.0+cpu."""
    import torch

    return f"torch=={torch.__version__}"


def run(command: list[str], log: Path) -> None:
    print("  $ " + " ".join(command), flush=True)
    with log.open("a") as out:
        out.write("$ " + " ".join(command) + "\n")
        out.flush()
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        raise SystemExit(f"failed (exit {result.returncode}): {' '.join(command)}\nsee {log}")


def create(env: PeerEnv) -> None:
    """Create env.folder from nothing (an earlier, unfinished one is removed first)."""
    if env.folder.exists():
        shutil.rmtree(env.folder)
    print(f"creating {env.folder} ({env.package}=={env.version})", flush=True)
    venv.EnvBuilder(with_pip=True, clear=True).create(env.folder)
    constraints = env.folder / "constraints.txt"
    constraints.write_text(torch_pin() + "\n" + "".join(pin + "\n" for pin in env.pins))
    log = env.folder / "install.log"
    pip = [str(env.python), "-m", "pip", "install", "-q", "-c", str(constraints)]
    run([*pip, torch_pin(), "setuptools", "wheel"], log)
    run([*pip, f"{env.package}=={env.version}", *env.pins, *env.extra], log)
    # Built against the pinned torch, not an isolated one (which would download another torch).
    run([*pip, "--no-build-isolation", DEEPSPEED], log)
    if env.remove_cuda_leftovers:
        run([str(env.python), "-m", "pip", "uninstall", "-y", "-q", "torchvision"], log)
        site = Path(subprocess.check_output([str(env.python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                            text=True).strip())
        for library in (site / "torchaudio" / "lib").glob("*.so"):
            library.unlink()
    check = subprocess.run([str(env.python), "-c", f"import {env.module}, torch; print(torch.__version__)"],
                           capture_output=True, text=True, env=environment(env), check=False)
    if check.returncode != 0:
        raise SystemExit(f"{env.folder}: `import {env.module}` fails:\n{check.stderr[-3000:]}")
    if check.stdout.strip() != torch_pin().split("==")[1]:
        raise SystemExit(f"{env.folder}: torch is {check.stdout.strip()}, not {torch_pin()}; see {log}")
    prebuild_ops(env)
    env.stamp.write_text(json.dumps({"versions": installed_versions(env.python)}, indent=1))
    print(f"  done: {env.versions()}", flush=True)


def environment(env: PeerEnv) -> dict[str, str]:
    """What every process of this peer runs with: offline, DeepSpeed on CPU, the op cache in the venv, and
    the venv's bin first on PATH. The last matters: two ninja versions (the venv's and the system's) do not
    read each other's build log, so each would rebuild DeepSpeed's op (2 minutes here) in every run."""
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(env.folder / "torch_extensions"),
            "DISABLE_VERSION_CHECK": "1", "WANDB_DISABLED": "true", "USE_MODELSCOPE_HUB": "0",
            "HF_HOME": str(env.folder / "hf-home"), "PATH": f"{env.folder / 'bin'}:{os.environ.get('PATH', '')}"}


def prebuild_ops(env: PeerEnv) -> None:
    """Compile DeepSpeed's CPU communication op (about 3 minutes, once per venv) now rather than inside the
    first timed run's start-up."""
    code = "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()"
    result = subprocess.run([str(env.python), "-c", code], capture_output=True, text=True,
                            env=environment(env), check=False)
    if result.returncode != 0:
        raise SystemExit(f"{env.folder}: DeepSpeed's shm_comm op does not build:\n{result.stderr[-3000:]}")


def installed_versions(python: Path) -> dict[str, str]:
    code = ("import importlib.metadata as m, json; names = " + repr(list(REPORTED) + ["llamafactory", "ms-swift"]) +
            "\nout = {}\nfor n in names:\n  try: out[n] = m.version(n)\n  except m.PackageNotFoundError: pass\nprint(json.dumps(out))")
    return json.loads(subprocess.check_output([str(python), "-c", code], text=True))


def ensure(names: list[str]) -> None:
    for name in names:
        if not PEERS[name].exists():
            create(PEERS[name])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only say which environments exist")
    parser.add_argument("--tools", default=",".join(PEERS), help=f"comma-separated, of {', '.join(PEERS)}")
    args = parser.parse_args()
    names = [n for n in args.tools.split(",") if n]
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        parser.error(f"unknown tool(s) {unknown}; known: {', '.join(PEERS)}")
    if not args.check:
        ensure(names)
    for name in names:
        env = PEERS[name]
        print(f"{name}: {env.folder} " + (json.dumps(env.versions()) if env.exists() else "(absent)"))
    sys.exit(0)


if __name__ == "__main__":
    main()
