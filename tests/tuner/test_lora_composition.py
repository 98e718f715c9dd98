"""LoRA + MemVP as one adapter: trained together, saved together, restored together, LoRA mergeable."""

import pytest
import torch
from conftest import assert_fresh_process_reproduces, memvp_config, randomize_memory, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from memvp_peft import MemVPConfig
from memvp_peft.tuner.layer import MemVPLayer


def lora_memvp(targets=("q_proj", "v_proj", "gate_proj"), **overrides):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False, lora_dropout=0.0)
    return memvp_config(lora_config=lora, **overrides)


@pytest.fixture
def pm():
    model = get_peft_model(tiny_llama(), lora_memvp())
    randomize_memory(model, scale=0.3)
    return model.eval()


def test_lora_config_is_stored_as_json_friendly_dict():
    config = lora_memvp()
    assert isinstance(config.lora_config, dict)
    assert config.lora_config["r"] == 4 and "peft_type" not in config.lora_config
    assert MemVPConfig.from_peft_type(**config.to_dict()).lora_config == config.lora_config


def test_invalid_lora_config_is_rejected():
    with pytest.raises(ValueError, match="lora_config"):
        memvp_config(lora_config={"r": 4, "no_such_field": 1})
    with pytest.raises(ValueError, match="lora_config"):
        memvp_config(lora_config=42)


def test_lora_may_target_linears_inside_the_wrapped_ffn(pm):
    gate = pm.base_model.model.model.layers[0].mlp
    assert isinstance(gate, MemVPLayer)
    assert isinstance(gate.base_layer.gate_proj, LoraLayer)
    assert isinstance(pm.base_model.model.model.layers[0].self_attn.q_proj, LoraLayer)


def test_lora_that_matches_nothing_is_rejected():
    with pytest.raises(ValueError, match="no_such_linear"):
        get_peft_model(tiny_llama(), lora_memvp(targets=("no_such_linear",)))


def test_both_parts_train(pm, batch):
    pm.train()
    pm(**batch, labels=batch["input_ids"]).loss.backward()
    trainable = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("memvp_memory" in n for n in trainable)
    assert all(("lora_" in n or "memvp" in n) for n in trainable)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())


def test_one_adapter_file_holds_lora_and_memory(pm, tmp_path):
    pm.save_pretrained(tmp_path)
    keys = list(load_file(tmp_path / "adapter_model.safetensors"))
    assert any("mlp.base_layer.gate_proj.lora_A.weight" in k for k in keys)
    assert any("self_attn.q_proj.lora_B.weight" in k for k in keys)
    assert any("memvp_memory.projector" in k for k in keys)
    assert not any(".default." in k for k in keys)


def test_reload_in_fresh_process_restores_both_exactly(pm, batch, tmp_path):
    with torch.no_grad():
        expected = pm(**batch).logits
    pm.save_pretrained(tmp_path / "adapter")
    assert_fresh_process_reproduces(
        tmp_path, "from conftest import tiny_llama", "tiny_llama()", tmp_path / "adapter", batch, expected,
        adapter_name="x",
    )


def test_merge_and_unload_points_to_merge_lora(pm):
    with pytest.raises(ValueError, match="merge_lora"):
        pm.merge_and_unload()


def test_merge_lora_folds_lora_into_base_and_keeps_memory(pm, batch, tmp_path):
    with torch.no_grad():
        expected = pm(**batch).logits
    pm.merge_lora()
    assert not any(isinstance(m, LoraLayer) for m in pm.modules())
    assert any(isinstance(m, MemVPLayer) for m in pm.modules())
    with torch.no_grad():
        torch.testing.assert_close(pm(**batch).logits, expected, rtol=1e-4, atol=1e-5)
    # the merged deployment: the saved adapter holds the memory only (it is loaded onto the merged base)
    pm.save_pretrained(tmp_path)
    assert pm.peft_config["default"].lora_config is None
    assert not any("lora" in k for k in load_file(tmp_path / "adapter_model.safetensors"))


def test_unload_removes_lora_and_memory(batch):
    base = tiny_llama()
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    pm = get_peft_model(base, lora_memvp())
    unloaded = pm.unload()
    assert not any(isinstance(m, (LoraLayer, MemVPLayer)) for m in unloaded.modules())
    assert set(unloaded.state_dict()) == set(reference)
    assert all(torch.equal(v, reference[k]) for k, v in unloaded.state_dict().items())


def test_disable_adapter_disables_lora_too(pm, batch):
    base = tiny_llama()
    with torch.no_grad():
        expected = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with pm.disable_adapter():
            got = pm(**batch).logits
    torch.testing.assert_close(got, expected)


def test_second_adapter_switches_lora_and_memory_together(batch):
    pm = get_peft_model(tiny_llama(), lora_memvp(targets=("q_proj",)))
    pm.add_adapter("other", lora_memvp(targets=("v_proj",)))
    pm.set_adapter("other")
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all(".other" in n for n in trainable)
    assert any("v_proj.lora_A.other" in n for n in trainable)
    assert any("memvp_memory.other" in n for n in trainable)


@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning")  # peft fixes it for Conv1D
@pytest.mark.parametrize("arch, targets", [("gpt2", ("c_fc", "c_proj")), ("opt", ("fc1", "fc2"))])
def test_lora_on_the_linears_of_a_plain_ffn_is_kept_trained_and_mergeable(arch, targets):
    """Plain FFNs are wrapped linear by linear (K appended to W1, V to W2). A LoRA of the same adapter on those very
    linears must stay inside the MemVP wrappers -- not be silently dropped -- and merge into W1/W2 exactly."""
    from test_architectures import build, inputs

    pm = get_peft_model(build(arch), lora_memvp(targets=targets, num_memory_slots=8))
    randomize_memory(pm, scale=0.3)
    wrapped = [m for m in pm.modules() if isinstance(m, MemVPLayer)]
    assert wrapped and all(isinstance(m.base_layer, LoraLayer) for m in wrapped)
    ids, mask, features = inputs()
    pm.train()
    pm(input_ids=ids, attention_mask=mask, image_features=features, labels=ids).loss.backward()
    lora = [p for n, p in pm.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    pm.eval()
    with torch.no_grad():
        expected = pm(input_ids=ids, attention_mask=mask, image_features=features).logits
        pm.merge_lora()
        assert not any(isinstance(m, LoraLayer) for m in pm.modules())
        torch.testing.assert_close(pm(input_ids=ids, attention_mask=mask, image_features=features).logits, expected,
                                   rtol=1e-4, atol=1e-5)
