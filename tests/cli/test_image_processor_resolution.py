"""The CLI uses the image processor a checkpoint folder saved, in the layout transformers 4 or 5 wrote it."""

import pytest
from transformers import CLIPImageProcessor, CLIPVisionConfig, LlavaProcessor

from memvp_peft.cli.model_loading import image_processor_for
from memvp_peft.demo_models import build_word_tokenizer

SAVED_MEAN, SAVED_STD = (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)


def _image_processor():
    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                              image_mean=list(SAVED_MEAN), image_std=list(SAVED_STD))


@pytest.mark.parametrize("layout", ["processor_config.json", "preprocessor_config.json"])
def test_the_folders_saved_mean_and_std_are_used(tmp_path, layout):
    if layout == "processor_config.json":  # transformers 5: a whole processor, no preprocessor_config.json
        tokenizer = build_word_tokenizer(["what digit <image>"])
        LlavaProcessor(image_processor=_image_processor(), tokenizer=tokenizer, patch_size=8,
                       image_token="<image>").save_pretrained(tmp_path)
    else:  # an image processor saved on its own
        _image_processor().save_pretrained(tmp_path)
    assert (tmp_path / layout).is_file()
    processor = image_processor_for(str(tmp_path), CLIPVisionConfig(image_size=32))
    assert tuple(processor.image_mean) == pytest.approx(SAVED_MEAN)
    assert tuple(processor.image_std) == pytest.approx(SAVED_STD)


def test_a_folder_without_a_processor_gets_clip_defaults_sized_to_the_encoder(tmp_path):
    processor = image_processor_for(str(tmp_path), CLIPVisionConfig(image_size=48))
    assert processor.crop_size["height"] == 48
