"""A VLM base whose vision tower MemVP cannot read (anything but the Llava layout; Qwen2-VL here, as long as it has
no family) is refused at injection unless a separate encoder reads the adapter's pixels (tests/tuner/
test_unsupported_vlm.py); with one, the adapter goes on its language model and takes that encoder's pixels or
`image_features`; what the VLM's own processor adds (`image_grid_thw`) is refused, never dropped; its image
placeholder tokens are refused (it has no VLM family whose processor's batches MemVP reads), as are any family's
placeholders that come without its processor's pixel_values."""

import copy
import warnings

import pytest
import torch
from conftest import memvp_config, randomize_memory
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from test_vision import clip, manual_features, tiny_llava

IMAGE_TOKEN, VISION_START, VISION_END = 60, 62, 63


def tiny_unread_vlm():
    """VipLlava (tests/tuner/test_unsupported_vlm.py): a Llava-like layout whose multi-layer tower features no family
    reads."""
    from test_unsupported_vlm import tiny_vipllava

    return tiny_vipllava()


def tiny_qwen2_vl(seed=0):
    """Qwen2-VL from a config: 2 language layers of width 32; a 1-block tower reading 8x8 images as 2x2 patches."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=2,
                           spatial_merge_size=1, temporal_patch_size=1, in_channels=3),
        image_token_id=IMAGE_TOKEN, video_token_id=61, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )
    return Qwen2VLForConditionalGeneration(config).eval()


def qwen2_vl_batch():
    """What Qwen2-VL's processor gives for one 8x8 image per row: 16 placeholder tokens (typed 1), flattened
    patches, the grid."""
    generator = torch.Generator().manual_seed(2)
    text = torch.randint(3, IMAGE_TOKEN, (2, 4), generator=generator)
    image = torch.tensor([VISION_START] + [IMAGE_TOKEN] * 16 + [VISION_END]).expand(2, -1)
    ids = torch.cat([image, text], dim=1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": (ids == IMAGE_TOKEN).long(),
            "pixel_values": torch.randn(32, 12, generator=generator), "image_grid_thw": torch.tensor([[1, 4, 4]] * 2)}


@pytest.fixture
def text():
    ids = torch.randint(3, IMAGE_TOKEN, (2, 6), generator=torch.Generator().manual_seed(5))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def injected(**fields):
    """The adapter on Qwen2-VL's language model, its pixels read by a separate CLIP (the only way such a base is
    taken)."""
    model = get_peft_model(tiny_qwen2_vl(), memvp_config(num_memory_slots=20, vision_encoder=clip(), **fields))
    randomize_memory(model)
    return model.eval()


def test_image_features_reach_the_memory_of_such_a_vlm(text):
    model = injected()
    features = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        with_image = model(**text, image_features=features).logits
        other_image = model(**text, image_features=features.flip(0)).logits
    assert not torch.allclose(with_image, other_image)


def test_image_grid_thw_on_a_vlm_of_no_family_is_refused_not_dropped():
    """VipLlava (no family, taken with a separate CLIP) given a Qwen-style grid beside its features: refused."""
    from test_unsupported_vlm import tiny_vipllava

    model = get_peft_model(tiny_vipllava(), memvp_config(num_memory_slots=20, vision_encoder=clip()))
    inputs = {"input_ids": torch.full((2, 6), 5), "image_features": torch.randn(2, 4, 16),
              "image_grid_thw": torch.tensor([[1, 4, 4]] * 2)}
    with pytest.raises(ValueError, match=r"\['image_grid_thw'\] came with the call.*would be dropped"):
        model(**inputs)


def test_a_qwen2_vl_grid_without_its_placeholders_is_refused_not_dropped():
    inputs = {"input_ids": torch.full((2, 6), 5), "image_features": torch.randn(2, 4, 16),
              "image_grid_thw": torch.tensor([[1, 4, 4]] * 2)}
    with pytest.raises(ValueError, match=r"\['image_grid_thw'\] came without the Qwen-VL processor's image "):
        injected()(**inputs)


def test_a_disabled_adapter_hands_the_vlm_its_own_image_inputs():
    batch = qwen2_vl_batch()
    with torch.no_grad():
        want = tiny_qwen2_vl()(**batch).logits
        model = injected()
        with model.disable_adapter():
            got = model(**batch).logits
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("make, fields", [
    (tiny_qwen2_vl, {"vision_encoder": "clip"}),
    (tiny_llava, {"vision_encoder": "clip"}),
], ids=["qwen2_vl+clip", "llava+clip"])
def test_image_placeholder_tokens_are_refused_whichever_encoder_reads_the_pixels(make, fields, text):
    """The VLM's placeholder token in the text means the VLM's processor built it, for the VLM's own image path,
    which MemVP does not run: the placeholders would be read as words. Refused also when a separate encoder gives
    the adapter its pixels."""
    fields = {name: clip() if value == "clip" else value for name, value in fields.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(make(), memvp_config(num_memory_slots=20, **fields))
    placeholder = model.get_base_model().config.image_token_id
    ids = text["input_ids"].clone()
    ids[:, 1] = placeholder
    with pytest.raises(ValueError, match=f"image placeholder token \\(id {placeholder}\\)"):
        model(input_ids=ids, image_features=torch.randn(2, 4, 16))


def test_a_separate_encoder_gives_such_a_vlm_pixels_without_a_warning(text):
    encoder = clip()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no word about the VLM's own tower: the pixels have a reader
        model = get_peft_model(tiny_qwen2_vl(), memvp_config(num_memory_slots=20, vision_encoder=encoder))
    randomize_memory(model)
    with torch.no_grad():
        from_pixels = model.eval()(**text, pixel_values=pixels).logits
        from_features = model(**text, image_features=manual_features(encoder, pixels)).logits
    torch.testing.assert_close(from_pixels, from_features)


def test_lora_of_the_adapter_stays_out_of_a_qwen2_vl_tower():
    """The tower of a Qwen2-VL runs frozen, without gradients, under MemVP: all-linear LoRA covers the language
    model only."""
    lora = LoraConfig(r=2, lora_alpha=4, target_modules="all-linear")
    inner = injected(lora_config=lora).get_base_model().model
    lora_modules = [name for name, m in inner.named_modules() if isinstance(m, LoraLayer)]
    assert lora_modules and all(name.startswith("language_model.") for name in lora_modules)
