"""`import memvp_peft` makes MEMVP a first-class peft type."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import memvp_config, tiny_llama
from peft import PeftConfig, PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

from memvp_peft import MemVPConfig, MemVPModel
from memvp_peft.tuner.config import MEMVP_NAME, MEMVP_STORED_NAME, _add_peft_type_member


def test_memvp_is_a_peft_type_member():
    assert PeftType.MEMVP == "MEMVP"
    assert PeftType("MEMVP") is PeftType.MEMVP
    assert PeftType["MEMVP"] is PeftType.MEMVP
    assert "MEMVP" in list(PeftType)


def test_memvp_config_and_tuner_are_registered():
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.MEMVP] is MemVPConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.MEMVP] is MemVPModel


def test_registration_is_idempotent():
    import memvp_peft

    memvp_peft.register_memvp()
    assert _add_peft_type_member(MEMVP_NAME) is PeftType.MEMVP  # what importing the config again runs
    assert list(PeftType).count(PeftType.MEMVP) == 1
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.MEMVP] is MemVPConfig


def test_get_peft_model_returns_causal_lm_peft_model():
    pm = get_peft_model(tiny_llama(), memvp_config(task_type="CAUSAL_LM"))
    assert type(pm).__name__ == "PeftModelForCausalLM"
    assert isinstance(pm.base_model, MemVPModel)
    assert pm.peft_config["default"].peft_type == PeftType.MEMVP


def test_peft_config_from_pretrained_reads_memvp_config(tmp_path):
    pm = get_peft_model(tiny_llama(), memvp_config(num_memory_slots=12))
    pm.save_pretrained(tmp_path)
    config = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(config, MemVPConfig)
    assert config.num_memory_slots == 12
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == MEMVP_STORED_NAME


def test_an_adapter_stored_under_the_bare_peft_type_name_still_loads(tmp_path):
    pm = get_peft_model(tiny_llama(), memvp_config(num_memory_slots=12))
    pm.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "peft_type": "MEMVP"}))
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert loaded.peft_config["default"].num_memory_slots == 12


@pytest.mark.parametrize("load", [
    "from peft import PeftConfig; PeftConfig.from_pretrained(FOLDER)",
    "from peft import PeftModel; from transformers import AutoModelForCausalLM; "
    "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), FOLDER)",
    "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained(BASE).load_adapter(FOLDER)",
], ids=["PeftConfig", "PeftModel", "transformers.load_adapter"])
def test_loading_without_import_tells_user_to_import_memvp_peft(tmp_path, load):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    get_peft_model(base, memvp_config()).save_pretrained(tmp_path / "adapter")
    script = f"FOLDER = {str(tmp_path / 'adapter')!r}; BASE = {str(tmp_path / 'base')!r}\n{load}\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "pip install memvp-peft, then import memvp_peft" in result.stderr.strip().splitlines()[-1]


def test_add_set_and_delete_adapter():
    pm = get_peft_model(tiny_llama(), memvp_config())
    pm.add_adapter("other", memvp_config(num_memory_slots=6))
    assert set(pm.base_model.memvp_memory) == {"default", "other"}
    pm.set_adapter("other")
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".other." in n for n in trainable)
    pm.delete_adapter("default")
    assert set(pm.base_model.memvp_memory) == {"other"}
    assert pm.active_adapters == ["other"]
    ids = torch.randint(3, 64, (2, 5))
    pm(input_ids=ids, image_features=torch.randn(2, 3, 16))


def test_two_adapters_give_different_outputs_and_disable_adapter_gives_base():
    base = tiny_llama()
    ids = torch.randint(3, 64, (2, 5))
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    pm = get_peft_model(base, memvp_config())
    pm.add_adapter("other", memvp_config())
    from conftest import randomize_memory

    randomize_memory(pm)
    feats = torch.randn(2, 3, 16)
    with torch.no_grad():
        out_default = pm(input_ids=ids, image_features=feats).logits
        pm.set_adapter("other")
        out_other = pm(input_ids=ids, image_features=feats).logits
        with pm.disable_adapter():
            disabled = pm(input_ids=ids, image_features=feats).logits
    assert not torch.allclose(out_default, out_other)
    assert not torch.allclose(out_default, expected)
    torch.testing.assert_close(disabled, expected)


def test_tuner_level_memory_is_frozen_in_inference_mode(tmp_path):
    pm = get_peft_model(tiny_llama(), memvp_config())
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    names = {n for n, p in trainable.named_parameters() if p.requires_grad}
    assert names and all("memvp" in n for n in names)


@pytest.mark.parametrize(
    "field, value",
    [
        ("visual_dim", 0),
        ("visual_dim", -4),
        ("num_memory_slots", -1),
        ("projector_hidden_dim", 1.5),
        ("memory_dropout", 1.0),
        ("memory_dropout", -0.1),
        ("visual_scale", -0.01),
        ("memory_scale", float("nan")),
        ("activation", "swishy"),
        ("layers_to_transform", [-1]),
        ("memory_side", "decoder_only"),
        ("vision_feature_select_strategy", "cls"),
        ("vision_adapter_dim", -1),
        ("vision_adapter_dropout", 1.0),
        ("vision_adapter_scale", -0.1),
    ],
)
def test_config_rejects_invalid_values(field, value):
    with pytest.raises(ValueError, match=field):
        MemVPConfig(**{field: value})
