"""Tiles and frames through forward, generate and save/load: each tile or frame is a block of memory slots, told
apart by its own position slots; old adapter configs (without the new fields) load as plain MemVP."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import VOCAB, randomize_memory, tiny_llama
from peft import PeftModel, get_peft_model
from reference_memvp import adapter_state, reference_logits

from memvp_peft import MemVPConfig
from memvp_peft.demo_models import tiny_clip
from memvp_peft.vision.tiling import tile_pixel_values

NEW_FIELDS = ("image_grid", "num_frames", "pool_kernel", "pool_tokens", "multiscale_tokens", "memory_read",
              "drop_ratio")


def clip_model(**overrides):
    """Tiny Llama + tiny CLIP (32x32 pixels, 4x4 = 16 patches of width 32)."""
    settings = dict(visual_dim=32, num_memory_slots=90, projector_hidden_dim=8, memory_dropout=0.0,
                    vision_encoder=tiny_clip(), image_grid=[2, 2])
    settings.update(overrides)
    model = get_peft_model(tiny_llama(), MemVPConfig(**settings))
    randomize_memory(model)
    return model.eval()


def ids(batch=2, seed=0):
    return torch.randint(3, VOCAB, (batch, 6), generator=torch.Generator().manual_seed(seed))


def pixels(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def logits(model, **visual):
    with torch.no_grad():
        return model(input_ids=ids(), **visual).logits


def test_a_high_resolution_image_reads_like_its_overview_and_tiles():
    model = clip_model()
    image = pixels(2, 3, 64, 64)
    tiles = tile_pixel_values(image, [2, 2], 32)  # (2, 5, 3, 32, 32)
    encoded = model.base_model.vision_encoder.features(tiles.flatten(0, 1)).reshape(2, 5, 16, 32)
    got = logits(model, pixel_values=image)
    torch.testing.assert_close(got, logits(model, pixel_values=tiles), rtol=0, atol=0)
    torch.testing.assert_close(got, logits(model, image_features=encoded), rtol=1e-6, atol=1e-6)


def test_tile_blocks_are_consecutive_slot_blocks_of_the_reference_memory():
    model = clip_model(vision_encoder=None, visual_dim=16)
    features = pixels(2, 5, 16, 16)
    config = model.peft_config["default"]
    want = reference_logits(tiny_llama(), adapter_state(model), config, ids(), None, features.reshape(2, 80, 16))
    torch.testing.assert_close(logits(model, image_features=features), want, rtol=1e-5, atol=1e-6)


def test_position_slots_tell_the_tiles_apart():
    model = clip_model(vision_encoder=None, visual_dim=16)
    features = pixels(1, 5, 16, 16).expand(2, -1, -1, -1).clone()
    features[1, [1, 2]] = features[1, [2, 1]]  # the same tiles, the top two swapped
    out = logits(model, image_features=features)
    assert not torch.allclose(out[0], out[1], atol=1e-4)


def test_a_masked_high_resolution_image_is_not_read():
    model = clip_model(num_memory_slots=180)
    first, second = pixels(2, 2, 3, 64, 64, seed=2), pixels(2, 2, 3, 64, 64, seed=3)
    second[:, 0] = first[:, 0]  # image 0 equal, image 1 differs but is masked out
    mask = torch.tensor([[True, False], [True, False]])
    torch.testing.assert_close(logits(model, pixel_values=first, image_mask=mask),
                               logits(model, pixel_values=second, image_mask=mask), rtol=0, atol=0)


def test_generate_reads_the_tiled_image():
    model = clip_model()
    image = pixels(2, 3, 64, 64)
    with torch.no_grad():
        tiled = model.generate(input_ids=ids(), pixel_values=image, max_new_tokens=3, do_sample=False, pad_token_id=0)
        explicit = model.generate(input_ids=ids(), pixel_values=tile_pixel_values(image, [2, 2], 32),
                                  max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(tiled, explicit)


def test_an_untiled_encoder_sized_image_is_refused_with_the_layout():
    with pytest.raises(ValueError, match="makes every image 5 blocks"):
        logits(clip_model(), pixel_values=pixels(2, 3, 32, 32))


def test_more_frames_than_num_frames_are_refused():
    model = clip_model(image_grid=None, num_frames=4)
    with pytest.raises(ValueError, match="num_frames=4 frames per sample but the visual input holds 6"):
        logits(model, pixel_values=pixels(2, 6, 3, 32, 32))


def test_fewer_frames_fill_the_first_blocks():
    model = clip_model(image_grid=None, num_frames=4, visual_dim=16, vision_encoder=None, num_memory_slots=64)
    features = pixels(2, 3, 16, 16)
    want = reference_logits(tiny_llama(), adapter_state(model), model.peft_config["default"], ids(), None,
                            features.reshape(2, 48, 16))
    torch.testing.assert_close(logits(model, image_features=features), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fields", [
    dict(image_grid=[2, 2], pool_kernel=2, num_memory_slots=24),
    dict(image_grid=None, num_frames=3, num_memory_slots=20, multiscale_tokens=[4, 1], memory_read="adem", drop_ratio=0.1),
])
def test_long_context_options_survive_save_and_load(tmp_path, fields):
    model = clip_model(vision_encoder=None, visual_dim=16, **fields)
    features = pixels(2, 5 if fields["image_grid"] else 3, 4 if "multiscale_tokens" in fields else 16, 16)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    for name, value in fields.items():
        assert getattr(loaded.peft_config["default"], name) == value
    torch.testing.assert_close(logits(loaded, image_features=features), logits(model, image_features=features),
                               rtol=0, atol=0)


def test_an_adapter_config_from_before_these_options_loads_as_plain_memvp(tmp_path):
    model = clip_model(vision_encoder=None, visual_dim=16, image_grid=None)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in saved.items() if k not in NEW_FIELDS}))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    config = loaded.peft_config["default"]
    assert (config.image_grid, config.num_frames, config.pool_kernel, config.memory_read, config.drop_ratio) == (
        None, None, 1, "memvp", 0.0)
    features = pixels(2, 16, 16)
    torch.testing.assert_close(logits(loaded, image_features=features), logits(model, image_features=features),
                               rtol=0, atol=0)
