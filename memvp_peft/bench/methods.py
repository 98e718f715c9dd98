"""The three ways of feeding an image that the benchmark compares, behind one interface.

Every measurement (timing, peak memory, profiling, accuracy) goes through `Method`'s uniform train / prefill /
generate calls, so no timer branches on the method it times. ``memvp`` is this package's tuner; ``input_lora`` is
LLaVA-style input-space prompting (the same projector, its output prepended as input embeddings) + peft LoRA;
``text_lora`` is the same LoRA on the text alone, the floor every visual method pays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from ..tuner.config import MemVPConfig  # importing memvp_peft.tuner registers the MEMVP peft type
from ..tuner.memory import build_projector


#: the default sweep's three methods
METHODS = ("memvp", "input_lora", "text_lora")
#: every method `--methods` takes: the three, plus MemVP's compressed memory forms (issue 15, `--long_context`)
ALL_METHODS = ("memvp", "memvp_pooled", "memvp_adem", "input_lora", "text_lora")
#: the methods whose visual path is a MemVP memory (the FLOP model and the ratios treat them alike)
MEMVP_FORMS = ("memvp", "memvp_pooled", "memvp_adem")
METHOD_LABELS = {
    "memvp": "MemVP",
    "memvp_pooled": "MemVP pooled 2x2",
    "memvp_adem": "ADEM-VL form",
    "input_lora": "input-space + LoRA",
    "text_lora": "text only + LoRA",
}


def count_trainable(modules: list[nn.Module]) -> int:
    """Trainable parameters of `modules`, each counted once even where modules share it."""
    seen, total = set(), 0
    for module in modules:
        for param in module.parameters():
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                total += param.numel()
    return total


@dataclass
class Batch:
    """One benchmark batch: the text (labels = ids) and the visual features each method feeds its own way."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    image_features: torch.Tensor

    @property
    def flat_features(self) -> torch.Tensor:
        """The features as (B, N, D): several images per sample, (B, I, P, D), are concatenated in order, which is
        how input-space prompting prepends them (and how MemVP lays them out in its slots)."""
        features = self.image_features
        return features.flatten(1, 2) if features.dim() == 4 else features

    @property
    def visual_tokens(self) -> int:
        """N: visual tokens per sample, over all its images."""
        return self.flat_features.shape[1]


class Method:
    """One way of feeding the image: uniform train / prefill / generate calls for the benchmark."""

    name: str
    model: nn.Module

    def trainable_modules(self) -> list[nn.Module]:
        return [self.model]

    @property
    def device(self) -> torch.device:
        """Where the method's model lives (the timers synchronise and clock this device)."""
        return next(self.model.parameters()).device

    def trainable_parameters(self) -> int:
        return count_trainable(self.trainable_modules())

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.trainable_modules() for p in m.parameters() if p.requires_grad]

    def zero_grad(self) -> None:
        for param in self.parameters():
            param.grad = None

    def train(self, mode: bool = True) -> None:
        for module in self.trainable_modules():
            module.train(mode)

    #: whether `generate` returns the prompt in front of the new tokens (not with `inputs_embeds`)
    returns_prompt = True

    def inputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The model's keyword inputs for `batch` (without labels)."""
        raise NotImplementedError

    def labels(self, batch: Batch) -> torch.Tensor:
        return batch.labels

    def loss(self, batch: Batch) -> torch.Tensor:
        return self.model(**self.inputs(batch), labels=self.labels(batch)).loss

    def prefill(self, batch: Batch) -> Any:
        return self.model(**self.inputs(batch), use_cache=True, logits_to_keep=1)

    def generate(self, batch: Batch, new_tokens: int, **kwargs: Any) -> torch.Tensor:
        return self.model.generate(**self.inputs(batch), **_generate_kwargs(self.model, new_tokens), **kwargs)

    def new_tokens(self, batch: Batch, output: torch.Tensor) -> torch.Tensor:
        """The generated tokens of `generate`'s output (the prompt removed where it was returned)."""
        return output[:, batch.input_ids.shape[1] :] if self.returns_prompt else output

    def visual_state_bytes(self, batch: Batch) -> int:
        """Bytes of per-call state besides the KV cache (MemVP's keys/values of the memory)."""
        return 0

    def sequence_length(self, batch: Batch) -> int:
        return batch.input_ids.shape[1]


def _generate_kwargs(model: nn.Module, new_tokens: int) -> dict[str, Any]:
    """Greedy generation of exactly `new_tokens` tokens, with a pad id (the config's, else its eos, else 0)."""
    config = model.config if hasattr(model, "config") else None
    pad = getattr(config, "pad_token_id", None)
    eos = getattr(config, "eos_token_id", None)
    pad = pad if pad is not None else (eos if isinstance(eos, int) else 0)
    return dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1, pad_token_id=pad)


class MemVPMethod(Method):
    """This package's tuner: the features go into the FFN memory, the sequence stays T tokens long.

    `name` / `make_config` / `options` select a memory form through the real `MemVPConfig` options (``pool_kernel``,
    ``MemVPConfig.adem_vl``, ``num_frames``...; see `long_context.memvp_form`), so the benchmark times the tuner's own
    code path for each, never a re-implementation."""
    name = "memvp"

    def __init__(self, base: nn.Module, visual_dim: int, num_slots: int, projector_hidden_dim: int,
                 name: str = "memvp", make_config: Callable[..., MemVPConfig] = MemVPConfig,
                 options: Optional[dict[str, Any]] = None) -> None:
        self.name = name
        self.num_slots = num_slots
        config = make_config(
            visual_dim=visual_dim, num_memory_slots=num_slots, projector_hidden_dim=projector_hidden_dim,
            task_type="CAUSAL_LM", **(options or {}),
        )
        self.model = get_peft_model(base, config)

    def inputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                "image_features": batch.image_features}

    def visual_state_bytes(self, batch: Batch) -> int:
        """K and V of the memory, (B, n, d) each: fp32 from the projector, plus their copy in the compute dtype
        that the layers read when the base is not fp32 (made once per call, see `MemoryState.for_input`)."""
        weight = self.model.get_input_embeddings().weight
        per_copy = 2 * batch.input_ids.shape[0] * self.num_slots * weight.shape[1]
        return per_copy * 4 + (0 if weight.dtype == torch.float32 else per_copy * weight.element_size())


class LoRAMethod(Method):
    """peft LoRA on the frozen base; with ``visual=True`` the projected features are prepended as input embeddings."""

    def __init__(
        self, base: nn.Module, visual: bool, visual_dim: int, projector_hidden_dim: int, lora_r: int,
        lora_alpha: int, lora_dropout: float, target_modules: list[str],
    ) -> None:
        self.name = "input_lora" if visual else "text_lora"
        self.visual = visual
        self.returns_prompt = not visual  # generate() from inputs_embeds returns only the new tokens
        config = LoraConfig(
            r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules,
            task_type="CAUSAL_LM",
        )
        self.model = get_peft_model(base, config)
        embeddings = self.model.get_input_embeddings().weight
        # the projector stays fp32, like MemVP's (its output is cast to the compute dtype of the embeddings)
        self.projector = (build_projector(visual_dim, projector_hidden_dim, embeddings.shape[1]).to(embeddings.device)
                          if visual else None)

    def trainable_modules(self) -> list[nn.Module]:
        return [self.model] + ([self.projector] if self.projector is not None else [])

    def inputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        if not self.visual:
            return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        embeds = self.model.get_input_embeddings()(batch.input_ids)
        visual = self.projector(batch.flat_features.to(self.projector[0].weight.dtype)).to(embeds.dtype)
        ones = torch.ones(visual.shape[:2], dtype=batch.attention_mask.dtype, device=embeds.device)
        return {
            "inputs_embeds": torch.cat([visual, embeds], dim=1),
            "attention_mask": torch.cat([ones, batch.attention_mask], dim=1),
        }

    def labels(self, batch: Batch) -> torch.Tensor:
        if not self.visual:
            return batch.labels
        ignore = torch.full((batch.input_ids.shape[0], batch.visual_tokens), -100, dtype=batch.labels.dtype,  # no loss on the image
                            device=batch.labels.device)
        return torch.cat([ignore, batch.labels], dim=1)

    def sequence_length(self, batch: Batch) -> int:
        return batch.input_ids.shape[1] + (batch.visual_tokens if self.visual else 0)


def make_batch(batch_size: int, text_len: int, visual_tokens: int, visual_dim: int, vocab: int, seed: int,
               device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, images: int = 1) -> Batch:
    """A seeded random batch: token ids from 4 up (the lowest ids are special tokens) and Gaussian visual features,
    (B, N, D) -- or (B, images, N / images, D) for several images (tiles, frames) per sample.

    Drawn on the CPU (the same numbers on every device), then moved to `device`; the features come in the compute
    `dtype`, as a vision encoder running in that dtype delivers them.
    """
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (batch_size, text_len), generator=generator)
    if images < 1 or visual_tokens % images:
        raise ValueError(f"make_batch: {visual_tokens} visual tokens do not split into {images} equal images")
    features = torch.randn(batch_size, visual_tokens, visual_dim, generator=generator)
    if images > 1:
        features = features.reshape(batch_size, images, visual_tokens // images, visual_dim)
    return Batch(
        input_ids=ids.to(device),
        attention_mask=torch.ones_like(ids).to(device),
        labels=ids.clone().to(device),
        image_features=features.to(device=device, dtype=dtype),
    )
