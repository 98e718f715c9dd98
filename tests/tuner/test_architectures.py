"""Automatic FFN targeting on every supported architecture, and faithful logits on each (vs reference_memvp)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T
from conftest import VISUAL_DIM, VOCAB, randomize_memory, tiny_llama
from conftest import memvp_config as memvp
from peft import get_peft_model
from reference_memvp import adapter_state, reference_logits
from torch import nn

from memvp_peft import MemVPConfig, MemVPLayer
from memvp_peft.demo_models import SPECIAL_TOKEN_IDS

TOL = dict(rtol=1e-5, atol=1e-6)
TOKEN_IDS = SPECIAL_TOKEN_IDS
DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    **TOKEN_IDS,
)

# name -> (config class, model class, config kwargs)
ARCHITECTURES = {
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, DECODER),
    "mistral": (T.MistralConfig, T.MistralForCausalLM, DECODER),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, DECODER),
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, DECODER),
    "gemma": (T.GemmaConfig, T.GemmaForCausalLM, DECODER),
    "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM, DECODER),
    "gemma3_text": (T.Gemma3TextConfig, T.Gemma3ForCausalLM, DECODER),
    "phi3": (T.Phi3Config, T.Phi3ForCausalLM, DECODER),
    "gpt2": (
        T.GPT2Config,
        T.GPT2LMHeadModel,
        dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=64, **TOKEN_IDS),
    ),
    "opt": (
        T.OPTConfig,
        T.OPTForCausalLM,
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            word_embed_proj_dim=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            **TOKEN_IDS,
        ),
    ),
}

# name -> wrapped module names (relative to the base model) of decoder layer i
EXPECTED_TARGETS = {
    **{name: lambda i: [f"model.layers.{i}.mlp"] for name in ARCHITECTURES},
    "gpt2": lambda i: [f"transformer.h.{i}.mlp.c_fc", f"transformer.h.{i}.mlp.c_proj"],
    "opt": lambda i: [f"model.decoder.layers.{i}.fc1", f"model.decoder.layers.{i}.fc2"],
}

ARCH_PARAMS = list(ARCHITECTURES)
# Llama's image / mixed / text-only logits are compared with the reference in test_faithful_math.py (more cases,
# and a check that the comparison catches a wrong memory); here only the other architectures.
REFERENCE_ARCH_PARAMS = [arch for arch in ARCH_PARAMS if arch != "llama"]


def build(name: str, seed: int = 0) -> nn.Module:
    config_cls, model_cls, kwargs = ARCHITECTURES[name]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).eval()
    assert model.config.model_type == name
    return model


def adapt(base: nn.Module, config: MemVPConfig):
    peft_model = get_peft_model(copy.deepcopy(base), config)
    randomize_memory(peft_model)
    return peft_model.eval()


def wrapped_names(peft_model) -> list[str]:
    return sorted(n for n, m in peft_model.base_model.model.named_modules() if isinstance(m, MemVPLayer))


def inputs(seed: int = 5):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (3, 6), generator=generator)
    features = torch.randn(3, 4, VISUAL_DIM, generator=generator)
    return input_ids, torch.ones_like(input_ids), features


def compare(peft_model, base, config, image_features=None, image_mask=None, layers=None):
    ids, mask, _ = inputs()
    with torch.no_grad():
        got = peft_model(input_ids=ids, attention_mask=mask, image_features=image_features, image_mask=image_mask)
    want = reference_logits(
        base, adapter_state(peft_model), config, ids, mask, image_features, image_mask, layers=layers
    )
    torch.testing.assert_close(got.logits, want, **TOL)


# ------------------------------------------------------------------------------------------ supported architectures


@pytest.mark.parametrize("arch", ARCH_PARAMS)
def test_auto_targeting_wraps_every_layer_ffn(arch):
    peft_model = get_peft_model(build(arch), memvp())
    expected = sorted(n for i in range(2) for n in EXPECTED_TARGETS[arch](i))
    assert wrapped_names(peft_model) == expected


@pytest.mark.parametrize("arch", REFERENCE_ARCH_PARAMS)
def test_image_batch_logits_match_reference(arch):
    base = build(arch)
    config = memvp()
    compare(adapt(base, config), base, config, image_features=inputs()[2])


@pytest.mark.parametrize("arch", REFERENCE_ARCH_PARAMS)
def test_mixed_batch_logits_match_reference(arch):
    base = build(arch)
    config = memvp()
    compare(adapt(base, config), base, config, image_features=inputs()[2], image_mask=torch.tensor([1, 0, 1]))


@pytest.mark.parametrize("arch", REFERENCE_ARCH_PARAMS)
def test_text_only_logits_match_reference(arch):
    base = build(arch)
    config = memvp()
    compare(adapt(base, config), base, config)


# ----------------------------------------------------------------------------------------- unsupported architectures


def _assert_helpful_unsupported_error(excinfo):
    message = str(excinfo.value)
    assert "target_modules" in message
    for arch in ("llama", "gpt2", "opt", "phi3"):
        assert arch in message


def test_mixture_of_experts_model_is_rejected_with_helpful_error():
    torch.manual_seed(0)
    config = T.MixtralConfig(
        **{k: v for k, v in DECODER.items() if k != "head_dim"}, num_local_experts=2, num_experts_per_tok=1
    )
    model = T.MixtralForCausalLM(config)
    with pytest.raises(ValueError) as excinfo:
        get_peft_model(model, memvp())
    _assert_helpful_unsupported_error(excinfo)


def test_model_without_layer_stack_is_rejected_with_helpful_error():
    model = nn.Sequential(nn.Linear(32, 64), nn.SiLU(), nn.Linear(64, 32))
    with pytest.raises(ValueError) as excinfo:
        get_peft_model(model, memvp())
    _assert_helpful_unsupported_error(excinfo)


# ------------------------------------------------------------------------------------------------ manual targeting


def test_manual_target_modules_mlp_on_llama_wraps_every_mlp():
    peft_model = get_peft_model(tiny_llama(), memvp(target_modules=["mlp"]))
    assert wrapped_names(peft_model) == ["model.layers.0.mlp", "model.layers.1.mlp"]


def test_manual_target_modules_mlp_on_llama_matches_reference():
    base = tiny_llama()
    config = memvp(target_modules=["mlp"])
    compare(adapt(base, config), base, config, image_features=inputs()[2])


def test_layers_to_transform_wraps_only_that_layer():
    peft_model = get_peft_model(tiny_llama(), memvp(layers_to_transform=[1]))
    assert wrapped_names(peft_model) == ["model.layers.1.mlp"]


def test_layers_to_transform_logits_match_reference_restricted_to_that_layer():
    base = tiny_llama()
    config = memvp(layers_to_transform=[1])
    peft_model = adapt(base, config)
    compare(peft_model, base, config, image_features=inputs()[2], layers=[1])
    with pytest.raises(AssertionError):  # and not the all-layer formula
        compare(peft_model, base, config, image_features=inputs()[2], layers=[0, 1])


def test_manual_target_modules_with_layers_to_transform_wraps_only_that_layer():
    peft_model = get_peft_model(tiny_llama(), memvp(target_modules=["mlp"], layers_to_transform=[1]))
    assert wrapped_names(peft_model) == ["model.layers.1.mlp"]


def test_manual_target_modules_mlp_on_gpt2_matches_reference():
    """Wrapping GPT-2's whole `mlp` computes the same memory read-out as appending K/V to c_fc/c_proj."""
    base = build("gpt2")
    config = memvp(target_modules=["mlp"])
    peft_model = adapt(base, config)
    assert wrapped_names(peft_model) == ["transformer.h.0.mlp", "transformer.h.1.mlp"]
    compare(peft_model, base, config, image_features=inputs()[2])


def test_layers_to_transform_on_opt_matches_reference_restricted_to_that_layer():
    base = build("opt")
    config = memvp(layers_to_transform=[1])
    peft_model = adapt(base, config)
    assert wrapped_names(peft_model) == ["model.decoder.layers.1.fc1", "model.decoder.layers.1.fc2"]
    compare(peft_model, base, config, image_features=inputs()[2], layers=[1])


def test_opt_single_sample_image_batch_matches_reference():
    """OPT flattens tokens to (B*T, d) before fc1; B=1 must not be mistaken for a batch of T samples."""
    base = build("opt")
    config = memvp()
    peft_model = adapt(base, config)
    ids, mask, feats = inputs()
    with torch.no_grad():
        got = peft_model(input_ids=ids[:1], attention_mask=mask[:1], image_features=feats[:1]).logits
    want = reference_logits(base, adapter_state(peft_model), config, ids[:1], mask[:1], feats[:1])
    torch.testing.assert_close(got, want, **TOL)


def test_layers_to_transform_on_gpt2_wraps_only_that_layers_linears():
    peft_model = get_peft_model(build("gpt2"), memvp(layers_to_transform=[0]))
    assert wrapped_names(peft_model) == ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]


# ---------------------------------------------------------------------------------------------- activation override


def test_activation_override_relu_matches_reference_with_relu():
    base = tiny_llama()
    config = memvp(activation="relu")
    peft_model = adapt(base, config)
    compare(peft_model, base, config, image_features=inputs()[2])
    silu_config = memvp(activation="silu")
    with pytest.raises(AssertionError):  # relu really replaced Llama's own SiLU
        compare(peft_model, base, silu_config, image_features=inputs()[2])


def test_activation_override_is_rejected_for_plain_ffn():
    with pytest.raises(ValueError, match="activation"):
        get_peft_model(build("gpt2"), memvp(activation="relu"))
