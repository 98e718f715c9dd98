"""`generate()` with visual memory: computed once, kept across steps, expanded with the batch."""

import pytest
import torch
from conftest import memvp_config, randomize_memory, tiny_llama
from peft import get_peft_model


@pytest.fixture
def pm():
    model = get_peft_model(tiny_llama(), memvp_config(memory_scale=1.0))
    randomize_memory(model, scale=1.0)
    return model.eval()


@pytest.fixture
def inputs():
    torch.manual_seed(7)
    ids = torch.randint(3, 64, (3, 6))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "image_features": torch.randn(3, 4, 16)}


def _greedy_loop(pm, inputs, steps):
    ids = inputs["input_ids"]
    with torch.no_grad():
        for _ in range(steps):
            logits = pm(input_ids=ids, attention_mask=torch.ones_like(ids), image_features=inputs["image_features"],
                        image_mask=inputs.get("image_mask")).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def _generate(pm, inputs, **kwargs):
    kwargs = {"max_new_tokens": 8, "do_sample": False, "min_new_tokens": 8, "pad_token_id": 0, **kwargs}
    with torch.no_grad():
        return pm.generate(**inputs, **kwargs)


def test_greedy_with_cache_equals_without_cache_equals_manual_loop(pm, inputs):
    cached = _generate(pm, inputs, use_cache=True)
    uncached = _generate(pm, inputs, use_cache=False)
    manual = _greedy_loop(pm, inputs, 8)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, manual)


def test_image_changes_the_generation(pm, inputs):
    other = dict(inputs, image_features=torch.randn(3, 4, 16) * 3)
    assert not torch.equal(_generate(pm, inputs), _generate(pm, other))


def test_memory_is_computed_once_per_generate_call(pm, inputs):
    calls = []
    handle = pm.base_model.memvp_memory["default"].register_forward_hook(lambda *a: calls.append(1))
    _generate(pm, inputs, max_new_tokens=6, min_new_tokens=6)
    handle.remove()
    assert len(calls) == 1


def test_mixed_batch_rows_match_individual_generations(pm, inputs):
    mask = torch.tensor([True, False, True])
    batched = _generate(pm, dict(inputs, image_mask=mask))
    for row in range(3):
        single = {k: v[row : row + 1] for k, v in inputs.items()}
        if not mask[row]:
            single.pop("image_features")
        assert torch.equal(batched[row : row + 1], _generate(pm, single)), row


def test_text_only_generate_uses_learned_memory(pm, inputs):
    text = {k: v for k, v in inputs.items() if k != "image_features"}
    out = _generate(pm, text)
    with pm.disable_adapter():
        base = _generate(pm, text)
    assert out.shape == base.shape
    assert not torch.equal(out, base)  # p_k/p_v are a real, learned memory


def test_beam_search_follows_each_samples_memory(pm, inputs):
    batched = _generate(pm, inputs, num_beams=3, num_return_sequences=2)
    assert batched.shape[0] == 6
    for row in range(3):
        single = {k: v[row : row + 1] for k, v in inputs.items()}
        expected = _generate(pm, single, num_beams=3, num_return_sequences=2)
        assert torch.equal(batched[2 * row : 2 * row + 2], expected), row


def test_sampling_with_num_return_sequences_expands_memory(pm, inputs):
    # top_k=1 sampling is deterministic: every returned sequence must equal that sample's greedy answer
    out = _generate(pm, inputs, do_sample=True, top_k=1, num_return_sequences=2)
    greedy = _generate(pm, inputs)
    assert torch.equal(out, greedy.repeat_interleave(2, dim=0))


def test_generate_rejects_bad_features_and_stays_usable(pm, inputs):
    with pytest.raises(ValueError, match="batch"):
        _generate(pm, dict(inputs, image_features=torch.randn(2, 4, 16)))
    assert pm.base_model._memvp_runtime.active() is None
    _generate(pm, inputs)
