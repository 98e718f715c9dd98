"""TRL's SFTTrainer trains MemVP for real, both ways (a MemVP PeftModel, or a base with peft_config=MemVPConfig),
on both data paths (MemVPDataCollator, or TRL's own vision layout through MemVPProcessor): the loss the trainer
computes is the image-conditioned one, MemVP's projector trains, the sequence carries no image placeholder token, and
a Llava base's own projector is untouched."""

import pytest
import torch
from conftest import randomize_memory
from peft import get_peft_model
from transformers import LlavaForConditionalGeneration
from trl import SFTConfig, SFTTrainer
from trl_fixtures import (
    changed,
    first_batch,
    llava_projector_state,
    llm_and_encoder,
    memvp_config,
    memvp_parameters,
    messages_dataset,
    records_dataset,
    save_tiny_llava,
    train_and_list_changed,
    trainer_args,
    without_images,
    word_tokenizer,
)

from memvp_peft import MemVPProcessor, MemVPSFTTrainer
from memvp_peft.data import MemVPDataCollator
from memvp_peft.demo_models import clip_image_processor


def _assert_trainer_loss_is_image_conditioned(trainer):
    """SFTTrainer.compute_loss (TRL's fused LM head) equals the model's own loss with the images, not without."""
    batch = first_batch(trainer)
    with torch.no_grad():
        trainer_loss = trainer.compute_loss(trainer.model, dict(batch))
        image_loss = trainer.model(**batch).loss
        text_loss = trainer.model(**without_images(batch)).loss
    torch.testing.assert_close(trainer_loss, image_loss, rtol=1e-5, atol=1e-6)
    assert abs(float(image_loss) - float(text_loss)) > 1e-3  # far beyond float32 noise (the line above: 1e-5)
    return batch


def test_plain_sft_trainer_with_a_memvp_peft_model_and_the_collator(tmp_path):
    tokenizer = word_tokenizer()
    llm, clip = llm_and_encoder(tokenizer)
    model = get_peft_model(llm, memvp_config(vision_encoder=clip))
    randomize_memory(model, scale=1.0)
    collator = MemVPDataCollator(tokenizer, clip_image_processor(32))
    trainer = SFTTrainer(
        model=model, data_collator=collator, train_dataset=records_dataset(),
        processing_class=MemVPProcessor(clip_image_processor(32), tokenizer),  # TRL wants a processor for images
        args=trainer_args(SFTConfig, tmp_path, remove_unused_columns=False),  # the collator reads raw records
    )
    batch = _assert_trainer_loss_is_image_conditioned(trainer)
    assert batch["image_mask"].all()
    assert "base_model.memvp_memory.default.projector.0.weight" in train_and_list_changed(trainer)


def test_plain_sft_trainer_with_peft_config_on_trls_vision_layout(tmp_path):
    tokenizer = word_tokenizer()
    llm, clip = llm_and_encoder(tokenizer)
    trainer = SFTTrainer(
        model=llm, peft_config=memvp_config(vision_encoder=clip), train_dataset=messages_dataset(),
        processing_class=MemVPProcessor(clip_image_processor(32), tokenizer), args=trainer_args(SFTConfig, tmp_path),
    )
    randomize_memory(trainer.model, scale=1.0)
    batch = _assert_trainer_loss_is_image_conditioned(trainer)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values", "image_mask"}
    assert "base_model.memvp_memory.default.projector.0.weight" in train_and_list_changed(trainer)


@pytest.mark.parametrize("trainer_class", [SFTTrainer, MemVPSFTTrainer])
def test_sft_on_a_llava_base_trains_memvp_and_leaves_llavas_projector_alone(tmp_path, trainer_class):
    tokenizer = save_tiny_llava(tmp_path / "llava")
    vlm = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava")
    llava_projector = llava_projector_state(vlm)
    trainer = trainer_class(
        model=vlm, peft_config=memvp_config(), train_dataset=messages_dataset(),
        processing_class=MemVPProcessor.from_pretrained(tmp_path / "llava"), args=trainer_args(SFTConfig, tmp_path),
    )
    randomize_memory(trainer.model, scale=1.0)
    batch = _assert_trainer_loss_is_image_conditioned(trainer)
    assert tokenizer.convert_tokens_to_ids("<image>") not in batch["input_ids"]
    assert "base_model.memvp_memory.default.projector.0.weight" in train_and_list_changed(trainer)
    after = llava_projector_state(trainer.model)
    assert all(torch.equal(after[k], v) for k, v in llava_projector.items())


def tiny_vipllava(tokenizer):
    """A Llava-layout VLM of no supported family (VipLlava): refused at injection unless a separate encoder reads the
    adapter's pixels (tests/tuner/test_unsupported_vlm.py)."""
    from transformers import CLIPVisionConfig, LlamaConfig, VipLlavaConfig, VipLlavaForConditionalGeneration

    torch.manual_seed(0)
    return VipLlavaForConditionalGeneration(VipLlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=32, patch_size=8),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, pad_token_id=tokenizer.pad_token_id),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layers=[-2, -1]))


def test_a_base_of_no_supported_family_is_refused_at_construction_with_plain_sft_trainer(tmp_path):
    """TRL's SFTTrainer builds the adapter (get_peft_model) when it is constructed: a VLM of no supported family is
    refused there, naming the supported families, before any batch. (A Llava base with its own processor trains:
    test_sft_vlm_processor.py.)"""
    from transformers import LlavaProcessor

    save_tiny_llava(tmp_path / "llava")
    processor = LlavaProcessor.from_pretrained(tmp_path / "llava")
    with pytest.raises(ValueError, match=r"VipLlavaForConditionalGeneration is a VLM of no family MemVP supports "
                                         r"\(supported families: Llava \(llava\).*vision_encoder="):
        SFTTrainer(
            model=tiny_vipllava(processor.tokenizer), peft_config=memvp_config(), train_dataset=messages_dataset(),
            processing_class=processor, args=trainer_args(SFTConfig, tmp_path),
        )


def test_memvp_sft_trainer_refuses_a_vlm_processor_for_a_base_of_no_supported_family_at_construction(tmp_path):
    from transformers import LlavaProcessor

    save_tiny_llava(tmp_path / "llava")
    processor = LlavaProcessor.from_pretrained(tmp_path / "llava")
    with pytest.raises(ValueError, match=r"processing_class is a LlavaProcessor, which expands each image into "
                                         r"placeholder tokens.*supported VLM family \(Llava \(llava\).*"
                                         r"MemVPProcessor\.from_pretrained"):
        MemVPSFTTrainer(
            model=tiny_vipllava(processor.tokenizer), peft_config=memvp_config(), train_dataset=messages_dataset(),
            processing_class=processor, args=trainer_args(SFTConfig, tmp_path),
        )


def test_memvp_sft_trainer_loads_memvp_processor_from_the_model_folder_when_none_is_given(tmp_path):
    save_tiny_llava(tmp_path / "llava")
    trainer = MemVPSFTTrainer(
        model=LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava"), peft_config=memvp_config(),
        train_dataset=messages_dataset(), args=trainer_args(SFTConfig, tmp_path),
    )
    assert isinstance(trainer.processing_class, MemVPProcessor)


def test_memvp_sft_trainer_gives_the_collator_raw_records_and_trl_a_processor(tmp_path):
    """With MemVPDataCollator and a plain tokenizer: no remove_unused_columns/processor to know about."""
    tokenizer = word_tokenizer()
    llm, clip = llm_and_encoder(tokenizer)
    model = get_peft_model(llm, memvp_config(vision_encoder=clip))
    randomize_memory(model, scale=1.0)
    trainer = MemVPSFTTrainer(
        model=model, data_collator=MemVPDataCollator(tokenizer, clip_image_processor(32)),
        train_dataset=records_dataset(), processing_class=tokenizer, args=trainer_args(SFTConfig, tmp_path),
    )
    assert isinstance(trainer.processing_class, MemVPProcessor)
    _assert_trainer_loss_is_image_conditioned(trainer)
    assert "base_model.memvp_memory.default.projector.0.weight" in train_and_list_changed(trainer)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the first-call check is what runs on accelerator tensors")
def test_llavas_placeholder_tokens_without_pixels_on_an_accelerator_are_refused_on_the_first_batch(tmp_path):
    """Value checks cost a host-device sync on an accelerator, so they are off there -- except this one on the first
    call: placeholders whose images are missing show on the first batch."""
    from transformers import LlavaProcessor

    save_tiny_llava(tmp_path / "llava")
    model = get_peft_model(LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava"), memvp_config()).cuda()
    batch = LlavaProcessor.from_pretrained(tmp_path / "llava")(
        images=messages_dataset(1)["images"][0], text=["<image>\nWhat digit"], return_tensors="pt").to("cuda")
    del batch["pixel_values"]
    with pytest.raises(ValueError, match=r"image placeholder token .*but no `pixel_values` came"):
        model(**batch)


def test_trls_defaults_gradient_checkpointing_and_bf16_autocast_train_memvp(tmp_path):
    """SFTConfig turns gradient checkpointing and bf16 on by default: the recomputation reads the same memory."""
    tokenizer = word_tokenizer()
    llm, clip = llm_and_encoder(tokenizer)
    args = SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                     report_to=[], use_cpu=True, save_strategy="no")
    assert args.gradient_checkpointing and args.bf16
    trainer = MemVPSFTTrainer(model=llm, peft_config=memvp_config(vision_encoder=clip), train_dataset=messages_dataset(),
                              processing_class=MemVPProcessor(clip_image_processor(32), tokenizer), args=args)
    before = memvp_parameters(trainer.model)
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert "base_model.memvp_memory.default.projector.0.weight" in changed(before, trainer.model)


def test_memvp_sft_trainer_takes_the_image_processor_of_the_encoder_folder_the_config_names(tmp_path):
    tokenizer = word_tokenizer()
    llm, clip = llm_and_encoder(tokenizer)
    llm.save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    clip.save_pretrained(tmp_path / "clip")
    encoder_processor = clip_image_processor(32)
    encoder_processor.image_mean = [0.25, 0.5, 0.75]  # the encoder's own normalisation, not any default
    encoder_processor.save_pretrained(tmp_path / "clip")
    llm = type(llm).from_pretrained(tmp_path / "llm")
    trainer = MemVPSFTTrainer(
        model=llm, peft_config=memvp_config(vision_encoder=str(tmp_path / "clip")), train_dataset=messages_dataset(),
        args=trainer_args(SFTConfig, tmp_path / "out"),
    )
    assert list(trainer.processing_class.image_processor.image_mean) == [0.25, 0.5, 0.75]


@pytest.mark.parametrize("trainer_class", [SFTTrainer, MemVPSFTTrainer])
def test_on_a_4bit_base_memvp_sft_trainer_keeps_the_visual_memory_fp32_where_trl_casts_it_to_bf16(
        tmp_path, trainer_class):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tokenizer = word_tokenizer()
    llm, clip = llm_and_encoder(tokenizer)
    llm.save_pretrained(tmp_path / "llm")
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "llm", quantization_config=quantization, device_map="cpu")
    trainer = trainer_class(
        model=base, peft_config=memvp_config(vision_encoder=clip), train_dataset=messages_dataset(),
        processing_class=MemVPProcessor(clip_image_processor(32), tokenizer), args=trainer_args(SFTConfig, tmp_path),
    )
    dtypes = {p.dtype for p in trainer.model.base_model.memvp_memory.parameters()}
    assert dtypes == ({torch.float32} if trainer_class is MemVPSFTTrainer else {torch.bfloat16})
    assert "base_model.memvp_memory.default.projector.0.weight" in train_and_list_changed(trainer)
