"""Shared fixtures: a small procedural dataset, its shards, a tokenizer, and tiny model settings.

Everything is real: shards written by `build_shards`, a SentencePiece tokenizer trained by
`make_tokenizer`, models built by vdep's own builder from random-init weights.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"))
# Triton kernels run in Triton's interpreter on this CPU-only machine; it must be set before a kernel
# module is imported (triton.jit decides at decoration time).
os.environ.setdefault("TRITON_INTERPRET", "1")

from tests import deprecations

deprecations.install()  # before vdep and the libraries are imported (tests/deprecations.py)

from tests.byte_level import CHATML_JINJA, LLAMA3_JINJA, byte_level_tokenizer
from vdep.data_tools.build_shards import BuildOptions, build_shards
from vdep.data_tools.make_tokenizer import make_tokenizer
from vdep.demo_data import write_demo_data

# A tiny model (16 image tokens, 2-layer LLM) that trains in seconds on a CPU.
TINY_MODEL_OVERRIDES = [
    "model.vision_tower.tiny.hidden_size=32",
    "model.vision_tower.tiny.num_layers=2",
    "model.vision_tower.tiny.num_heads=2",
    "model.vision_tower.tiny.intermediate_size=64",
    "model.vision_tower.tiny.image_size=32",
    "model.vision_tower.tiny.patch_size=8",
    "model.language_model.tiny.hidden_size=64",
    "model.language_model.tiny.num_layers=2",
    "model.language_model.tiny.num_heads=4",
    "model.language_model.tiny.num_kv_heads=2",
    "model.language_model.tiny.intermediate_size=128",
    "data.max_length=256",
]


@dataclass(frozen=True)
class SmallData:
    root: Path
    raw: Path
    align_shards: Path
    finetune_shards: Path
    tokenizer: Path

    def overrides(self, run_dir: Path) -> list[str]:
        """Overrides of the demo-tiny recipe that point it at this data and shrink the model."""
        return [
            f"model.tokenizer={self.tokenizer}",
            f"stages.align.shards=[{self.align_shards}]",
            f"stages.finetune.shards=[{self.finetune_shards}]",
            f"run.output_dir={run_dir.parent}",
            f"run.name={run_dir.name}",
            "deepspeed.timeout_minutes=2",  # a hang becomes a failure
            "stages.finetune.epochs=1",  # the recipe's 2 are for the demo's minutes, not the tests'
            *TINY_MODEL_OVERRIDES,
        ]


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> SmallData:
    root = tmp_path_factory.mktemp("small-data")
    raw = root / "raw"
    paths = write_demo_data(raw, seed=7, num_align=64, num_finetune=64, num_eval=12)
    build_shards(BuildOptions([paths["align"]], raw / "images", root / "align", samples_per_shard=16, progress=False))
    build_shards(BuildOptions([paths["finetune"]], raw / "images", root / "finetune", samples_per_shard=16, progress=False))
    make_tokenizer([str(root / "align"), str(root / "finetune")], 400, root / "tokenizer")
    return SmallData(root, raw, root / "align", root / "finetune", root / "tokenizer")


@pytest.fixture(scope="session")
def tokenizer(small_data):
    from vdep.model.tokenizer import prepare_tokenizer

    return prepare_tokenizer(small_data.tokenizer)


@pytest.fixture(scope="session")
def tiny_run(small_data, tokenizer, tmp_path_factory):
    """(config, run directory) of the tiny test model, its base weights written once."""
    from tests.helpers import build_tiny_model
    from vdep.config import load_config

    run_dir = tmp_path_factory.mktemp("tiny-run")
    config = load_config("demo-tiny", small_data.overrides(run_dir))
    build_tiny_model(config, tokenizer, run_dir)
    return config, run_dir


@pytest.fixture
def tiny_model(tiny_run, tokenizer):
    """A tiny VdepLlava built afresh for each test (tests change its weights, gradients and mode)."""
    from tests.helpers import build_tiny_model

    config, run_dir = tiny_run
    return build_tiny_model(config, tokenizer, run_dir, config.vdep)


# --------------------------------------------------------------------------- the AnyRes test setting
# ../shared/ANYRES.md's tiny CLIP tower (64-pixel views of 8-pixel patches: 64 tokens a view), its pinpoints, and
# LLaVA-NeXT's spatial_unpad with the learned image_newline; room for a sample of three tiled images.
ANYRES_OVERRIDES = [
    "model.vision_tower.tiny.image_size=64",
    "model.image_aspect_ratio=anyres",
    "model.image_grid_pinpoints=[[64,64],[64,128],[128,64],[128,128]]",
    "model.mm_patch_merge_type=spatial_unpad",
    "model.language_model.tiny.max_position_embeddings=2048",
    "data.max_length=1536",
]


@pytest.fixture(scope="session")
def anyres_shards(tmp_path_factory) -> Path:
    """Shards of tests/helpers.py's multi-image inputs, 4 copies: single, three interleaved and no images, videos."""
    from tests.helpers import write_multi_image_inputs
    from vdep.data_tools.media import VideoSampling

    root = tmp_path_factory.mktemp("anyres-data")
    data, images = write_multi_image_inputs(root, copies=4)
    build_shards(BuildOptions([data], images, root / "shards", samples_per_shard=6, shuffle=True, progress=False,
                              video=VideoSampling(fps=2.0, max_frames=3)))
    return root / "shards"


def anyres_overrides(small_data: SmallData, shards: Path, run_dir: Path, aspect: str = "anyres") -> list[str]:
    """demo-tiny at the tiny test sizes in the AnyRes setting, its finetune stage on `shards`."""
    return [*small_data.overrides(run_dir), *ANYRES_OVERRIDES, f"model.image_aspect_ratio={aspect}",
            f"stages.finetune.shards=[{shards}]"]


@pytest.fixture(scope="session")
def anyres_run(small_data, tokenizer, anyres_shards, tmp_path_factory):
    from tests.helpers import build_tiny_model
    from vdep.config import load_config

    run_dir = tmp_path_factory.mktemp("anyres-run")
    config = load_config("demo-tiny", anyres_overrides(small_data, anyres_shards, run_dir))
    build_tiny_model(config, tokenizer, run_dir)
    return config, run_dir


@pytest.fixture
def anyres_model(anyres_run, tokenizer):
    """A tiny VdepLlava in the AnyRes setting, built afresh for each test."""
    from tests.helpers import build_tiny_model

    config, run_dir = anyres_run
    return build_tiny_model(config, tokenizer, run_dir, config.vdep)


# --------------------------------------------------------------- servers for remote shards (remote_servers.py)
@pytest.fixture(scope="session")
def served(small_data, tmp_path_factory) -> Path:
    """A web root holding copies of the test shards (finetune/, align/) and a prefix without sizes.json."""
    import shutil

    root = tmp_path_factory.mktemp("www")
    for name, folder in (("finetune", small_data.finetune_shards), ("align", small_data.align_shards)):
        shutil.copytree(folder, root / name)
    (root / "no-sizes").mkdir()
    shutil.copy(small_data.finetune_shards / "000000.tar", root / "no-sizes" / "000000.tar")
    return root


@pytest.fixture(scope="session")
def nginx(served, tmp_path_factory):
    from tests.remote_servers import Nginx
    from tests.system_packages import require_packages

    require_packages(("nginx",), ("nginx-light",), "VDEP_REQUIRE_SERVERS")

    server = Nginx(served, tmp_path_factory.mktemp("nginx")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3(served):
    """An S3 API server whose bucket `shards` holds finetune/; its endpoint and credentials in the environment."""
    import fsspec

    from tests.remote_servers import MotoS3

    server = MotoS3().start()
    previous = {name: os.environ.get(name) for name in server.environment()}
    os.environ.update(server.environment())
    try:
        server.make_bucket("shards")
        fsspec.filesystem("s3", skip_instance_cache=True).put(str(served / "finetune"), "s3://shards/finetune",
                                                                 recursive=True)
        yield server
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


def read_metrics(run_dir: Path, stage: str) -> list[dict]:
    path = run_dir / stage / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def exported_tensors(folder: Path) -> dict:
    """Every tensor of a sharded safetensors export, by name (checks the index covers them all)."""
    from safetensors import safe_open

    index = json.loads((folder / "model.safetensors.index.json").read_text())
    tensors = {}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(str(folder / file), framework="pt") as weights:
            for name in weights.keys():  # noqa: SIM118
                tensors[name] = weights.get_tensor(name)
    assert set(tensors) == set(index["weight_map"])
    return tensors


# ---------------------------------------------- tokenizers of other model families (tests/byte_level.py)
@pytest.fixture(scope="session")
def llama3_tokenizer(tmp_path_factory):
    specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|finetune_pad|>"]
    return byte_level_tokenizer(tmp_path_factory.mktemp("llama3"), specials, "<|begin_of_text|>", "<|eot_id|>", LLAMA3_JINJA)


@pytest.fixture(scope="session")
def qwen2_tokenizer(tmp_path_factory):
    specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    return byte_level_tokenizer(tmp_path_factory.mktemp("qwen2"), specials, None, "<|im_end|>", CHATML_JINJA)


@pytest.fixture(scope="session")
def base_llama3_tokenizer(tmp_path_factory):
    """Like Llama 3's base tokenizer: EOS is <|end_of_text|>, answers end with <|eot_id|>."""
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                "<|finetune_pad|>"]
    return byte_level_tokenizer(tmp_path_factory.mktemp("llama3-base"), specials, "<|begin_of_text|>", "<|end_of_text|>",
                                LLAMA3_JINJA)
