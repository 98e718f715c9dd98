"""`MemVPConfig.memory_activation`: the paper's activated read stays the default, bit for bit, and the identity read
(`s * (x K^T) V`, no activation) computes the formula of the independent reference (tests/reference_memvp.py), is
refused where it cannot be read, and survives save / load."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import VOCAB, memvp_config, randomize_memory, tiny_llama
from peft import PeftModel, get_peft_model
from reference_memvp import adapter_state, reference_logits
from transformers import GPT2Config, GPT2LMHeadModel

from memvp_peft import MemVPConfig
from memvp_peft.tuner.layer import IdentityRead, MemVPRead, resolve_read

TOL = dict(rtol=1e-5, atol=1e-6)


def adapted(base, **overrides):
    """A randomised, eval-mode MemVP model on a deep copy of `base` (the base itself stays unadapted)."""
    config = memvp_config(**overrides)
    model = get_peft_model(copy.deepcopy(base), config)
    randomize_memory(model)
    return model.eval(), config


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_default_is_the_ffn_activation_read():
    config = memvp_config()
    assert config.memory_activation == "ffn"
    assert type(resolve_read(config)) is MemVPRead
    assert type(resolve_read(memvp_config(memory_activation="identity"))) is IdentityRead


def test_default_logits_are_bit_identical_to_the_explicit_ffn_read(batch):
    base = tiny_llama()
    default, _ = adapted(base)
    explicit, _ = adapted(base, memory_activation="ffn")
    assert torch.equal(logits(default, batch), logits(explicit, batch))


def test_default_matches_the_reference_with_the_ffn_activation(batch):
    base = tiny_llama()
    model, config = adapted(base)
    want = reference_logits(base, adapter_state(model), config, batch["input_ids"], batch["attention_mask"],
                            batch["image_features"])
    torch.testing.assert_close(logits(model, batch), want, **TOL)


def test_identity_read_matches_the_reference(batch):
    base = tiny_llama()
    model, config = adapted(base, memory_activation="identity")
    state = adapter_state(model)
    want = reference_logits(base, state, config, batch["input_ids"], batch["attention_mask"], batch["image_features"])
    torch.testing.assert_close(logits(model, batch), want, **TOL)
    text_only = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    torch.testing.assert_close(logits(model, text_only),
                               reference_logits(base, state, config, batch["input_ids"], batch["attention_mask"]),
                               **TOL)


def test_identity_read_differs_from_the_activated_read(batch):
    base = tiny_llama()
    activated, _ = adapted(base)
    linear, _ = adapted(base, memory_activation="identity")
    assert not torch.allclose(logits(activated, batch), logits(linear, batch), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("value", ["relu", "Identity", None, 1])
def test_unknown_memory_activation_is_refused(value):
    with pytest.raises(ValueError, match="memory_activation must be one of"):
        memvp_config(memory_activation=value)


@pytest.mark.parametrize("other", [{"memory_read": "adem"}, {"activation": "relu"}])
def test_identity_with_a_read_or_activation_it_would_ignore_is_refused(other):
    with pytest.raises(ValueError, match="memory_activation='identity'"):
        memvp_config(memory_activation="identity", **other)


def test_identity_on_a_plain_ffn_is_refused_and_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32))
    before = {name: type(module) for name, module in gpt2.named_modules()}
    with pytest.raises(ValueError, match="needs the whole FFN wrapped"):
        get_peft_model(gpt2, memvp_config(memory_activation="identity"))
    assert {name: type(module) for name, module in gpt2.named_modules()} == before


def test_identity_survives_save_and_load(tmp_path, batch):
    model, _ = adapted(tiny_llama(), memory_activation="identity")
    expected = logits(model, batch)
    model.save_pretrained(tmp_path / "adapter")
    stored = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert stored["memory_activation"] == "identity"
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter").eval()
    assert loaded.peft_config["default"].memory_activation == "identity"
    torch.testing.assert_close(logits(loaded, batch), expected, rtol=0, atol=0)


def test_a_config_saved_without_the_field_loads_as_the_ffn_read(tmp_path):
    memvp_config().save_pretrained(str(tmp_path))
    path = tmp_path / "adapter_config.json"
    stored = json.loads(path.read_text())
    del stored["memory_activation"]
    path.write_text(json.dumps(stored))
    assert MemVPConfig.from_pretrained(str(tmp_path)).memory_activation == "ffn"


def test_memory_activation_cannot_change_after_injection():
    model = get_peft_model(tiny_llama(), memvp_config())
    with pytest.raises(ValueError, match="cannot change after the adapter was injected"):
        model.peft_config["default"].memory_activation = "identity"
