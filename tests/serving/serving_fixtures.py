"""What the serving tests serve: a tiny Llama (head_dim 64, which vLLM's CPU attention needs; or a tiny Qwen2 of the
same shape, `qwen2_base`) with a word tokenizer and a chat template, a tiny CLIP tower, and a MemVP adapter with
trained-like weights (projector, p_k and p_v randomised so that the memory changes the answers) -- and the
reference: memvp-peft's own HF `generate()`."""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Optional

import torch

WORDS = [f"w{i}" for i in range(120)]
VISUAL_DIM = 32
NUM_SLOTS = 40
CHAT_TEMPLATE = ("{% for message in messages %}{{ message['role'] }} : "
                 "{% if message['content'] is string %}{{ message['content'] }}"
                 "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
                 "{% endif %}{% endfor %}{% endif %} {% endfor %}{% if add_generation_prompt %}assistant : {% endif %}")


def llama_base(tokenizer: Any) -> Any:
    """The tiny Llama: width 128, 2 layers, 2 heads of 64 over 1 key/value head."""
    from memvp_peft.demo_models import tiny_llama

    return tiny_llama(tokenizer, hidden_size=128, layers=2, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=512, seed=3)


def qwen2_base(tokenizer: Any) -> Any:
    """A tiny Qwen2 of the Llama's shape, with Qwen2's q/k/v biases randomised (they start at zero) so that vLLM's
    loading of them is checked too."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(5)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         tie_word_embeddings=False, initializer_range=0.1, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = Qwen2ForCausalLM(config)
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for layer in model.model.layers:
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                projection.bias.copy_(torch.randn(projection.bias.shape, generator=generator) * 0.5)
    return model


def build_models(root: str, base: Callable[[Any], Any] = llama_base, memory_std: float = 2.0) -> dict[str, str]:
    """Base folder (`base(tokenizer)` saved), vision tower folder and adapter folder (memory tensors of standard
    deviation `memory_std`) under `root`; their paths."""
    from peft import get_peft_model

    from memvp_peft import MemVPConfig
    from memvp_peft.demo_models import build_word_tokenizer, tiny_clip

    paths = {name: os.path.join(root, name) for name in ("base", "clip", "adapter")}
    tokenizer = build_word_tokenizer([" ".join(WORDS), "user assistant system :"])
    tokenizer.chat_template = CHAT_TEMPLATE
    model = base(tokenizer)
    with torch.no_grad():  # a sharper base: greedy answers depend on the input, not on a flat distribution
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(paths["base"])
    tokenizer.save_pretrained(paths["base"])
    clip = tiny_clip(hidden_size=VISUAL_DIM, layers=2, image_size=32, patch_size=8, seed=4)
    clip.save_pretrained(paths["clip"])
    config = MemVPConfig(visual_dim=VISUAL_DIM, num_memory_slots=NUM_SLOTS, projector_hidden_dim=16,
                         memory_dropout=0.0, vision_encoder=paths["clip"])
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "memvp_memory" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * memory_std)
    peft_model.save_pretrained(paths["adapter"])
    with open(os.path.join(paths["adapter"], "memvp_cli.json"), "w") as handle:
        json.dump({"vision_model_name_or_path": paths["clip"], "featurizer": None, "kind": "causal",
                   "image_normalization": "encoder"}, handle)
    return paths


class Reference:
    """memvp-peft's HF model with the adapter: greedy answers to compare vLLM's with."""

    def __init__(self, paths: dict[str, str]) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

        import memvp_peft  # noqa: F401  (registers MEMVP)

        base = AutoModelForCausalLM.from_pretrained(paths["base"], dtype=torch.float32)
        self.model = PeftModel.from_pretrained(base, paths["adapter"]).eval()
        # the word tokenizer as saved: AutoTokenizer would take a Qwen2 base's own tokenizer class, whose
        # pre-tokenizer splits the words differently (the engine tests pass token ids, never text)
        self.tokenizer = PreTrainedTokenizerFast.from_pretrained(paths["base"])

    def generate(self, prompt_ids: list[int], features: Optional[list[torch.Tensor]] = None,
                 max_new_tokens: int = 8) -> list[int]:
        """Greedy token ids after `prompt_ids`, reading `features` (one `(tokens, D)` tensor per image, or None)."""
        kwargs = {}
        if features:
            kwargs["image_features"] = torch.cat(features)[None]
        input_ids = torch.tensor([prompt_ids])
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                      max_new_tokens=max_new_tokens, do_sample=False,
                                      eos_token_id=None, pad_token_id=0, **kwargs)
        return out[0, len(prompt_ids):].tolist()

    def pixel_features(self, image) -> torch.Tensor:
        """memvp-peft's features of one PIL image, as its runtime computes them for `pixel_values`."""
        from memvp_peft.cli.model_loading import image_processor_for
        from memvp_peft.data.images import to_rgb_image
        from memvp_peft.vision import pixel_features

        encoder = self.model.base_model.vision_encoder
        processor = image_processor_for(self.model.peft_config["default"].vision_encoder, encoder.model.config)
        pixels = processor(images=[to_rgb_image(image)], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            return pixel_features(encoder, pixels, self.model.peft_config["default"])[0]


def digit_image(index: int):
    """A real image: one of scikit-learn's 8x8 digits, as an RGB PIL image."""
    from PIL import Image
    from sklearn.datasets import load_digits

    import numpy as np

    digits = load_digits().images
    array = (digits[index] / 16.0 * 255).astype(np.uint8)
    return Image.fromarray(array, mode="L").resize((32, 32)).convert("RGB")


def random_features(seed: int, tokens: int) -> torch.Tensor:
    return torch.randn(tokens, VISUAL_DIM, generator=torch.Generator().manual_seed(seed))


def prompt_ids(reference: Reference, seed: int, length: int) -> list[int]:
    """A prompt of exactly `length` token ids (bos included), different for each seed."""
    ids = reference.tokenizer.encode(" ".join(f"w{(seed * 13 + 7 * j) % 120}" for j in range(length - 1)))
    assert len(ids) == length
    return ids


def engine_request(prompt: list[int], images: list) -> dict:
    """vLLM's request of a prompt with its images' features (none: a text-only request)."""
    return {"prompt_token_ids": prompt, "multi_modal_data": {"image": images}} if images else \
        {"prompt_token_ids": prompt}


def greedy_answers(llm: Any, requests: list[dict], max_tokens: int = 8) -> list[list[int]]:
    """vLLM's greedy token ids for each request (one batch), as many as `max_tokens` each."""
    from vllm import SamplingParams

    outputs = llm.generate(requests, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                           use_tqdm=False)
    return [list(output.outputs[0].token_ids) for output in outputs]


def shut_down(llm: Any) -> None:
    """Stop the engine's processes now (not at garbage collection), so the next engine has the cores."""
    llm.llm_engine.engine_core.shutdown()
