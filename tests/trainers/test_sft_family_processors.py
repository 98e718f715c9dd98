"""TRL's documented VLM script, unchanged, trains MemVP on a Qwen2-VL and on a Mistral 3:
`SFTTrainer(model=<the VLM>, processing_class=<its own processor>, peft_config=MemVPConfig(...))`. The trainer's loss
is the image-conditioned loss of the same batch computed directly, no image token or marker around it reaches the
language model, MemVP's projector trains and the VLM's own tower and projector (Qwen: its merger, the tower's last
part) are untouched. (Llava, Gemma 3 and Idefics3: test_sft_vlm_processor.py and the families' own files.)"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import pytest
import torch
from conftest import randomize_memory
from trl import SFTConfig, SFTTrainer
from trl_fixtures import changed, first_batch, memvp_config, memvp_parameters, messages_dataset, trainer_args
from vlm_fixtures import mistral3, qwen2_vl

from memvp_peft import MemVPSFTTrainer


class Case(NamedTuple):
    build: Callable[[], tuple]
    image_tokens: tuple[str, ...]  # the image tokens and the markers the processor writes around them
    image_input: str  # the processor's image keyword besides pixel_values
    visual_dim: int  # what MemVP reads, in its width
    slots: int
    frozen: Callable[[Any], tuple]  # the VLM's own modules that must stay as they were


CASES = {
    # the merger's output, in the text width 64
    "qwen2_vl": Case(qwen2_vl, ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>"), "image_grid_thw", 64, 16,
                     lambda inner: (inner.visual,)),
    # the Pixtral tower's patches, in its width 32; a 32 x 32 image is 64 of them
    "mistral3": Case(mistral3, ("[IMG]", "[IMG_BREAK]", "[IMG_END]"), "image_sizes", 32, 64,
                     lambda inner: (inner.vision_tower, inner.multi_modal_projector)),
}


def drop_in_trainer(name: str, trainer_class, output_dir):
    """TRL's script as documented for a VLM, with MemVP's config as the only change."""
    case = CASES[name]
    model, processor = case.build()
    trainer = trainer_class(
        model=model.train(), args=trainer_args(SFTConfig, output_dir), train_dataset=messages_dataset(),
        processing_class=processor, peft_config=memvp_config(visual_dim=case.visual_dim, num_memory_slots=case.slots),
    )
    randomize_memory(trainer.model, scale=1.0)
    return trainer


def image_token_ids(name: str, trainer) -> torch.Tensor:
    return torch.tensor(trainer.processing_class.tokenizer.convert_tokens_to_ids(list(CASES[name].image_tokens)))


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("trainer_class", [SFTTrainer, MemVPSFTTrainer])
def test_the_trainers_loss_is_the_image_conditioned_loss_of_the_batch(tmp_path, name, trainer_class):
    trainer = drop_in_trainer(name, trainer_class, tmp_path)
    batch = first_batch(trainer)
    assert CASES[name].image_input in batch and torch.isin(batch["input_ids"], image_token_ids(name, trainer)).any()
    other_images = {**batch, "pixel_values": batch["pixel_values"].flip(-1)}
    with torch.no_grad():
        trainer_loss = trainer.compute_loss(trainer.model, dict(batch))
        direct = trainer.model(**batch).loss
        with_other_images = trainer.model(**other_images).loss
    torch.testing.assert_close(trainer_loss, direct, rtol=1e-5, atol=1e-6)
    assert abs(float(direct) - float(with_other_images)) > 1e-4


@pytest.mark.parametrize("name", sorted(CASES))
def test_memvp_trains_and_no_image_token_reaches_the_language_model(tmp_path, name):
    trainer = drop_in_trainer(name, SFTTrainer, tmp_path)
    embedded = []
    embeddings = trainer.model.get_base_model().get_input_embeddings()
    embeddings.register_forward_hook(lambda module, args, output: embedded.append(args[0]))
    before = memvp_parameters(trainer.model)
    trainer.train()
    assert embedded and not any(torch.isin(ids, image_token_ids(name, trainer)).any() for ids in embedded)
    assert "base_model.memvp_memory.default.projector.0.weight" in changed(before, trainer.model)


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_vlms_own_tower_and_projector_are_untouched(tmp_path, name):
    trainer = drop_in_trainer(name, SFTTrainer, tmp_path)
    modules = CASES[name].frozen(trainer.model.get_base_model().model)
    frozen = [{k: v.clone() for k, v in module.state_dict().items()} for module in modules]
    trainer.train()
    for module, state in zip(modules, frozen):
        assert all(torch.equal(module.state_dict()[k], v) for k, v in state.items())
        assert not any(p.requires_grad for p in module.parameters())
