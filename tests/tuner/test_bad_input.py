"""Bad visual input raises a ValueError naming expected vs received, and the model stays usable."""

import pytest
import torch
from conftest import memvp_config, tiny_llama
from peft import get_peft_model


@pytest.fixture(scope="module")
def pm():
    return get_peft_model(tiny_llama(), memvp_config(num_memory_slots=8)).eval()


IDS = torch.randint(3, 64, (2, 5))
GOOD = torch.randn(2, 4, 16)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image_features": torch.randn(2, 4, 15)}, r"visual_dim=16, got 15"),
        ({"image_features": torch.randn(3, 4, 16)}, r"batch \(3\) must equal the input batch \(2\)"),
        ({"image_features": torch.randn(2, 16)}, r"must be 3-D"),
        ({"image_features": torch.randint(0, 5, (2, 4, 16))}, r"floating point"),
        ({"image_features": GOOD.clone().index_fill_(1, torch.tensor([0]), float("nan"))}, r"NaN or inf"),
        ({"image_features": GOOD.clone().index_fill_(1, torch.tensor([0]), float("inf"))}, r"NaN or inf"),
        ({"image_features": torch.randn(2, 9, 16)}, r"9 visual tokens .*num_memory_slots=8"),
        ({"image_features": GOOD, "image_mask": torch.tensor([True, False, True])}, r"shape \(2,\)"),
        ({"image_features": GOOD, "image_mask": torch.tensor([[True, False]])}, r"shape \(2,\)"),
        ({"image_features": GOOD, "image_mask": torch.tensor([0.0, 1.0])}, r"bool"),
        ({"image_features": GOOD, "image_mask": torch.tensor([0, 2])}, r"0 and 1"),
        ({"image_mask": torch.tensor([True, False])}, r"without `image_features`"),
        ({"image_features": [[1.0]]}, r"torch.Tensor"),
    ],
)
def test_bad_visual_input_raises_value_error_and_model_stays_usable(pm, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pm(input_ids=IDS, **kwargs)
    assert pm.base_model._memvp_runtime.active() is None
    with torch.no_grad():
        pm(input_ids=IDS, image_features=GOOD)


def test_integer_image_mask_is_accepted(pm):
    with torch.no_grad():
        a = pm(input_ids=IDS, image_features=GOOD, image_mask=torch.tensor([1, 0])).logits
        b = pm(input_ids=IDS, image_features=GOOD, image_mask=torch.tensor([True, False])).logits
    torch.testing.assert_close(a, b)


def test_plain_ffn_half_wrapped_is_rejected():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    with pytest.raises(ValueError, match="must be targeted together"):
        get_peft_model(model, memvp_config(target_modules=["c_fc"]))


def test_activation_override_on_plain_ffn_is_rejected():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    with pytest.raises(ValueError, match="activation"):
        get_peft_model(model, memvp_config(activation="relu"))
