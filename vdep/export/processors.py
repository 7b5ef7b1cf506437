"""The processor of an export's class, written and read back the same way by the exporter, `--verify` and
`vdep eval`.

`LlavaProcessor` and `LlavaNextProcessor` are transformers' own, saved and loaded as they are.
`LlavaOnevisionProcessor` needs one workaround: transformers 5.24 checks its video processor against
`transformers.VideoProcessorMixin`, a name it exports only when torchvision is installed, so without
torchvision the class can neither be built nor loaded (`AutoProcessor` fails in that check), although its
image path runs on PIL. `OnevisionProcessor` is the same class with that one check made against the real
base class; it saves under transformers' class name, so a folder it writes is an ordinary OneVision folder, which
`AutoProcessor.from_pretrained` loads wherever torchvision is installed.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoProcessor, AutoTokenizer, LlavaOnevisionProcessor
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor
from transformers.video_processing_utils import VideoProcessorMixin


class OnevisionProcessor(LlavaOnevisionProcessor):
    """`LlavaOnevisionProcessor`, its video processor checked against the class itself (see the module's note)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor":
            if not isinstance(argument, VideoProcessorMixin):
                raise TypeError(f"video_processor: a {type(argument).__name__}, not a video processor")
            return VideoProcessorMixin
        return super().check_argument_for_proper_class(argument_name, argument)



# transformers writes a processor's class name into processor_config.json and tokenizer_config.json
# (`processor_class`): under transformers' name, the folder is an ordinary OneVision folder.
OnevisionProcessor.__name__ = LlavaOnevisionProcessor.__name__


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
        video_processor=LlavaOnevisionVideoProcessor(**_without_type(combined["video_processor"])),
        chat_template=chat_template.read_text() if chat_template.is_file() else None,
        **settings,
    )


def _without_type(settings: dict) -> dict:
    return {key: value for key, value in settings.items() if key not in ("image_processor_type", "video_processor_type",
                                                                         "processor_class")}
