"""The adapted model computes exactly the MemVP formula of MEMVP_SPEC (checked against tests/reference_memvp.py).

All comparisons run in fp32, eval mode, memory_dropout=0, with randomised adapter weights (p_v starts at 0, which
would hide a broken value path).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import VISUAL_DIM, VOCAB, memvp_config, randomize_memory, tiny_llama
from peft import get_peft_model
from reference_memvp import adapter_state, reference_logits

TOL = dict(rtol=1e-5, atol=1e-6)


def adapt(base, **overrides):
    """A randomised, eval-mode MemVP PeftModel on a deep copy of `base` (the base itself stays unadapted)."""
    config = memvp_config(**overrides)
    peft_model = get_peft_model(copy.deepcopy(base), config)
    randomize_memory(peft_model)
    return peft_model.eval(), config


def make_inputs(batch_size=3, seq_len=7, tokens=5, seed=123):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch_size, seq_len), generator=generator)
    features = torch.randn(batch_size, tokens, VISUAL_DIM, generator=generator)
    return input_ids, torch.ones_like(input_ids), features


def logits(peft_model, input_ids, attention_mask, **visual):
    with torch.no_grad():
        return peft_model(input_ids=input_ids, attention_mask=attention_mask, **visual).logits


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


@pytest.fixture(scope="module")
def adapted(base):
    return adapt(base)


# ------------------------------------------------------------------------------------------------- faithful logits


def test_image_batch_logits_match_reference(base, adapted):
    peft_model, config = adapted
    ids, mask, feats = make_inputs()
    got = logits(peft_model, ids, mask, image_features=feats)
    want = reference_logits(base, adapter_state(peft_model), config, ids, mask, feats)
    torch.testing.assert_close(got, want, **TOL)


def test_mixed_batch_logits_match_reference(base, adapted):
    peft_model, config = adapted
    ids, mask, feats = make_inputs()
    image_mask = torch.tensor([True, False, True])
    got = logits(peft_model, ids, mask, image_features=feats, image_mask=image_mask)
    want = reference_logits(base, adapter_state(peft_model), config, ids, mask, feats, image_mask)
    torch.testing.assert_close(got, want, **TOL)


def test_text_only_batch_logits_match_reference(base, adapted):
    peft_model, config = adapted
    ids, mask, _ = make_inputs()
    got = logits(peft_model, ids, mask)
    want = reference_logits(base, adapter_state(peft_model), config, ids, mask)
    torch.testing.assert_close(got, want, **TOL)


def test_fewer_visual_tokens_than_slots_match_reference(base, adapted):
    peft_model, config = adapted
    ids, mask, feats = make_inputs(tokens=1)  # 1 token padded to 8 slots
    got = logits(peft_model, ids, mask, image_features=feats)
    want = reference_logits(base, adapter_state(peft_model), config, ids, mask, feats)
    torch.testing.assert_close(got, want, **TOL)


def test_visual_tokens_filling_every_slot_match_reference(base, adapted):
    peft_model, config = adapted
    ids, mask, feats = make_inputs(tokens=config.num_memory_slots)
    got = logits(peft_model, ids, mask, image_features=feats)
    want = reference_logits(base, adapter_state(peft_model), config, ids, mask, feats)
    torch.testing.assert_close(got, want, **TOL)


def test_non_default_scales_match_reference(base):
    peft_model, config = adapt(base, visual_scale=0.5, memory_scale=0.3)
    ids, mask, feats = make_inputs()
    got = logits(peft_model, ids, mask, image_features=feats)
    want = reference_logits(base, adapter_state(peft_model), config, ids, mask, feats)
    torch.testing.assert_close(got, want, **TOL)


def _perturb_state(state, name):
    state = dict(state)
    if name == "value_pos":
        state["value_pos"] = torch.zeros_like(state["value_pos"])
    elif name == "key_pos":
        state["key_pos"] = state["key_pos"] * 1.1
    elif name == "projector":
        state["projector.2.weight"] = state["projector.2.weight"] * 1.1
    return state


@pytest.mark.parametrize(
    "perturbation", ["memory_scale", "visual_scale", "value_pos", "key_pos", "projector", "no_images"]
)
def test_reference_comparison_detects_a_wrong_memory(base, adapted, perturbation):
    """The comparisons above are not vacuous: a reference with any piece of the formula changed disagrees."""
    peft_model, config = adapted
    ids, mask, feats = make_inputs()
    got = logits(peft_model, ids, mask, image_features=feats)
    state, wrong_config, ref_feats = adapter_state(peft_model), config, feats
    if perturbation == "memory_scale":
        wrong_config = memvp_config(memory_scale=config.memory_scale * 1.1)
    elif perturbation == "visual_scale":
        wrong_config = memvp_config(visual_scale=config.visual_scale * 1.1)
    elif perturbation == "no_images":
        ref_feats = None
    else:
        state = _perturb_state(state, perturbation)
    want = reference_logits(base, state, wrong_config, ids, mask, ref_feats)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(got, want, **TOL)


def test_text_only_rows_still_read_the_learned_memory(base, adapted):
    """ind_b = 0 rows see K = p_k, V = p_v (spec step 7), not the bare base model."""
    peft_model, _ = adapted
    ids, mask, _ = make_inputs()
    with torch.no_grad():
        plain = base(input_ids=ids, attention_mask=mask).logits
    assert (logits(peft_model, ids, mask) - plain).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------- per-row isolation


def test_text_only_row_of_mixed_batch_equals_that_row_alone_without_features(adapted):
    peft_model, _ = adapted
    ids, mask, feats = make_inputs()
    mixed = logits(peft_model, ids, mask, image_features=feats, image_mask=torch.tensor([True, False, True]))
    alone = logits(peft_model, ids[1:2], mask[1:2])
    torch.testing.assert_close(mixed[1:2], alone, rtol=1e-5, atol=1e-5)


def test_features_of_a_masked_row_do_not_affect_logits(adapted):
    peft_model, _ = adapted
    ids, mask, feats = make_inputs()
    image_mask = torch.tensor([True, False, True])
    changed = feats.clone()
    changed[1] = torch.randn(changed[1].shape, generator=torch.Generator().manual_seed(7)) * 10
    before = logits(peft_model, ids, mask, image_features=feats, image_mask=image_mask)
    after = logits(peft_model, ids, mask, image_features=changed, image_mask=image_mask)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_changing_one_image_changes_only_its_own_row(adapted):
    peft_model, _ = adapted
    ids, mask, feats = make_inputs()
    changed = feats.clone()
    changed[0] = torch.randn(changed[0].shape, generator=torch.Generator().manual_seed(7))
    before = logits(peft_model, ids, mask, image_features=feats)
    after = logits(peft_model, ids, mask, image_features=changed)
    assert (after[0] - before[0]).abs().max() > 1e-3
    torch.testing.assert_close(after[1:], before[1:], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------ memory computed once


@pytest.mark.parametrize("num_layers", [1, 4])
@pytest.mark.parametrize("with_images", [True, False], ids=["images", "text_only"])
def test_memory_is_computed_once_per_forward(num_layers, with_images):
    peft_model, _ = adapt(tiny_llama(num_hidden_layers=num_layers))
    calls = []
    peft_model.base_model.memvp_memory["default"].register_forward_hook(lambda *_: calls.append(1))
    ids, mask, feats = make_inputs()
    visual = {"image_features": feats} if with_images else {}
    logits(peft_model, ids, mask, **visual)
    assert len(calls) == 1
    logits(peft_model, ids, mask, **visual)
    assert len(calls) == 2


# ----------------------------------------------------------------------------------------------- initialisation


def test_value_position_embedding_is_zero_at_init(base):
    peft_model = get_peft_model(copy.deepcopy(base), memvp_config())
    value_pos = peft_model.base_model.memvp_memory["default"].value_pos
    assert value_pos.shape == (8, base.config.hidden_size)
    assert torch.count_nonzero(value_pos) == 0


def test_key_position_embedding_has_std_0_02_at_init(base):
    torch.manual_seed(0)
    peft_model = get_peft_model(copy.deepcopy(base), memvp_config(num_memory_slots=4096))
    key_pos = peft_model.base_model.memvp_memory["default"].key_pos.detach()
    assert key_pos.shape == (4096, base.config.hidden_size)
    assert key_pos.std().item() == pytest.approx(0.02, rel=0.02)
    assert abs(key_pos.mean().item()) < 1e-3


def test_projector_has_xavier_uniform_weights_and_zero_biases_at_init(base):
    torch.manual_seed(0)
    peft_model = get_peft_model(copy.deepcopy(base), memvp_config(visual_dim=256, projector_hidden_dim=128))
    projector = peft_model.base_model.memvp_memory["default"].projector
    for linear in (projector[0], projector[2]):
        fan_out, fan_in = linear.weight.shape
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        assert linear.weight.abs().max() <= bound
        assert linear.weight.std().item() == pytest.approx(bound / math.sqrt(3.0), rel=0.05)
        assert torch.count_nonzero(linear.bias) == 0


# -------------------------------------------------------------------------------------------------- trainability


def test_trainable_parameter_names_all_contain_memvp(base):
    peft_model = get_peft_model(copy.deepcopy(base), memvp_config())
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable
    assert all("memvp" in name for name in trainable), trainable


def test_base_model_parameters_are_frozen(base):
    peft_model = get_peft_model(copy.deepcopy(base), memvp_config())
    base_params = [(name, p) for name, p in peft_model.named_parameters() if "memvp" not in name]
    assert len(base_params) == len(list(base.parameters()))
    assert not any(p.requires_grad for _, p in base_params)


def test_trainable_parameter_count_is_projector_plus_two_position_tables(base):
    config = memvp_config()
    peft_model = get_peft_model(copy.deepcopy(base), config)
    d, h, dv, n = base.config.hidden_size, config.projector_hidden_dim, config.visual_dim, config.num_memory_slots
    expected = (dv * h + h) + (h * d + d) + 2 * n * d
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == expected
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert trainable == expected
