"""What cannot work with a memory-space tuner is refused when the trainer is built, with the way out; what reaches
the model anyway (plain SFTTrainer / DPOTrainer, a custom collator) is refused by the model on the first batch."""

import pytest
import torch
from conftest import randomize_memory
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from trl import DPOConfig, SFTConfig
from trl_fixtures import (
    QUESTION,
    llm_and_encoder,
    memvp_config,
    messages_dataset,
    preference_dataset,
    trainer_args,
    word_tokenizer,
)

from memvp_peft import MemVPDPOTrainer, MemVPProcessor, MemVPSFTTrainer
from memvp_peft.demo_models import clip_image_processor


def _sft(tmp_path, dataset=None, processing_class=None, peft_config=None, **options):
    tokenizer = word_tokenizer()
    llm, clip = llm_and_encoder(tokenizer)
    return MemVPSFTTrainer(
        model=llm, peft_config=peft_config or memvp_config(vision_encoder=clip),
        train_dataset=dataset if dataset is not None else messages_dataset(4),
        processing_class=processing_class or MemVPProcessor(clip_image_processor(32), tokenizer),
        args=trainer_args(SFTConfig, tmp_path, **options),
    )


@pytest.mark.parametrize("option, message", [
    ({"packing": True}, r"packing=True \(or eval_packing\) concatenates several samples into one row"),
    ({"eval_packing": True}, r"packing=True \(or eval_packing\) concatenates several samples into one row"),
    ({"padding_free": True}, r"padding_free=True flattens the batch into a single row"),
    ({"use_liger_kernel": True}, r"use_liger_kernel=True makes Liger rebind the FFN modules' forward"),
])
def test_modes_a_memory_space_tuner_cannot_train_are_refused_at_construction(tmp_path, option, message):
    with pytest.raises(ValueError, match=message):
        _sft(tmp_path, **option)


def test_a_non_memvp_peft_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"trains a MemVP adapter, but peft_config is a LoraConfig"):
        _sft(tmp_path, peft_config=LoraConfig(target_modules=["q_proj"]))


def test_a_base_model_without_memvp_config_is_refused(tmp_path):
    llm, _ = llm_and_encoder(word_tokenizer())
    with pytest.raises(ValueError, match=r"got a LlamaForCausalLM without a MemVPConfig"):
        MemVPSFTTrainer(model=llm, train_dataset=messages_dataset(4), args=trainer_args(SFTConfig, tmp_path))


@pytest.mark.parametrize("trainer", [MemVPSFTTrainer, MemVPDPOTrainer])
def test_an_adapter_with_the_cls_input_token_is_refused(tmp_path, trainer):
    tokenizer = word_tokenizer()
    llm, clip = llm_and_encoder(tokenizer)
    config = memvp_config(vision_encoder=clip, cls_token=True, cls_token_prefix_ids=[5],
                          cls_token_text_only_prefix_ids=[5, 6])
    with pytest.raises(ValueError, match=r"cls_token=True \(ADEM-VL's CLS input token\)"):
        trainer(model=llm, peft_config=config, train_dataset=messages_dataset(4),
                processing_class=MemVPProcessor(clip_image_processor(32), tokenizer),
                args=trainer_args(SFTConfig if trainer is MemVPSFTTrainer else DPOConfig, tmp_path))


def test_images_with_a_plain_tokenizer_are_refused_with_the_processor_to_use(tmp_path):
    with pytest.raises(ValueError, match=r"has images .* but processing_class is a \w+, which cannot process them.*"
                                         r"MemVPProcessor\(image_processor, tokenizer\)"):
        _sft(tmp_path, processing_class=word_tokenizer())


def test_precomputed_image_features_that_trls_collator_would_drop_are_refused(tmp_path):
    rows = Dataset.from_dict({"messages": [[{"role": "user", "content": QUESTION},
                                            {"role": "assistant", "content": "one"}]] * 4,
                              "image_features": [torch.randn(16, 32).tolist()] * 4})
    with pytest.raises(ValueError, match=r"precomputed \['image_features'\] but TRL's collator reads images from "
                                         r"'image' / 'images' only and would drop that column"):
        _sft(tmp_path, dataset=rows)


def test_dpo_refuses_precomputed_image_columns(tmp_path):
    tokenizer = word_tokenizer()
    llm, clip = llm_and_encoder(tokenizer)
    rows = preference_dataset(4).remove_columns("images").add_column("pixel_values", [torch.zeros(3, 32, 32).tolist()] * 4)
    with pytest.raises(ValueError, match=r"MemVPDPOTrainer: the dataset has precomputed \['pixel_values'\]"):
        MemVPDPOTrainer(model=llm, peft_config=memvp_config(vision_encoder=clip), train_dataset=rows,
                        processing_class=MemVPProcessor(clip_image_processor(32), tokenizer),
                        args=trainer_args(DPOConfig, tmp_path))


def test_a_packed_batch_with_images_is_refused_by_the_model():
    """What a custom collator could still hand plain SFTTrainer: one memory per row cannot serve packed samples."""
    tokenizer = word_tokenizer()
    llm, clip = llm_and_encoder(tokenizer)
    model = get_peft_model(llm, memvp_config(vision_encoder=clip))
    ids = torch.randint(4, len(tokenizer), (1, 10))
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"a packed \(padding-free\) batch \(\['cu_seq_lens_q', 'cu_seq_lens_k'\]\) "
                                         r"came with visual inputs"):
        model(input_ids=ids, pixel_values=torch.zeros(1, 3, 32, 32), cu_seq_lens_q=cu, cu_seq_lens_k=cu)


def test_a_packed_text_only_batch_is_not_refused():
    """Text-only rows read the same learned memory p_k/p_v whichever sample they hold: packing them is exact."""
    tokenizer = word_tokenizer()
    llm, clip = llm_and_encoder(tokenizer)
    model = get_peft_model(llm, memvp_config(vision_encoder=clip)).eval()
    randomize_memory(model)
    ids = torch.randint(4, len(tokenizer), (1, 10))
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]])
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=position_ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu).logits
        first = model(input_ids=ids[:, :4]).logits
    torch.testing.assert_close(packed[:, :4], first)


def test_plain_sft_trainer_dropping_a_precomputed_image_column_warns_on_the_first_step(tmp_path):
    """The one case the model cannot refuse: TRL removes the column before the model sees it. It says so, once."""
    from trl import SFTTrainer

    tokenizer = word_tokenizer()
    llm, clip = llm_and_encoder(tokenizer)
    rows = Dataset.from_dict({"text": [f"Question: {QUESTION}\nAnswer: one"] * 4,
                              "image_features": [torch.randn(16, 32).tolist()] * 4})
    trainer = SFTTrainer(model=llm, peft_config=memvp_config(vision_encoder=clip), train_dataset=rows,
                         processing_class=tokenizer, args=trainer_args(SFTConfig, tmp_path))
    with pytest.warns(UserWarning, match=r"a training forward ran without any visual input .* TRL's collators read "
                                         r"only 'image'/'images' columns"):
        trainer.train()


def test_text_only_rows_after_a_batch_with_images_train_without_a_warning():
    import warnings

    tokenizer = word_tokenizer()
    llm, clip = llm_and_encoder(tokenizer)
    model = get_peft_model(llm, memvp_config(vision_encoder=clip))
    ids = torch.randint(4, len(tokenizer), (2, 6))
    model(input_ids=ids, labels=ids, pixel_values=torch.zeros(2, 3, 32, 32)).loss.backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(input_ids=ids, labels=ids).loss.backward()
