"""Whatever an adapter counts as trainable trains: on every supported base and config, every parameter that
`print_trainable_parameters` counts (`requires_grad=True`) gets a gradient from a batch with images and changes
under an optimiser. A trainable weight that never gets a gradient is counted, saved and reloaded, yet the adapter
silently learns nothing there -- as LoRA did in a VLM's vision tower, which MemVP runs frozen and without gradients.

On a VLM base the LoRA part of a MemVP adapter goes on the language model only (as in LLaVA's LoRA recipe);
targets and `modules_to_save` that reach only the vision tower or the VLM's projector are refused.
"""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
from conftest import VISUAL_DIM, memvp_config, tiny_llama
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from pristine import assert_untouched
from safetensors.torch import load_file
from test_architectures import ARCHITECTURES, build
from test_seq2seq import BUILDERS as SEQ2SEQ_BUILDERS

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vision"))  # tests/vision
from test_unread_vlm_tower import tiny_qwen2_vl  # noqa: E402
from test_vision import clip, siglip, tiny_llava  # noqa: E402

STEPS = 2  # LoRA's A (a vision adapter's fc1) first gets a gradient once B (fc2) has moved
IMAGE_TOKEN_ID = 63  # tiny_llava's placeholder token, which no MemVP batch carries


def lora(targets="all-linear", **fields) -> LoraConfig:
    return LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=targets, **fields)


def features(tokens: int = 5):
    return {"image_features": torch.randn(2, tokens, VISUAL_DIM, generator=torch.Generator().manual_seed(1))}


def pixels(size: int = 32):
    return {"pixel_values": torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))}


def with_encoder(encoder, **fields):
    """A config whose encoder turns 32x32 pixels into 16 patch features of width 16 (CLS dropped for CLIP)."""
    return memvp_config(**{"vision_encoder": encoder, "num_memory_slots": 16, **fields})


# case -> (base builder, config builder, visual inputs builder). Builders, so that every case starts from fresh
# modules: a module-level config would carry one case's injection state (target_modules, recorded encoder) into
# another.
CASES = {
    "llama": (tiny_llama, memvp_config, features),
    # LoRA on every linear: attention, and inside the FFNs MemVP wraps (GLU, Conv1D, 2-D OPT inputs, T5, BART)
    **{
        f"{arch}+lora": (lambda arch=arch: build(arch), lambda: memvp_config(lora_config=lora()), features)
        for arch in ARCHITECTURES
    },
    **{
        f"{name}+lora": (builder, lambda: memvp_config(task_type="SEQ_2_SEQ_LM", lora_config=lora()), features)
        for name, builder in SEQ2SEQ_BUILDERS.items()
    },
    "llama+modules_to_save": (tiny_llama, lambda: memvp_config(modules_to_save=["lm_head"]), features),
    "llama+lora+lora_modules_to_save": (
        tiny_llama, lambda: memvp_config(lora_config=lora(["q_proj", "v_proj"], modules_to_save=["lm_head"])),
        features,
    ),
    "llama+pooling": (tiny_llama, lambda: memvp_config(pool_kernel=2, num_memory_slots=4), lambda: features(16)),
    "llama+adem_read": (
        tiny_llama,
        lambda: memvp_config(memory_read="adem", drop_ratio=0.1, multiscale_tokens=[16, 4], num_memory_slots=20),
        lambda: features(16),
    ),
    "llama+clip": (tiny_llama, lambda: with_encoder(clip()), pixels),
    "llama+clip+vision_adapters": (tiny_llama, lambda: with_encoder(clip(), vision_adapter_dim=4), pixels),
    "llama+clip+vision_adapters+lora": (
        tiny_llama, lambda: with_encoder(clip(), vision_adapter_dim=4, lora_config=lora()), pixels,
    ),
    "llama+siglip+vision_adapters": (tiny_llama, lambda: with_encoder(siglip(), vision_adapter_dim=4), pixels),
    "llama+clip+tiles": (
        tiny_llama, lambda: memvp_config(vision_encoder=clip(), image_grid=[2, 2], num_memory_slots=80,
                                         vision_adapter_dim=4),
        lambda: pixels(64),
    ),
    "llama+clip+frames": (
        tiny_llama, lambda: with_encoder(clip(), num_frames=2, num_memory_slots=32, vision_adapter_dim=4),
        lambda: {"pixel_values": pixels()["pixel_values"].unsqueeze(1).repeat(1, 2, 1, 1, 1)},
    ),
    "llava": (tiny_llava, lambda: memvp_config(num_memory_slots=16), pixels),
    "llava+lora": (tiny_llava, lambda: memvp_config(num_memory_slots=16, lora_config=lora(["q_proj", "v_proj"])),
                   pixels),
    "llava+lora+all-linear": (tiny_llava, lambda: memvp_config(num_memory_slots=16, lora_config=lora()), pixels),
    # a Qwen2-VL base given image_features: LoRA on its language model only (its tower runs frozen, without gradients)
    "qwen2_vl+lora+all-linear": (tiny_qwen2_vl, lambda: memvp_config(lora_config=lora()), features),
    "llava+vision_adapters+lora": (
        tiny_llava, lambda: memvp_config(num_memory_slots=16, vision_adapter_dim=4, lora_config=lora(["q_proj"])),
        pixels,
    ),
}


def batch(visual_inputs) -> dict:
    ids = torch.randint(3, IMAGE_TOKEN_ID, (2, 6), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids, **visual_inputs()}


@pytest.mark.parametrize("case", list(CASES))
def test_every_parameter_counted_as_trainable_gets_a_gradient_and_trains(case):
    """The invariant, in the strongest form that holds for every adapter at initialisation:

    1. after one forward and backward, every parameter with `requires_grad=True` has a gradient (`grad is not
       None`): it is on the autograd path of the loss. A nonzero gradient cannot be asked of the first step, because
       some parameters start where their gradient is exactly zero by construction -- LoRA's A while B is zero, a
       vision adapter's `fc1` while its zero-initialised `fc2` is;
    2. after `STEPS` Adam steps every trainable tensor differs from its initial value: once B / `fc2` have moved,
       A / `fc1` get a gradient too. Adam (without weight decay, which would move every parameter whatever its
       gradient) moves an element by about the learning rate as soon as its gradient is nonzero once, so "changed"
       means "got a nonzero gradient", without a threshold on magnitudes.
    """
    make_base, make_config, visual_inputs = CASES[case]
    assert_every_trainable_parameter_trains(get_peft_model(make_base(), make_config()).train(), batch(visual_inputs))


# the cases whose gradients pass through a checkpointed vision tower (a VLM's own, which gradient_checkpointing_enable
# on the VLM checkpoints too) or through checkpointed decoder layers with LoRA inside
CHECKPOINTED_CASES = ["llama+clip+vision_adapters", "llava+vision_adapters+lora", "llava+lora"]


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("case", CHECKPOINTED_CASES)
def test_every_parameter_counted_as_trainable_trains_under_gradient_checkpointing(case, use_reentrant):
    """The same invariant with gradient checkpointing on the base (both of torch's kinds): the recomputation inside
    backward must put every trainable parameter back on the gradient path."""
    make_base, make_config, visual_inputs = CASES[case]
    model = get_peft_model(make_base(), make_config()).train()
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert_every_trainable_parameter_trains(model, batch(visual_inputs))


def assert_every_trainable_parameter_trains(model, inputs) -> None:
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == model.get_nb_trainable_parameters()[0]
    initial = {name: p.detach().clone() for name, p in trainable.items()}
    optimiser = torch.optim.Adam(trainable.values(), lr=1e-2)

    model(**inputs).loss.backward()
    no_gradient = sorted(name for name, p in trainable.items() if p.grad is None)
    assert not no_gradient, f"counted as trainable, but on no gradient path: {no_gradient}"
    optimiser.step()
    for _ in range(STEPS - 1):
        optimiser.zero_grad()
        model(**inputs).loss.backward()
        optimiser.step()
    unchanged = sorted(name for name, p in trainable.items() if torch.equal(p.detach(), initial[name]))
    assert not unchanged, f"counted as trainable, but unchanged after {STEPS} steps: {unchanged}"


def test_lora_in_a_memvp_adapter_stays_out_of_the_vision_tower(tmp_path):
    model = get_peft_model(tiny_llava(), memvp_config(num_memory_slots=16, lora_config=lora(["q_proj", "v_proj"])))
    inner = model.get_base_model().model
    lora_modules = sorted(name for name, m in inner.named_modules() if isinstance(m, LoraLayer))
    assert lora_modules == [f"language_model.layers.{i}.self_attn.{proj}"
                            for i in (0, 1) for proj in ("q_proj", "v_proj")]
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert not any("vision_tower" in key or "multi_modal_projector" in key for key in saved)


def test_all_linear_lora_on_a_vlm_covers_the_language_model_only():
    model = get_peft_model(tiny_llava(), memvp_config(num_memory_slots=16, lora_config=lora("all-linear")))
    inner = model.get_base_model().model
    lora_modules = [name for name, m in inner.named_modules() if isinstance(m, LoraLayer)]
    assert lora_modules and all(name.startswith("language_model.") for name in lora_modules)


@pytest.mark.parametrize("fields, message", [
    (dict(lora_config=lora(["fc1", "fc2"])), r"lora_config.target_modules=\['fc1', 'fc2'\] match only modules outside "
                                              r"the language model.*vision_adapter_dim"),
    (dict(lora_config=lora(["linear_1"])), r"match only modules outside the language model.*multi_modal_projector"),
    (dict(modules_to_save=["multi_modal_projector"]), r"modules_to_save=\['multi_modal_projector'\] names "
                                                      r"model.multi_modal_projector, outside the language model"),
    (dict(lora_config=lora(["q_proj"], modules_to_save=["vision_tower"])),
     r"lora_config.modules_to_save=\['vision_tower'\] names model.vision_tower, outside the language model"),
], ids=["lora_in_the_tower", "lora_in_the_projector", "modules_to_save", "lora_modules_to_save"])
def test_trainable_weights_only_outside_the_language_model_of_a_vlm_are_refused(fields, message):
    vlm = tiny_llava()
    pristine = copy.deepcopy(vlm)
    with pytest.raises(ValueError, match=message):
        get_peft_model(vlm, memvp_config(num_memory_slots=16, **fields))
    assert_untouched(vlm, pristine)


def test_lora_that_matches_nothing_in_a_vlm_is_refused_by_name():
    with pytest.raises(ValueError, match="no_such_linear"):
        get_peft_model(tiny_llava(), memvp_config(num_memory_slots=16, lora_config=lora(["no_such_linear"])))


@pytest.mark.parametrize("feature_layer, trained_blocks", [(-1, [0, 1]), (-2, [0]), (1, [0])])
def test_vision_adapters_of_blocks_past_the_feature_layer_are_not_trainable(feature_layer, trained_blocks):
    """Features of the penultimate block (the paper's -2) never pass through the last block: its adapter is frozen,
    and not counted as trainable."""
    model = get_peft_model(tiny_llama(), with_encoder(clip(), vision_adapter_dim=4, vision_feature_layer=feature_layer))
    adapters = model.base_model.memvp_memory["default"].vision_adapters
    trained = [i for i, adapter in enumerate(adapters) if all(p.requires_grad for p in adapter.parameters())]
    assert trained == trained_blocks
    assert all(not p.requires_grad for i, adapter in enumerate(adapters) if i not in trained_blocks
               for p in adapter.parameters())
