"""Helpers shared by several test modules (test modules import from here or conftest, never from each other)."""

from __future__ import annotations

import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vdep.config import TrainConfig, VdepConfig
from vdep.data.anyres import MediaProcessor
from vdep.data.dataset import Batching, SamplePreprocessor
from vdep.data.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageProcessing, normalise_pixels
from vdep.data.loader import DataPosition, StageLoader
from vdep.data.remote import RemoteSettings
from vdep.data.shards import discover_shards
from vdep.data.templates import TemplateTokenizer, make_template
from vdep.model.attention import AttentionChoice
from vdep.model.build import build_model, load_image_processing, model_spec
from vdep.model.llava import MultimodalSpec, VdepLlava
from vdep.model.tokenizer import image_token_id
from vdep.objectives.objective import VdepObjective
from vdep.rundir import RunDir
from vdep.train.base_weights import materialize_base


# ------------------------------------------------------------------------------------------ the model
@dataclass
class TinyModel:
    """A freshly built tiny VdepLlava (fp32, CPU, no DeepSpeed) with what tests need beside it."""

    model: VdepLlava
    processing: ImageProcessing
    config: TrainConfig

    @property
    def spec(self) -> MultimodalSpec:
        return self.model.spec


def build_tiny_model(config: TrainConfig, tokenizer, run_dir: Path, vdep: VdepConfig | None = None) -> TinyModel:
    """Base weights written into `run_dir` (once), then the model; with `vdep`, its objective's head and term."""
    run = RunDir(run_dir)
    base = materialize_base(config.model, tokenizer, run.base_paths(config.model))
    spec = model_spec(config.model, base, tokenizer)
    objective = None
    if vdep is not None:
        objective = VdepObjective(vdep, image_token_id=spec.image_token_id, num_image_tokens=spec.num_image_tokens,
                                  seed=0, device=torch.device("cpu"))
    model = build_model(config.model, spec, tokenizer, base, AttentionChoice("sdpa", "test"), torch.float32, objective)
    return TinyModel(model, load_image_processing(base, True), config)


def samples(tiny: TinyModel, tokenizer, small_data, template: str = "vicuna_v1", count: int = 4, uint8: bool = False):
    """Real preprocessed samples from the test shards (mixed image and text-only for vicuna_v1)."""
    import webdataset as wds

    encoder = TemplateTokenizer(tokenizer, tiny.spec.image_token_id, tiny.spec.num_image_tokens)
    preprocess = SamplePreprocessor(make_template(template, tokenizer), encoder, tiny.processing, 256)
    shard_dir = small_data.finetune_shards if template == "vicuna_v1" else small_data.align_shards
    raw = wds.tariterators.tarfile_samples([{"url": s.path} for s in discover_shards([str(shard_dir)])])
    out = []
    for sample in raw:
        processed = preprocess(sample)  # uint8 pixels, as the loader ships them
        if processed.pixel_values is not None and not uint8:
            processed.pixel_values = normalise_pixels(processed.pixel_values, tiny.processing.normalisation_table())
        out.append(processed)
        if len(out) == count:
            return out
    raise AssertionError("not enough samples")


# ------------------------------------------------------------------------------------ multi-image inputs
def turns(*pairs: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": text} for i, text in enumerate(pairs)]


def write_video(path: Path, frames: int = 30, fps: int = 10) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 8, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_multi_image_inputs(root: Path, copies: int = 1) -> tuple[Path, Path]:
    """A LLaVA-NeXT/OneVision JSON file and its image folder: one image, three interleaved images, a video file,
    a video as frame images, text only, and `copies` of those, then six records build-shards must reject."""
    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for name, (height, width) in {"wide.png": (40, 100), "tall.jpg": (90, 30), "small.png": (20, 20),
                                  "big.jpg": (70, 70)}.items():
        Image.fromarray((rng.rand(height, width, 3) * 255).astype(np.uint8)).save(images / name)
    for i in range(5):
        Image.new("RGB", (40, 30), (i * 40, 0, 0)).save(images / f"frame{i}.jpg")
    write_video(images / "clip.mp4")
    (images / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"not a video" * 20)
    good = [
        {"id": "one", "image": "wide.png", "conversations": turns("<image>\nWhat color is the shape?", "red")},
        # interleaved: markers in two user turns, text around them
        {"id": "three", "image": ["wide.png", "tall.jpg", "small.png"],
         "conversations": turns("Compare <image> and <image>.", "red", "And <image>?", "blue")},
        {"id": "video", "video": "clip.mp4", "conversations": turns("<image>\nWhat happens?", "a circle")},
        {"id": "frames", "video": [f"frame{i}.jpg" for i in range(5)], "conversations": turns("<image> What is it?", "red")},
        {"id": "text", "conversations": turns("Hi?", "hello")},
        {"id": "big", "image": "big.jpg", "conversations": turns("<image>\nWhere is the shape?", "top left")},
    ]
    bad = [
        {"id": "fewer-markers", "image": ["wide.png", "tall.jpg"], "conversations": turns("<image> What?", "red")},
        {"id": "undecodable", "video": "broken.mp4", "conversations": turns("<image> What?", "red")},
        {"id": "no-video", "video": "gone.mp4", "conversations": turns("<image> What?", "red")},
        {"id": "missing-frame", "video": ["frame0.jpg", "gone.jpg"], "conversations": turns("<image> What?", "red")},
        {"id": "both", "image": "wide.png", "video": "clip.mp4", "conversations": turns("<image> What?", "red")},
        {"id": "empty-list", "image": [], "conversations": turns("<image> What?", "red")},
    ]
    (root / "data.json").write_text(json.dumps(good * copies + bad))
    return root / "data.json", images


def anyres_samples(tiny: TinyModel, tokenizer, shards: Path, ids: list[str], uint8: bool = False) -> list:
    """Preprocessed samples of the multi-image shards, by record id, in the tiny model's image setting."""
    import webdataset as wds

    encoder = TemplateTokenizer(tokenizer, tiny.spec.image_token_id, tiny.spec.num_image_tokens)
    preprocess = SamplePreprocessor(make_template("vicuna_v1", tokenizer), encoder,
                                    MediaProcessor(tiny.spec.geometry, tiny.processing), 1536)
    raw = {json.loads(s["json"])["id"]: s
           for s in wds.tariterators.tarfile_samples([{"url": s.path} for s in discover_shards([str(shards)])])}
    out = []
    for record in ids:
        processed = preprocess(raw[record])
        if processed.pixel_values is not None and not uint8:
            processed.pixel_values = normalise_pixels(processed.pixel_values, tiny.processing.normalisation_table())
        out.append(processed)
    return out


def anyres_loader(shards: Path, tokenizer, rank: int, world: int, seed: int, micro: int = 1) -> StageLoader:
    """The loader `vdep train` builds in tests/conftest.py's AnyRes setting (64-pixel tiles, 1536 tokens)."""
    from vdep.data.anyres import ImageGeometry

    processing = ImageProcessing.tiny("clip", 64)
    geometry = ImageGeometry("anyres", 64, 8, 64, ((64, 64), (64, 128), (128, 64), (128, 128)), "spatial_unpad")
    encoder = TemplateTokenizer(tokenizer, image_token_id(tokenizer), 64)
    preprocess = SamplePreprocessor(make_template("vicuna_v1", tokenizer), encoder, MediaProcessor(geometry, processing), 1536)
    return StageLoader.create(
        discover_shards([str(shards)]), preprocess,
        Batching(micro, tokenizer.pad_token_id, (64, 64), processing.normalisation_table(), pack_capacity=1536),
        rank=rank, world_size=world, num_workers=0, grad_accum_steps=1, seed=seed, split="samples", shuffle_buffer=4,
    )


# ------------------------------------------------------------------------------------------ the loader
def make_loader(small_data, tokenizer, rank: int, world: int, split: str, workers: int = 0, micro: int = 4, seed: int = 0,
                shard_dir: Path | str | None = None, shuffle_buffer: int = 8, max_length: int = 256,
                remote: RemoteSettings | None = None, **batching) -> StageLoader:
    """The loader `vdep train` builds for a vicuna_v1 stage of the tiny test model (16 image tokens);
    `shard_dir` may be a remote prefix (read with `remote`)."""
    processing = ImageProcessing(32, None, (32, 32), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    encoder = TemplateTokenizer(tokenizer, image_token_id(tokenizer), 16)
    preprocess = SamplePreprocessor(make_template("vicuna_v1", tokenizer), encoder, processing, max_length)
    return StageLoader.create(
        discover_shards([str(shard_dir or small_data.finetune_shards)], remote), preprocess,
        Batching(micro, tokenizer.pad_token_id, (32, 32), processing.normalisation_table(),
                 **{"pack_capacity": max_length, **batching}),
        rank=rank, world_size=world, num_workers=workers, grad_accum_steps=1, seed=seed, split=split,
        shuffle_buffer=shuffle_buffer, remote=remote,
    )


# Loader settings whose data position the tests restore in a fresh process.
POSITION_CASES = {
    "plain, in-process loading": {"workers": 0},
    "2 workers": {"workers": 2},
    "2 workers, grouped, packed": {"workers": 2, "group_by_modality_length": True, "group_window": 3, "packing": True,
                                       "pack_capacity": 400},
    "grouped, resampled shards": {"workers": 0, "group_by_modality_length": True, "group_window": 4, "split": "resample"},
}


def loader_for_case(small_data, tokenizer, case: str) -> StageLoader:
    settings = dict(POSITION_CASES[case])
    split = settings.pop("split", "shards")
    # max_length 148 cuts away every answer of some conversations: the stream skips and counts them.
    return make_loader(small_data, tokenizer, 1, 2, split, micro=2, seed=5, max_length=148, **settings)


def batch_fingerprint(batch) -> list:
    return [batch.keys, batch.input_ids.tolist(), batch.labels.tolist(), float(batch.pixel_values.sum()),
            None if batch.position_ids is None else batch.position_ids.tolist(), batch.skipped]


def restored_batches_main() -> None:
    """Run in a fresh process: the batches of a loader restored from a saved position (argv: JSON)."""
    from tests.conftest import SmallData
    from vdep.model.tokenizer import prepare_tokenizer

    args = json.loads(sys.argv[1])
    small_data = SmallData(*(Path(p) for p in args["small_data"]))
    tokenizer = prepare_tokenizer(small_data.tokenizer)
    loader = loader_for_case(small_data, tokenizer, args["case"])
    position = DataPosition.from_json(args["position"])
    print(json.dumps([batch_fingerprint(b) for b in loader.micro_batches(position.epoch, position)]))


def unconsumed_bytes(position: DataPosition, plans: dict, folder: Path, request_bytes: int) -> tuple[int, int, int]:
    """(bytes of the samples a data position has not consumed, of the tar trailers after them, and of the
    consumed gaps between waiting samples that a restore may read).

    What a restored loader must read: the manifest (sizes.json, and stats.json, which says whether the build
    is complete: shards.check_build_finished), the samples waiting in each consumer's shuffle
    buffer and carry (by range), and its plan's samples from the recorded byte on; a shard's trailer
    (end-of-archive blocks and padding, at most a tar record) may be read or not. A remote restore reads a
    consumer's waiting samples of one shard in spans that take in the gaps smaller than one request
    (`request_bytes`, docs/design.md): those gaps, computed here from the position by that rule, may be read
    too; no other consumed byte. `plans` are the consumers' plans by local number, `folder` a local copy of
    the shards."""
    from vdep.data.tar_reader import iterate_samples

    unconsumed = sum((folder / name).stat().st_size for name in ("sizes.json", "stats.json") if (folder / name).is_file())
    trailers, gaps = 0, 0
    for local, state in position.consumers.items():
        stream, plan = state.stream, plans[local]
        waiting = list(stream.buffer) + [ref for _, ref in state.carry]
        unconsumed += sum(ref.end - ref.start for ref in waiting)
        ordered = sorted(waiting, key=lambda ref: (ref.shard, ref.start))
        gaps += sum(b.start - a.end for a, b in itertools.pairwise(ordered)
                    if a.shard == b.shard and 0 < b.start - a.end < request_bytes)
        for number in range(stream.source.shard, len(plan.shards)):
            path = folder / Path(plan.shards[number].path).name
            offset = stream.source.offset if number == stream.source.shard else 0
            with path.open("rb") as handle:
                handle.seek(offset)
                refs = [sample["__ref__"] for sample in iterate_samples(handle, str(path), number, offset)]
            unconsumed += sum(ref.end - ref.start for ref in refs)
            trailers += path.stat().st_size - (refs[-1].end if refs else offset)
    return unconsumed, trailers, gaps
