"""A shard sample's images and videos: which tar members hold them, in the order of its `<image>` markers.

A sample with one image (every shard built before multi-image samples, and every single-image sample
since) is `KEY.json` + `KEY.<ext>`: the image is the member with an image extension. A sample with several
images or a video lists them in its JSON, in marker order, by member name (docs/data.md, "Shards"):

    "media": [{"type": "image", "members": ["jpg"]},
              {"type": "video", "members": ["1.jpg", "2.jpg", ...], "fps": 1.0, "source_frames": 300}]

The k-th picture of a sample (images and video frames counted together) is the member `KEY.jpg` (k = 0)
or `KEY.<k>.jpg` (any image extension), so the first image keeps the single-image name and a reader
that knows only `KEY.<ext>` still finds it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .anyres import Media, Video
from .conversation import SampleError
from .images import decode_image
from .shards import IMAGE_EXTENSIONS

MEDIA_TYPES = ("image", "video")


@dataclass(frozen=True)
class MediaEntry:
    """One `<image>` marker's media: an image (one member) or a video (its frames' members, in order)."""

    type: str
    members: tuple[str, ...]

    def to_json(self) -> dict:
        return {"type": self.type, "members": list(self.members)}


def picture_member(index: int, extension: str) -> str:
    """The member (after `KEY.`) of a sample's `index`-th picture."""
    return extension if index == 0 else f"{index}.{extension}"


def media_entries(meta: dict, members: dict) -> list[MediaEntry]:
    """The sample's media from its JSON and its members' names, without decoding anything. A malformed
    `media` list, or one that names a member the sample does not hold, is a `SampleError("bad_media")`."""
    listed = meta.get("media")
    if listed is None:
        extension = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
        return [] if extension is None else [MediaEntry("image", (extension,))]
    if not isinstance(listed, list):
        raise SampleError("bad_media", "'media' must be a list of {type, members} entries")
    entries = []
    for number, entry in enumerate(listed):
        kind = entry.get("type") if isinstance(entry, dict) else None
        names = entry.get("members") if isinstance(entry, dict) else None
        if kind not in MEDIA_TYPES or not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise SampleError("bad_media", f"media entry {number} must be {{type: image|video, members: [names]}}")
        if kind == "image" and len(names) != 1:
            raise SampleError("bad_media", f"media entry {number}: an image has one member, not {len(names)}")
        missing = [name for name in names if name not in members]
        if missing:
            raise SampleError("bad_media", f"media entry {number} names member(s) {', '.join(missing)} that the sample lacks")
        entries.append(MediaEntry(kind, tuple(names)))
    return entries


def decode_media(entries: list[MediaEntry], raw: dict, key: str) -> list[Media]:
    """The entries' pictures decoded: an image, or a video's frames."""
    media: list[Media] = []
    for entry in entries:
        pictures = [decode_image(raw[name], f"member {key}.{name}") for name in entry.members]
        media.append(pictures[0] if entry.type == "image" else Video(tuple(pictures)))
    return media
