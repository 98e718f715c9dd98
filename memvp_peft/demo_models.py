"""Tiny demo models and tokenizers built locally from configs: the embedded default needs no download.

Used by the demo, the CLI's built-in `digits` task, the benchmark, the docs' examples and the tests. Everything is
random-initialised and deterministic for a given seed. Scaffolding, not a part of MemVP: the tuner, vision and data
layers never import it.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from .vision import clip_style_image_processor

__all__ = [
    "SPECIAL_TOKEN_IDS",
    "FixedVocabTokenizer",
    "build_word_tokenizer",
    "clip_image_processor",
    "tiny_clip",
    "tiny_llama",
    "tiny_llama_config",
]


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


SPECIAL_TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


class FixedVocabTokenizer:
    """A whitespace tokenizer over a fixed word list: ids 0-3 are `<pad>`, `<bos>`, `<eos>`, `<unk>`, then `words`
    in the order given.

    Why not `build_word_tokenizer`: demos and benchmarks that generate a one-word answer want ids that are fixed by
    construction (the same list gives the same ids everywhere, no training pass) and a `decode` that stops at `<eos>`.
    """

    SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")

    def __init__(self, words: Iterable[str]) -> None:
        self.vocab = [*self.SPECIALS, *dict.fromkeys(w for w in words if w not in self.SPECIALS)]
        self.token_to_id = {token: i for i, token in enumerate(self.vocab)}
        self.pad_token_id, self.bos_token_id, self.eos_token_id, self.unk_token_id = range(len(self.SPECIALS))

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = [self.token_to_id.get(word, self.unk_token_id) for word in text.split()]
        return ([self.bos_token_id] if add_bos else []) + ids + ([self.eos_token_id] if add_eos else [])

    def decode(self, ids: Iterable) -> str:
        """Text of `ids` up to the first `<eos>`, specials dropped."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.eos_token_id:
                break
            if i >= len(self.SPECIALS):
                words.append(self.vocab[i])
        return " ".join(words)


def tiny_llama_config(vocab_size: int = 64, hidden_size: int = 32, layers: int = 2, **overrides):
    """The `LlamaConfig` of the tiny models used by tests, recipes and examples: SwiGLU FFN of twice the width,
    4 attention heads over 2 key/value heads (grouped-query attention, as in LLaMA-2/3), special ids pad 0, bos 1,
    eos 2. Any `LlamaConfig` field can be overridden."""
    from transformers import LlamaConfig

    fields = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        **SPECIAL_TOKEN_IDS,
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


def tiny_llama(tokenizer=None, vocab_size: Optional[int] = None, hidden_size: int = 128, layers: int = 2,
               seed: int = 0, **overrides):
    """A Llama-shaped causal LM (random, frozen by MemVP) sized for CPU demos; special ids from `tokenizer`."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    if tokenizer is not None:
        vocab_size = len(tokenizer)
        overrides.setdefault("pad_token_id", tokenizer.pad_token_id)
        overrides.setdefault("bos_token_id", tokenizer.bos_token_id)
        overrides.setdefault("eos_token_id", tokenizer.eos_token_id)
    else:
        overrides.setdefault("pad_token_id", None)  # no padding row in the embedding, as LlamaConfig's default
    overrides.setdefault("num_attention_heads", max(1, hidden_size // 32))
    overrides.setdefault("num_key_value_heads", max(1, hidden_size // 64))
    overrides.setdefault("max_position_embeddings", 256)
    return LlamaForCausalLM(tiny_llama_config(vocab_size or 64, hidden_size, layers, **overrides))


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
    """The image processor for `tiny_clip` inputs (32 pixels by default): `vision.clip_style_image_processor`."""
    return clip_style_image_processor(image_size)
