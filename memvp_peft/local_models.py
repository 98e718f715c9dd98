"""Small models and tokenizers built locally from configs: the embedded default needs no download.

Used by the demo, the CLI's built-in `digits` task, the benchmark and the tests. Everything is random-initialised
and deterministic for a given seed.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch


def build_word_tokenizer(corpus: Iterable[str], extra_words: Iterable[str] = ()):
    """A word-level `PreTrainedTokenizerFast` trained on `corpus` (prepends [BOS]; pad/eos/unk specials)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    texts = list(corpus) + [" ".join(extra_words)]
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[BOS]", "[EOS]", "[UNK]"]))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", pair="[BOS] $A $B", special_tokens=[("[BOS]", tokenizer.token_to_id("[BOS]"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]"
    )


def tiny_llama(tokenizer=None, vocab_size: Optional[int] = None, hidden_size: int = 128, layers: int = 2,
               seed: int = 0, **overrides):
    """A Llama-shaped causal LM (random, frozen by MemVP) sized for CPU demos."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if tokenizer is not None:
        vocab_size = len(tokenizer)
        overrides.setdefault("pad_token_id", tokenizer.pad_token_id)
        overrides.setdefault("bos_token_id", tokenizer.bos_token_id)
        overrides.setdefault("eos_token_id", tokenizer.eos_token_id)
    config = LlamaConfig(
        vocab_size=vocab_size or 64,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden_size // 32),
        num_key_value_heads=max(1, hidden_size // 64),
        max_position_embeddings=256,
        **overrides,
    )
    return LlamaForCausalLM(config)


def tiny_clip(hidden_size: int = 32, layers: int = 2, image_size: int = 32, patch_size: int = 8, seed: int = 0):
    """A small CLIP vision tower (random, frozen)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden_size // 16),
        image_size=image_size,
        patch_size=patch_size,
    )
    return CLIPVisionModel(config).eval()


def clip_image_processor(image_size: int = 32):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
