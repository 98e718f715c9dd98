"""Builders shared by the TRL tests: a word tokenizer, scikit-learn digits as images, a tiny Llama + CLIP pair, a tiny
Llava saved to a folder with its own processor, TRL-layout datasets. Everything is local and built from configs.

Imported by name (`from trl_fixtures import ...`), like tests/data/data_fixtures.py.
"""

from __future__ import annotations

import numpy as np
import torch

from memvp_peft import MemVPConfig
from memvp_peft.demo_models import build_word_tokenizer, clip_image_processor, tiny_clip, tiny_llama

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
QUESTION = "What digit is shown ?"
CORPUS = ["Question: What digit is shown ?\nAnswer:", "USER: ASSISTANT: SYSTEM: Look closely ."]

# A Llava-style chat template (typed contents, one `<image>` line per image entry), as Llava processors carry.
LLAVA_TEMPLATE = (
    "{%- for message in messages -%}{{ message['role'].upper() + ': ' }}"
    "{%- for part in message['content'] -%}{%- if part['type'] == 'image' -%}{{ '<image>\n' }}"
    "{%- else -%}{{ part['text'] + ' ' }}{%- endif -%}{%- endfor -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)


def word_tokenizer(image_token: bool = False):
    tokenizer = build_word_tokenizer(CORPUS, NAMES)
    if image_token:  # a VLM tokenizer: `<image>` is one special token
        tokenizer.add_tokens(["<image>"], special_tokens=True)
    return tokenizer


def digit_images(count: int = 8):
    """Real images: the first `count` scikit-learn digits as RGB PIL images, and their labels."""
    from PIL import Image
    from sklearn.datasets import load_digits

    data = load_digits()
    images = [Image.fromarray(np.rint(x * (255 / 16)).astype(np.uint8)).convert("RGB") for x in data.images[:count]]
    return images, [int(t) for t in data.target[:count]]


def memvp_config(**overrides) -> MemVPConfig:
    """16 memory slots: tiny_clip gives 16 patch features per image (CLS dropped). No memory dropout, so a loss
    computed twice is the same."""
    fields = dict(visual_dim=32, num_memory_slots=16, projector_hidden_dim=16, memory_dropout=0.0, memory_scale=1.0,
                  task_type="CAUSAL_LM")
    fields.update(overrides)
    return MemVPConfig(**fields)


def llm_and_encoder(tokenizer, seed: int = 0):
    """A tiny Llama and a tiny CLIP vision tower (random, from configs)."""
    return tiny_llama(tokenizer, hidden_size=32, seed=seed), tiny_clip(seed=seed)


def save_tiny_llava(folder, seed: int = 0):
    """A tiny Llava (CLIP tower, Llama text model) saved with its own LlavaProcessor (tokenizer with an `<image>`
    token, CLIP image processor, Llava-style chat template). Returns the tokenizer."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = word_tokenizer(image_token=True)
    torch.manual_seed(seed)
    vlm = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=32, patch_size=8),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, pad_token_id=tokenizer.pad_token_id,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    ))
    vlm.save_pretrained(folder)
    LlavaProcessor(image_processor=clip_image_processor(32), tokenizer=tokenizer, patch_size=8,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                   chat_template=LLAVA_TEMPLATE).save_pretrained(folder)
    return tokenizer


def messages_dataset(count: int = 8):
    """TRL's vision layout: `images` (one list per row) + `messages`."""
    from datasets import Dataset

    images, labels = digit_images(count)
    return Dataset.from_dict({
        "images": [[image] for image in images],
        "messages": [[{"role": "user", "content": QUESTION}, {"role": "assistant", "content": NAMES[t]}]
                     for t in labels],
    })


def prompt_completion_dataset(count: int = 8):
    """TRL's conversational prompt-completion layout with `images`."""
    from datasets import Dataset

    images, labels = digit_images(count)
    return Dataset.from_dict({
        "images": [[image] for image in images],
        "prompt": [[{"role": "user", "content": QUESTION}] for _ in labels],
        "completion": [[{"role": "assistant", "content": NAMES[t]}] for t in labels],
    })


def records_dataset(count: int = 8):
    """MemVPDataCollator's simple layout: `image`, `question`, `answer`."""
    from datasets import Dataset

    images, labels = digit_images(count)
    return Dataset.from_dict({"image": images, "question": [QUESTION] * count, "answer": [NAMES[t] for t in labels]})


def preference_dataset(count: int = 8):
    """TRL's conversational preference layout with `images`: the right digit is chosen, the next one rejected."""
    from datasets import Dataset

    images, labels = digit_images(count)
    return Dataset.from_dict({
        "images": [[image] for image in images],
        "prompt": [[{"role": "user", "content": QUESTION}] for _ in labels],
        "chosen": [[{"role": "assistant", "content": NAMES[t]}] for t in labels],
        "rejected": [[{"role": "assistant", "content": NAMES[(t + 1) % 10]}] for t in labels],
    })


def trainer_args(config_class, output_dir, **overrides):
    """A few fp32 steps on CPU, nothing saved or reported."""
    fields = dict(output_dir=str(output_dir), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                  report_to=[], use_cpu=True, bf16=False, save_strategy="no", logging_steps=1,
                  gradient_checkpointing=False, seed=0)
    fields.update(overrides)
    return config_class(**fields)


def memvp_parameters(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if "memvp_memory" in name}


def changed(before: dict[str, torch.Tensor], model) -> list[str]:
    now = dict(model.named_parameters())
    return sorted(name for name, value in before.items() if not torch.equal(now[name].detach(), value))


def first_batch(trainer) -> dict:
    """The first training batch as the trainer's own collator and `_prepare_inputs` hand it to the model."""
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def train_and_list_changed(trainer) -> list[str]:
    """Runs `trainer.train()` and names the MemVP parameters of `trainer.model` it moved (sorted)."""
    before = memvp_parameters(trainer.model)
    trainer.train()
    return changed(before, trainer.model)


def llava_projector_state(vlm) -> dict[str, torch.Tensor]:
    """A copy of a Llava's own multi-modal projector weights; `vlm` is the Llava itself or a PeftModel around it."""
    base = vlm.get_base_model() if hasattr(vlm, "get_base_model") else vlm
    return {k: v.clone() for k, v in base.model.multi_modal_projector.state_dict().items()}


def without_images(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in ("pixel_values", "image_mask", "image_features")}
