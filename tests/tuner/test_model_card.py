"""The model card a MemVP save writes: what the adapter is, how to load it, its base, encoder and (from memvp-train)
its data and figures -- one section, replaced by later saves, the user's own text kept."""

import json

import pytest
from conftest import memvp_config, tiny_llama
from huggingface_hub import ModelCard
from peft import get_peft_model

from memvp_peft.demo_models import tiny_clip
from memvp_peft.tuner.save_load import SECTION_START, write_model_card


def _saved(tmp_path, **config):
    base = tiny_llama()
    base.name_or_path = "org/tiny-llama"
    pm = get_peft_model(base, memvp_config(**config))
    pm.save_pretrained(tmp_path)
    return pm, ModelCard.load(tmp_path / "README.md")


def test_the_card_says_it_is_a_memvp_adapter_and_how_to_load_it(tmp_path):
    _, card = _saved(tmp_path, num_memory_slots=12)
    assert "memvp-peft" in card.data.tags and card.data.library_name == "peft"
    assert "import memvp_peft" in card.text and "PeftModel.from_pretrained" in card.text
    assert 'AutoModelForCausalLM.from_pretrained("org/tiny-llama")' in card.text
    assert "12 slots" in card.text


def test_the_card_names_the_recorded_vision_encoder(tmp_path):
    tiny_clip(hidden_size=16).save_pretrained(tmp_path / "my-clip")
    _, card = _saved(tmp_path / "adapter", vision_encoder=str(tmp_path / "my-clip"))
    assert "my-clip" in card.text.split("**Vision encoder:**")[1].splitlines()[0]


def test_a_second_save_replaces_the_section_and_keeps_the_users_text(tmp_path):
    pm, card = _saved(tmp_path)
    card.text = card.text + "\n\nMy own notes about this adapter.\n"
    card.save(tmp_path / "README.md")
    pm.save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert text.count(SECTION_START) == 1 and "My own notes about this adapter." in text


def test_training_figures_are_written_when_known(tmp_path):
    pm, _ = _saved(tmp_path)
    write_model_card(str(tmp_path), pm.peft_config["default"], dataset="digits",
                     metrics={"heldout_accuracy": 0.9694, "final_loss": 0.1234, "global_steps": 300})
    text = (tmp_path / "README.md").read_text()
    assert "**Training data:** digits" in text and "96.94%" in text and "0.1234" in text and "300" in text
    assert json.loads((tmp_path / "adapter_config.json").read_text())["num_memory_slots"] == 8
