"""A LLaVA-NeXT / OneVision record's images and video, read for its shard.

`image` is a path or a list of paths; `video` is a video file, decoded here with PyAV and sampled (see
`VideoSampling`), or a list of frame images. One `<image>` marker stands for each image and for the video
(OneVision's data marks a video with `<image>` too), in the order images first, then the video. What is
stored: every picture's bytes (an image's own, as `fix_image` leaves them; a decoded frame as JPEG), and,
for a sample with more than one picture, the `media` list that says which member is what
(vdep/data/media.py). A single-image record is stored exactly as before.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vdep.data.conversation import SampleError
from vdep.data.media import MediaEntry, picture_member
from vdep.data.shards import IMAGE_EXTENSIONS
from vdep.errors import DataError

from .image_fixing import fix_image

# Decoded frames are stored as JPEG at this quality (PIL's encoder: the same bytes for the same frame).
FRAME_JPEG_QUALITY = 95


@dataclass(frozen=True)
class VideoSampling:
    """Which frames of a video file are kept, as LLaVA-NeXT's training code samples them: `fps` frames a second
    (every round(video fps / fps)-th frame), and when that is more than `max_frames`, `max_frames` frames spread
    evenly over the whole video (its first and last included). A list of frame images keeps at most
    `max_frames` of them, spread the same way."""

    fps: float = 1.0
    max_frames: int = 32

    def indices(self, total: int, video_fps: float | None) -> list[int]:
        step = max(1, round(video_fps / self.fps)) if video_fps and self.fps > 0 else 1
        kept = list(range(0, total, step))
        if len(kept) > self.max_frames:
            kept = np.linspace(0, total - 1, self.max_frames, dtype=int).tolist()
        return kept


@dataclass(frozen=True)
class MediaSource:
    """One marker's media in a record: an image path, a video file, or a video's frame image paths."""

    type: str  # image, video
    paths: tuple[str, ...]
    is_file: bool = False  # a video file (to decode), not frame images


@dataclass
class StoredMedia:
    """What a record's shard sample holds besides its JSON."""

    pictures: list[tuple[str, bytes]] = field(default_factory=list)  # (extension, bytes), in member order
    entries: list[MediaEntry] = field(default_factory=list)
    converted: list[str] = field(default_factory=list)  # original modes of re-encoded pictures
    resized: int = 0

    @property
    def images(self) -> int:
        return sum(e.type == "image" for e in self.entries)

    @property
    def videos(self) -> int:
        return sum(e.type == "video" for e in self.entries)

    @property
    def frames(self) -> int:
        return sum(len(e.members) for e in self.entries if e.type == "video")

    def media_json(self) -> list[dict] | None:
        """The sample JSON's `media` list; None for one image (stored as before, found by its extension)."""
        if not self.entries or (len(self.entries) == 1 and self.entries[0].type == "image"):
            return None  # text-only, or one image: stored exactly as before
        return [entry.to_json() for entry in self.entries]

    def add(self, kind: str, pictures: list[tuple[str, bytes]]) -> None:
        start = len(self.pictures)
        self.pictures += pictures
        self.entries.append(MediaEntry(kind, tuple(picture_member(start + i, ext) for i, (ext, _) in enumerate(pictures))))


def media_sources(record: dict) -> list[MediaSource]:
    """The record's images and video, in marker order, checked for form (nothing is read yet)."""
    image, video = record.get("image"), record.get("video")
    if image is not None and video is not None:
        raise SampleError("bad_record", "a record holds 'image' or 'video', not both")
    sources = []
    if image is not None:
        paths = image if isinstance(image, list) else [image]
        if not paths or not all(isinstance(p, str) and p for p in paths):
            raise SampleError("bad_record", "'image' must be a relative path string or a non-empty list of them")
        sources = [MediaSource("image", (p,)) for p in paths]
    if video is not None:
        if isinstance(video, str) and video:
            sources = [MediaSource("video", (video,), is_file=True)]
        elif isinstance(video, list) and video and all(isinstance(p, str) and p for p in video):
            sources = [MediaSource("video", tuple(video))]
        else:
            raise SampleError("bad_record", "'video' must be a video file's relative path or a non-empty list of frame images")
    return sources


def read_media(sources: list[MediaSource], image_root: Path | None, max_side: int | None,
               sampling: VideoSampling) -> StoredMedia:
    stored = StoredMedia()
    for source in sources:
        if image_root is None:
            raise SampleError(f"missing_{source.type}",
                              f"{source.paths[0]}: the record has an {source.type} but no --image-root was given")
        if source.is_file:
            stored.add("video", decode_video(image_root / source.paths[0], source.paths[0], sampling))
            continue
        paths = source.paths
        if source.type == "video" and len(paths) > sampling.max_frames:
            paths = tuple(paths[i] for i in sampling.indices(len(paths), None))
        pictures = []
        for name in paths:
            extension, data, converted, resized = read_picture(image_root, name, max_side)
            pictures.append((extension, data))
            stored.converted += [converted] if converted else []
            stored.resized += int(resized)
        stored.add(source.type, pictures)
    return stored


def read_picture(image_root: Path, name: str, max_side: int | None) -> tuple[str, bytes, str | None, bool]:
    """An image file's bytes, fixed for training (`fix_image`); rejections as for a single image."""
    image_path = image_root / name
    extension = image_path.suffix.lower().lstrip(".")
    if extension not in IMAGE_EXTENSIONS:
        raise SampleError("unsupported_image_format", f"{name}: use one of {', '.join(IMAGE_EXTENSIONS)}")
    try:
        data = image_path.read_bytes()
    except OSError as exc:
        raise SampleError("missing_image", f"{image_path}: {exc.strerror or exc}") from None
    fixed = fix_image(data, extension, max_side, name)
    return fixed.extension, fixed.data, fixed.converted_from, fixed.resized_from is not None


def decode_video(path: Path, name: str, sampling: VideoSampling) -> list[tuple[str, bytes]]:
    """The sampled frames of a video file, as JPEG. A file that is missing is `missing_video`; one that PyAV
    cannot open or decode, or that holds no frame, is `bad_video` (named, with the decoder's reason)."""
    try:
        import av
    except ImportError:
        raise DataError(f"{name}: video records are decoded with PyAV; install it: pip install 'vdep[video]'") from None
    if not path.is_file():
        raise SampleError("missing_video", f"{path}: no such video file")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise SampleError("bad_video", f"{name}: the file holds no video stream")
            stream = container.streams.video[0]
            rate = float(stream.average_rate) if stream.average_rate else None
            total = sum(1 for _ in container.decode(video=0))  # counted: a header's frame count may be missing or wrong
        if total == 0:
            raise SampleError("bad_video", f"{name}: the video has no frame that decodes")
        wanted = set(sampling.indices(total, rate))
        frames = []
        with av.open(str(path)) as container:
            for index, frame in enumerate(container.decode(video=0)):
                if index in wanted:
                    buffer = io.BytesIO()
                    frame.to_image().convert("RGB").save(buffer, format="JPEG", quality=FRAME_JPEG_QUALITY)
                    frames.append(("jpg", buffer.getvalue()))
    except SampleError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise SampleError("bad_video", f"{name}: cannot decode the video: {exc}") from None
    return frames
