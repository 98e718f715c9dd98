"""What an adapter records of its vision encoder finds that encoder again: a local folder by its absolute path (the
same from any working folder), and a digest of its weights -- other weights under the recorded name warn, naming
both digests. Adapters saved without a digest load as before."""

import json
import warnings

import pytest
import torch
from conftest import memvp_config, tiny_llama
from peft import PeftModel, get_peft_model
from transformers import CLIPVisionConfig, CLIPVisionModel

from memvp_peft.vision import weights_digest


def clip(seed=0):
    torch.manual_seed(seed)
    return CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                            num_attention_heads=4, image_size=32, patch_size=8)).eval()


@pytest.fixture
def encoder_folder(tmp_path, monkeypatch):
    """A CLIP saved as `models/clip` under the working folder."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "models" / "clip"
    clip().save_pretrained(folder)
    return folder


@pytest.fixture
def adapter(encoder_folder, tmp_path):
    """An adapter made with `vision_encoder="models/clip"`, typed relative to the working folder."""
    pm = get_peft_model(tiny_llama(), memvp_config(num_memory_slots=20, vision_encoder="models/clip"))
    pm.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def _recorded(adapter):
    return json.loads((adapter / "adapter_config.json").read_text())


def _reload(adapter):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(tiny_llama(), adapter)
    return model, [str(w.message) for w in caught if "MemVP" in str(w.message)]


def test_a_relative_encoder_folder_is_recorded_by_its_absolute_path_and_weights_digest(adapter, encoder_folder):
    recorded = _recorded(adapter)
    assert recorded["vision_encoder"] == str(encoder_folder)
    assert recorded["vision_encoder_sha256"] == weights_digest(clip())


def test_the_recorded_encoder_is_found_from_another_working_folder_holding_another_models_clip(
        adapter, encoder_folder, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    clip(seed=1).save_pretrained(elsewhere / "models" / "clip")
    monkeypatch.chdir(elsewhere)
    reloaded, messages = _reload(adapter)
    attached = reloaded.base_model.vision_encoder.model
    assert attached.config._name_or_path == str(encoder_folder) and messages == []
    assert weights_digest(attached) == weights_digest(clip())


def test_other_weights_saved_under_the_recorded_folder_warn_naming_both_digests(adapter, encoder_folder):
    clip(seed=1).save_pretrained(encoder_folder)
    _, messages = _reload(adapter)
    (message,) = messages
    assert weights_digest(clip(seed=1)) in message and _recorded(adapter)["vision_encoder_sha256"] in message
    assert f"the adapter recorded {str(encoder_folder)!r}" in message


def test_an_adapter_saved_without_a_weights_digest_loads_without_a_warning(adapter, encoder_folder):
    recorded = _recorded(adapter)
    del recorded["vision_encoder_sha256"]
    (adapter / "adapter_config.json").write_text(json.dumps(recorded))
    clip(seed=1).save_pretrained(encoder_folder)  # nothing to compare other weights with
    reloaded, messages = _reload(adapter)
    assert reloaded.base_model.vision_encoder is not None and messages == []
