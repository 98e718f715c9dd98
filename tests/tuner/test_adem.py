"""ADEM-VL's memory form as a MemVPConfig option: multiscale slots, the silu(x) silu(K)^T read, the score drop.

Logits are compared with tests/reference_adem.py (written from the paper and the authors' sampler/adapter, sharing no
code with the package), in fp32 and eval mode with randomised adapter weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import VISUAL_DIM, VOCAB, randomize_memory, tiny_llama
from peft import get_peft_model
from reference_adem import adem_drop, reference_form_logits, reference_gpt2_drop_logits
from reference_memvp import adapter_state
from transformers import GPT2Config, GPT2LMHeadModel

from memvp_peft import MemVPConfig
from memvp_peft.tuner.read_forms import drop_lowest_scores

TOL = dict(rtol=1e-5, atol=1e-6)


def adem_config(**overrides):
    """ADEM-VL's memory form on `image_features` (the CLS token and the CLIP adapters need an encoder)."""
    settings = dict(visual_dim=VISUAL_DIM, multiscale_tokens=[16, 4], num_memory_slots=24, projector_hidden_dim=8,
                    cls_token=False, vision_adapter_dim=0)
    settings.update(overrides)
    return MemVPConfig.adem_vl(**settings)


def adapted(base, config):
    model = get_peft_model(copy.deepcopy(base), config)
    randomize_memory(model)
    return model.eval()


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


def inputs(seed=5, batch=3, tokens=16):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(3, VOCAB, (batch, 7), generator=generator),
            torch.randn(batch, tokens, VISUAL_DIM, generator=generator))


def test_adem_vl_preset_is_the_authors_release():
    config = MemVPConfig.adem_vl()
    assert (config.multiscale_tokens, config.num_memory_slots, config.memory_read, config.drop_ratio) == (
        [256, 64], 320, "adem", 0.1)
    assert (config.memory_dropout, config.memory_scale, config.visual_scale) == (0.0, 0.1, 0.01)
    assert config.memory_tokens(256) == 320


def test_drop_zeroes_exactly_the_lowest_fraction_of_each_row():
    scores = torch.randn(2, 3, 20)
    dropped = drop_lowest_scores(scores, 0.1)
    assert torch.equal(dropped, adem_drop(scores, 0.1))
    assert ((dropped == 0).sum(-1) == 2).all()  # int(0.1 * 20) per token
    kept = dropped != 0
    assert (scores[kept].reshape(2, 3, 18).min(-1).values >= scores.sort(-1).values[..., 2]).all()


def test_drop_ratio_below_one_slot_drops_nothing():
    scores = torch.randn(4, 9)
    assert torch.equal(drop_lowest_scores(scores, 0.1), scores)


@pytest.mark.parametrize("config, seed", [
    pytest.param(adem_config(), 5, id="adem-read-with-drop"),
    pytest.param(adem_config(drop_ratio=0.0), 9, id="adem-read-without-drop"),
    pytest.param(MemVPConfig(visual_dim=VISUAL_DIM, num_memory_slots=20, projector_hidden_dim=8, memory_dropout=0.0,
                             drop_ratio=0.25), 3, id="memvp-read-with-drop"),
])
def test_logits_match_reference(base, config, seed):
    """The ADEM-VL read with and without the score drop, and the drop on MemVP's own read: each as the reference."""
    model = adapted(base, config)
    ids, features = inputs(seed=seed)
    with torch.no_grad():
        got = model(input_ids=ids, image_features=features).logits
    torch.testing.assert_close(got, reference_form_logits(base, adapter_state(model), config, ids, features), **TOL)


def test_adem_text_only_rows_read_silu_of_the_position_memory(base):
    config = adem_config()
    model = adapted(base, config)
    ids, features = inputs()
    mask = torch.tensor([True, False, True])
    with torch.no_grad():
        got = model(input_ids=ids, image_features=features, image_mask=mask).logits
        text_only = model(input_ids=ids).logits
    state = adapter_state(model)
    torch.testing.assert_close(got, reference_form_logits(base, state, config, ids, features, mask), **TOL)
    torch.testing.assert_close(text_only, reference_form_logits(base, state, config, ids), **TOL)


def test_drop_on_a_plain_ffn_matches_reference():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32)).eval()
    config = MemVPConfig(visual_dim=VISUAL_DIM, num_memory_slots=20, projector_hidden_dim=8, memory_dropout=0.0,
                         drop_ratio=0.2)
    model = adapted(gpt2, config)
    ids, features = inputs(seed=4)
    with torch.no_grad():
        got = model(input_ids=ids, image_features=features).logits
    torch.testing.assert_close(got, reference_gpt2_drop_logits(gpt2, adapter_state(model), config, ids, features),
                               **TOL)


def test_adem_read_on_a_plain_ffn_is_refused_and_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32))
    before = {name: type(module) for name, module in gpt2.named_modules()}
    with pytest.raises(ValueError, match="needs the whole FFN wrapped"):
        get_peft_model(gpt2, adem_config())
    assert {name: type(module) for name, module in gpt2.named_modules()} == before


def test_adem_generate_answers_like_greedy_forward(base):
    model = adapted(base, adem_config())
    ids, features = inputs(seed=7, batch=2)
    with torch.no_grad():
        out = model.generate(input_ids=ids, image_features=features, max_new_tokens=3, do_sample=False,
                             pad_token_id=0)
        running = ids
        for _ in range(3):
            logits = model(input_ids=running, image_features=features).logits
            running = torch.cat([running, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, running)


def test_adem_trains_the_projector_and_position_memory(base):
    model = get_peft_model(copy.deepcopy(base), adem_config(drop_ratio=0.1))
    ids, features = inputs()
    model(input_ids=ids, labels=ids, image_features=features).loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
