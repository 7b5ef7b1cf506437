"""The processor of an export's class, written and read back the same way by the exporter, `--verify` and
`vdep eval`.

`LlavaProcessor` and `LlavaNextProcessor` are transformers' own, saved and loaded as they are.
`LlavaOnevisionProcessor` needs one workaround: transformers 5.24 checks its video processor against
`transformers.VideoProcessorMixin`, a name it exports only when torchvision is installed, so without
torchvision the class can neither be built nor loaded (`AutoProcessor` fails in that check), although its
image path runs on PIL. `OnevisionProcessor` is the same class with that one check made against the real
base class; it saves under transformers' class name, so a folder it writes is an ordinary OneVision folder, which
`AutoProcessor.from_pretrained` loads wherever torchvision is installed.

Its video processor needs a second one: `LlavaOnevisionVideoProcessor` resizes frames with torchvision (without
it, calling it fails), and torchvision's tensor resize is not PIL's, so its pixels are not training's. vdep
processes a video's frames as it processes any picture of the tower: PIL, the tower's resize, crop and
normalisation, without LLaVA-1.5's padding (`data/anyres.py: MediaProcessor`). `FrameVideoProcessor` is
transformers' video processor class with those same settings (saved as they are, so a torchvision reader runs
the same geometry), whose frames go through `LlavaImageProcessorPil`: the image processor whose PIL arithmetic
vdep's image path equals bit for bit (tests/test_video_export.py holds the frames to training's).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoProcessor, AutoTokenizer, BatchFeature, LlavaOnevisionProcessor
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor
from transformers.video_processing_utils import VideoProcessorMixin
from transformers.video_utils import make_batched_videos


class OnevisionProcessor(LlavaOnevisionProcessor):
    """`LlavaOnevisionProcessor`, its video processor checked against the class itself (see the module's note)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor":
            if not isinstance(argument, VideoProcessorMixin):
                raise TypeError(f"video_processor: a {type(argument).__name__}, not a video processor")
            return VideoProcessorMixin
        return super().check_argument_for_proper_class(argument_name, argument)



class FrameVideoProcessor(LlavaOnevisionVideoProcessor):
    """`LlavaOnevisionVideoProcessor` whose frames go through the PIL image path (see the module's note): each
    frame is resized, cropped and normalised by `LlavaImageProcessorPil` with this processor's own settings."""

    def frame_processor(self) -> LlavaImageProcessorPil:
        size = {key: value for key, value in dict(self.size).items() if value is not None}
        crop = {key: value for key, value in dict(self.crop_size).items() if value is not None} if self.crop_size else None
        return LlavaImageProcessorPil(
            do_pad=False, do_resize=self.do_resize, size=size, resample=self.resample,
            do_center_crop=bool(self.do_center_crop), **({"crop_size": crop} if crop else {}),
            do_rescale=self.do_rescale, rescale_factor=self.rescale_factor, do_normalize=self.do_normalize,
            image_mean=list(self.image_mean), image_std=list(self.image_std), do_convert_rgb=self.do_convert_rgb)

    def preprocess(self, videos, return_tensors=None, **kwargs) -> BatchFeature:
        """Videos given as their frames (a list of images, or a (frames, H, W, 3) array each) →
        `pixel_values_videos` (videos, frames, 3, H, W); videos of different lengths stay a list."""
        frames = self.frame_processor()
        processed = [frames(images=list(video), return_tensors="pt")["pixel_values"] for video in make_batched_videos(videos)]
        if return_tensors == "pt" and len({video.shape for video in processed}) == 1:
            return BatchFeature({"pixel_values_videos": torch.stack(processed)})
        return BatchFeature({"pixel_values_videos": processed})


# transformers writes a processor's class name into processor_config.json and tokenizer_config.json
# (`processor_class`, `video_processor_type`): under transformers' names, the folder is an ordinary OneVision folder.
OnevisionProcessor.__name__ = LlavaOnevisionProcessor.__name__
FrameVideoProcessor.__name__ = LlavaOnevisionVideoProcessor.__name__


def load_processor(folder: Path, model_type: str):
    """The export's processor, with the PIL image processor (the one training's arithmetic equals)."""
    if model_type != "llava_onevision":
        return AutoProcessor.from_pretrained(str(folder))
    combined = json.loads((folder / "processor_config.json").read_text())
    settings = {key: combined[key] for key in ("num_image_tokens", "vision_feature_select_strategy",
                                               "vision_aspect_ratio", "image_token", "video_token") if key in combined}
    chat_template = folder / "chat_template.jinja"
    return OnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessorPil(**_without_type(combined["image_processor"])),
        tokenizer=AutoTokenizer.from_pretrained(str(folder)),
        video_processor=FrameVideoProcessor(**_without_type(combined["video_processor"])),
        chat_template=chat_template.read_text() if chat_template.is_file() else None,
        **settings,
    )


def _without_type(settings: dict) -> dict:
    return {key: value for key, value in settings.items() if key not in ("image_processor_type", "video_processor_type",
                                                                         "processor_class")}
