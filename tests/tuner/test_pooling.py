"""Memory compression before the projector: k x k average pooling of each image's patch grid, or pooling to a
target count, checked against tests/reference_adem.py (explicit block means, no package code)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import VISUAL_DIM, VOCAB, randomize_memory, tiny_llama
from peft import get_peft_model
from reference_adem import reference_form_logits
from reference_memvp import adapter_state

from memvp_peft import MemVPConfig
from memvp_peft.tuner.visual_inputs import compress_grid

TOL = dict(rtol=1e-5, atol=1e-6)


def config(**overrides):
    settings = dict(visual_dim=VISUAL_DIM, num_memory_slots=10, projector_hidden_dim=8, memory_dropout=0.0)
    settings.update(overrides)
    return MemVPConfig(**settings)


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


def adapted(base, cfg):
    model = get_peft_model(copy.deepcopy(base), cfg)
    randomize_memory(model)
    return model.eval()


def features(*shape, seed=11):
    return torch.randn(*shape, VISUAL_DIM, generator=torch.Generator().manual_seed(seed))


def test_pool_kernel_2_averages_each_2x2_block_row_major():
    grid = torch.arange(16.0).reshape(1, 16, 1).expand(1, 16, VISUAL_DIM)
    pooled = compress_grid(grid, config(pool_kernel=2))
    assert pooled[0, :, 0].tolist() == [2.5, 4.5, 10.5, 12.5]  # means of {0,1,4,5}, {2,3,6,7}, ...


def test_pool_kernel_logits_match_reference(base):
    cfg = config(pool_kernel=2)
    model = adapted(base, cfg)
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    feats = features(2, 16)
    with torch.no_grad():
        got = model(input_ids=ids, image_features=feats).logits
    torch.testing.assert_close(got, reference_form_logits(base, adapter_state(model), cfg, ids, feats), **TOL)


def test_each_image_is_pooled_on_its_own(base):
    cfg = config(pool_kernel=2, num_memory_slots=12)
    model = adapted(base, cfg)
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    feats = features(2, 3, 16)  # 3 images of a 4x4 grid -> 3 blocks of 4 slots
    with torch.no_grad():
        got = model(input_ids=ids, image_features=feats).logits
    torch.testing.assert_close(got, reference_form_logits(base, adapter_state(model), cfg, ids, feats), **TOL)


def test_pool_tokens_pools_to_the_target_count(base):
    cfg = config(pool_tokens=4, num_memory_slots=6)
    assert cfg.memory_tokens(64) == 4
    model = adapted(base, cfg)
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    feats = features(2, 64)  # an 8x8 grid -> 2x2
    with torch.no_grad():
        got = model(input_ids=ids, image_features=feats).logits
    torch.testing.assert_close(got, reference_form_logits(base, adapter_state(model), cfg, ids, feats), **TOL)


def test_pooled_features_need_only_the_compressed_slots(base):
    model = adapted(base, config(pool_kernel=2, num_memory_slots=4))  # 16 tokens -> 4 slots: fits exactly
    model(input_ids=torch.randint(3, VOCAB, (1, 5)), image_features=features(1, 16))


def test_pooling_a_grid_that_is_not_square_is_refused(base):
    model = adapted(base, config(pool_kernel=2))
    with pytest.raises(ValueError, match="15 visual tokens, which is no g x g grid"):
        model(input_ids=torch.randint(3, VOCAB, (1, 5)), image_features=features(1, 15))


def test_pool_kernel_that_does_not_divide_the_grid_is_refused(base):
    model = adapted(base, config(pool_kernel=3))
    with pytest.raises(ValueError, match="multiple of 3; an image's 16 tokens form a 4x4 grid"):
        model(input_ids=torch.randint(3, VOCAB, (1, 5)), image_features=features(1, 16))


def test_compressed_tokens_beyond_the_memory_are_refused_naming_the_compression(base):
    model = adapted(base, config(pool_kernel=2, num_memory_slots=6))
    with pytest.raises(ValueError, match=r"2 image\(s\) x 16 tokens become 2 x 4 = 8 slots after pool_kernel=2"):
        model(input_ids=torch.randint(3, VOCAB, (1, 5)), image_features=features(1, 2, 16))


@pytest.mark.parametrize("fields, tokens, images, expected", [
    (dict(), 256, 1, 256),
    (dict(pool_kernel=2), 256, 1, 64),
    (dict(pool_tokens=144), 576, 1, 144),
    (dict(multiscale_tokens=[256, 64]), 256, 1, 320),
    (dict(image_grid=[2, 2]), 576, 1, 2880),
    (dict(image_grid=[2, 2], pool_kernel=2), 576, 1, 720),
    (dict(num_frames=16), 256, 16, 4096),
])
def test_memory_tokens_is_the_documented_memory_size(fields, tokens, images, expected):
    assert MemVPConfig(**fields).memory_tokens(tokens, images) == expected
