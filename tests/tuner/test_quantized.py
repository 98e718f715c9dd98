"""4-bit NF4 bases (QLoRA-style) with real bitsandbytes layers on the CPU."""

import pytest
import torch
from conftest import memvp_config, randomize_memory, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(hidden_size=64, intermediate_size=128).save_pretrained(path)
    return path


def load_4bit(path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, device_map="cpu")


def qlora_config():
    return memvp_config(lora_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj"]))


def test_memvp_wraps_a_quantised_ffn_and_keeps_fp32_weights(checkpoint, batch):
    pm = get_peft_model(load_4bit(checkpoint), memvp_config())
    mlp = pm.base_model.model.model.layers[0].mlp
    assert isinstance(mlp.base_layer.gate_proj, bnb.nn.Linear4bit)
    assert all(p.dtype == torch.float32 for n, p in pm.named_parameters() if "memvp" in n)
    pm.train()
    loss = pm(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for n, p in pm.named_parameters() if p.requires_grad)


def _qlora_grads(checkpoint, batch, use_reentrant):
    model = load_4bit(checkpoint)
    if use_reentrant is None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": use_reentrant}
        )
    torch.manual_seed(0)
    pm = get_peft_model(model, qlora_config())
    randomize_memory(pm, scale=0.2)
    pm.train()
    pm(**batch, labels=batch["input_ids"]).loss.backward()
    return {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_qlora_with_gradient_checkpointing_matches_no_checkpointing(checkpoint, batch, use_reentrant):
    expected = _qlora_grads(checkpoint, batch, None)
    got = _qlora_grads(checkpoint, batch, use_reentrant)
    assert any("lora_A" in n for n in got) and any("memvp" in n for n in got)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_adapter_reloads_onto_freshly_quantised_base_identically(checkpoint, batch, tmp_path):
    pm = get_peft_model(load_4bit(checkpoint), qlora_config())
    randomize_memory(pm, scale=0.2)
    pm.eval()
    with torch.no_grad():
        expected = pm(**batch).logits
    pm.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(load_4bit(checkpoint), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, expected)


def test_merge_lora_into_a_quantised_base_keeps_outputs_close(checkpoint, batch):
    pm = get_peft_model(load_4bit(checkpoint), qlora_config())
    randomize_memory(pm, scale=0.2)
    pm.eval()
    with torch.no_grad():
        expected = pm(**batch).logits
        with pm.disable_adapter():
            without_memory = pm(**batch).logits
        pm.merge_lora()
        got = pm(**batch).logits
    # re-quantising the merged weights to NF4 is lossy: close, not identical -- but the visual memory is still there
    assert (got - expected).abs().max() < 0.5 * (without_memory - expected).abs().max()
