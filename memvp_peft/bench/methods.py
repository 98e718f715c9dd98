"""What the benchmark compares: one frozen base model, the ways of feeding it an image, and the batches they get.

Every method is built on a deep copy of one frozen base -- a built-in random Llama, a random base of a real model's
exact shape, or a local causal LM -- so that the methods differ only in how they feed the image; and every
measurement (timing, peak memory, profiling, accuracy) goes through `Method`'s uniform train / prefill / generate
calls, so that no timer branches on the method it times. ``memvp`` is this package's tuner; ``input_lora`` is
LLaVA-style input-space prompting (the same projector, its output prepended as input embeddings) + peft LoRA;
``text_lora`` is the same LoRA on the text alone, the floor every visual method pays.

`--model_shape llama-7b` (or `llama-13b`, `qwen2.5-7b`, `qwen2-vl-7b`) builds a random base of that model's exact
shape -- width, heads, KV heads, FFN size, vocabulary -- with only `--layers K` of its decoder layers, so that a
7B-class layer can be timed on one accelerator (or on the meta device in a test). A VLM shape takes N from its own
image processor run on an image of `--image_size` (Qwen2-VL: 391 tokens for 640 x 480), the sample a user of that VLM
actually sends. Speed does not depend on the weights; the full depth is
recorded so that a full-depth figure is an explicit extrapolation from per-layer times (`cost_model.fit_depths`).

`--long_context` adds MemVP's compressed memory forms: MemVP pooled 2x2 (`pool_kernel=2`: N/4 slots) and the ADEM-VL
form (`MemVPConfig.adem_vl`: multiscale slots, the `silu(x) silu(K)^T` read, 10% of each token's scores dropped).
They are built through the real `MemVPConfig` options (`memvp_form`), so the benchmark times the tuner's own code
path for each, never a re-implementation. Its memory sizes come as layouts: ``P`` (one image of P tokens),
``tiles:IxP`` or ``frames:IxP`` (I images of P tokens; a video's frames set `num_frames`), which shape the batch's
visual features.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from ..tuner.config import MemVPConfig  # importing memvp_peft.tuner registers the MEMVP peft type
from ..tuner.memory import build_projector


#: the default sweep's three methods
METHODS = ("memvp", "input_lora", "text_lora")
#: every method `--methods` takes: the three, plus MemVP's compressed memory forms (`--long_context`)
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


DEFAULT_MODEL = dict(
    vocab_size=2000, hidden_size=512, num_hidden_layers=4, intermediate_size=1376, num_attention_heads=8,
    num_key_value_heads=8,
)
QUICK_MODEL = dict(
    vocab_size=256, hidden_size=64, num_hidden_layers=2, intermediate_size=172, num_attention_heads=2,
    num_key_value_heads=2,
)

#: real models' shapes (from their published config.json files); `num_hidden_layers` is the full depth
MODEL_SHAPES: dict[str, dict[str, Any]] = {
    # LLaMA-1 7B, the paper's main model
    "llama-7b": dict(architecture="llama", vocab_size=32000, hidden_size=4096, num_hidden_layers=32,
                     intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-6,
                     max_position_embeddings=2048),
    "llama-13b": dict(architecture="llama", vocab_size=32000, hidden_size=5120, num_hidden_layers=40,
                      intermediate_size=13824, num_attention_heads=40, num_key_value_heads=40, rms_norm_eps=1e-6,
                      max_position_embeddings=2048),
    # Qwen2.5-7B: grouped-query attention (4 KV heads), biases on q/k/v, untied embeddings
    "qwen2.5-7b": dict(architecture="qwen2", vocab_size=152064, hidden_size=3584, num_hidden_layers=28,
                       intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6,
                       max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=False),
    # Qwen2-VL-7B-Instruct's language model (its text_config); the VLM's 3-D M-RoPE rotates the same head dims, so
    # the decoder costs what a Qwen2 decoder of this shape costs. Its visual tokens per image come from the VLM's
    # own image processor (`VLM_IMAGE_PROCESSORS`), not from -N.
    "qwen2-vl-7b": dict(architecture="qwen2", vocab_size=152064, hidden_size=3584, num_hidden_layers=28,
                        intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6,
                        max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=False),
}

#: the image processors of the VLM-shaped bases, as the models' published preprocessor_config.json set them:
#: (transformers class in `transformers.models.<module>`, module, constructor arguments)
VLM_IMAGE_PROCESSORS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "qwen2-vl-7b": ("Qwen2VLImageProcessorPil", "qwen2_vl",
                    dict(min_pixels=3136, max_pixels=12845056, patch_size=14, temporal_patch_size=2, merge_size=2)),
}
#: the image a VLM-shaped base is measured with unless --image_size says otherwise (COCO's typical 640 x 480)
DEFAULT_IMAGE_SIZE = (640, 480)


def visual_tokens_per_image(shape: str, width: int, height: int) -> int:
    """How many visual tokens the VLM `shape`'s own image processor makes of one `width` x `height` image: the
    number of placeholders its processor puts into ``input_ids`` -- what input-space prompting adds to every sample
    and MemVP moves into the memory instead. Counted by running transformers' processor on an image of that size
    (its resize to the patch grid, its min/max pixels, its token merge), not by re-deriving its arithmetic."""
    if shape not in VLM_IMAGE_PROCESSORS:
        raise ValueError(f"{shape!r} is not a VLM shape with an image processor; VLM shapes: "
                         f"{', '.join(VLM_IMAGE_PROCESSORS)}")
    if width < 1 or height < 1:
        raise ValueError(f"an image size needs a positive width and height, got {width} x {height}")
    import importlib

    from PIL import Image

    class_name, module, kwargs = VLM_IMAGE_PROCESSORS[shape]
    processor = getattr(importlib.import_module(f"transformers.models.{module}"), class_name)(**kwargs)
    grid = processor(images=[Image.new("RGB", (width, height))], return_tensors="pt")["image_grid_thw"]
    return int(grid.prod()) // processor.merge_size ** 2


def full_depth(shape: Optional[str]) -> Optional[int]:
    """The real model's number of decoder layers (None for the built-in and local models: no full depth to reach)."""
    return MODEL_SHAPES[shape]["num_hidden_layers"] if shape else None


def shape_config(shape: str, layers: int, min_positions: int = 0, attn_implementation: str = "sdpa") -> Any:
    """The transformers config of `shape` with `layers` decoder layers (everything else exactly the real model's).

    `min_positions` raises `max_position_embeddings` where the benchmark's longest sequence needs it (RoPE has no
    learned position table, so this changes no weight shape).
    """
    if shape not in MODEL_SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; known: {', '.join(MODEL_SHAPES)}")
    if layers < 1:
        raise ValueError(f"a model shape needs at least 1 layer, got {layers}")
    fields = dict(MODEL_SHAPES[shape])
    architecture = fields.pop("architecture")
    fields.update(num_hidden_layers=layers, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  max_position_embeddings=max(fields["max_position_embeddings"], min_positions),
                  attn_implementation=attn_implementation)
    if architecture == "qwen2":
        from transformers import Qwen2Config

        config = Qwen2Config(**fields)
    else:
        from transformers import LlamaConfig

        config = LlamaConfig(**fields)
    return config


def instantiate(config: Any, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """A random-initialised causal LM of `config`, created directly on `device` (no multi-GB CPU detour for a
    7B-class layer; ``"meta"`` allocates nothing) and cast to `dtype`."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config)
    return model.to(dtype)


def longest_sequence(args: argparse.Namespace) -> int:
    """The longest sequence of the sweep: N visual + T text tokens + the generated ones (+ a margin)."""
    return max(args.num_visual_tokens) + max(args.text_lengths) + args.new_tokens + 8


def built_in_shape(args: argparse.Namespace, layers: Optional[int] = None,
                   quick_shape: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The built-in Llama's config fields: `DEFAULT_MODEL` (``--quick``: `quick_shape`, default `QUICK_MODEL`) with
    ``--hidden_size`` (heads of 64), ``--intermediate_size``, ``--vocab_size`` and `layers` decoder layers."""
    shape = dict((quick_shape or QUICK_MODEL) if args.quick else DEFAULT_MODEL)
    for key in ("hidden_size", "intermediate_size", "vocab_size"):
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    if layers is not None:
        shape["num_hidden_layers"] = layers
    if args.hidden_size is not None:
        shape["num_attention_heads"] = shape["num_key_value_heads"] = max(1, args.hidden_size // 64)
    return shape


def build_base_model(args: argparse.Namespace, layers: Optional[int] = None) -> nn.Module:
    """The frozen base on ``args.device`` in ``args.dtype``: a local HF causal LM (``--model_name_or_path``), a random
    base of a real model's shape (``--model_shape``), or a seeded random Llama of the chosen shape -- with `layers`
    decoder layers where given (the depth of this part of the sweep), long enough for the longest prompt."""
    from transformers import LlamaConfig

    device = getattr(args, "device", "cpu")
    dtype = getattr(torch, getattr(args, "dtype", "float32"))
    chosen = getattr(args, "attn_implementation", None)  # None: SDPA for built models, a local model's own default
    attn = chosen or "sdpa"
    torch.manual_seed(args.seed)
    if args.model_name_or_path:
        from transformers import AutoModelForCausalLM

        extra = {} if chosen is None else {"attn_implementation": chosen}
        model = AutoModelForCausalLM.from_pretrained(
            args.model_name_or_path, local_files_only=True, dtype=dtype, **extra
        ).to(device)
    elif getattr(args, "model_shape", None):
        config = shape_config(args.model_shape, layers or 1, longest_sequence(args), attn)
        model = instantiate(config, device, dtype)
    else:
        shape = built_in_shape(args, layers)
        config = LlamaConfig(**shape, max_position_embeddings=max(2048, longest_sequence(args)), pad_token_id=0,
                             bos_token_id=1, eos_token_id=2, attn_implementation=attn)
        if str(device) == "cpu" and dtype == torch.float32:
            from transformers import LlamaForCausalLM

            model = LlamaForCausalLM(config)  # exactly the CPU benchmark's construction (same seeded weights)
        else:
            model = instantiate(config, device, dtype)
    model.requires_grad_(False)
    return model


def describe_model(model: nn.Module) -> dict[str, Any]:
    """The base's shape under one set of names, whichever of the usual config spellings it uses."""
    config = model.config
    get = lambda *names: next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)  # noqa: E731
    return {
        "model_type": getattr(config, "model_type", type(model).__name__),
        "hidden_size": get("hidden_size", "d_model", "n_embd"),
        "num_layers": get("num_hidden_layers", "n_layer"),
        "intermediate_size": get("intermediate_size", "ffn_dim", "n_inner"),
        "num_attention_heads": get("num_attention_heads", "n_head"),
        "num_key_value_heads": get("num_key_value_heads"),
        "vocab_size": get("vocab_size"),
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "attn_implementation": getattr(config, "_attn_implementation", None),
    }


DEFAULT_LAYOUTS = ("256", "576", "tiles:4x576", "frames:16x256")
QUICK_LAYOUTS = ("16", "frames:4x16")


def parse_layout(spec: str) -> tuple[int, int, str]:
    """``"576"`` -> (1, 576, "image"), ``"tiles:4x576"`` -> (4, 576, "tiles"), ``"frames:16x256"`` -> (16, 256,
    "frames"): images per sample, visual tokens per image, and what the images are."""
    kind, _, shape = spec.rpartition(":")
    parts = shape.lower().split("x")
    ok = kind in ("", "tiles", "frames") and all(p.isdigit() and int(p) > 0 for p in parts)
    if not ok or len(parts) not in (1, 2) or (kind and len(parts) != 2) or (not kind and len(parts) != 1):
        raise ValueError(f"a layout is P, tiles:IxP or frames:IxP (I images of P visual tokens), got {spec!r}")
    if not kind:
        return 1, int(parts[0]), "image"
    return int(parts[0]), int(parts[1]), kind


def describe_layout(layout: tuple[int, int, str]) -> str:
    images, tokens, kind = layout
    return f"1 image of {tokens}" if kind == "image" else f"{images} {kind} of {tokens}"


def layout_for(args: argparse.Namespace, visual_tokens: int) -> tuple[int, int, str]:
    """The layout of the point with `visual_tokens` (one image of N tokens outside ``--long_context``)."""
    return getattr(args, "layouts", None) and args.layouts.get(visual_tokens) or (1, visual_tokens, "image")


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


def count_trainable(modules: list[nn.Module]) -> int:
    """Trainable parameters of `modules`, each counted once even where modules share it."""
    seen, total = set(), 0
    for module in modules:
        for param in module.parameters():
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                total += param.numel()
    return total


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
    ``MemVPConfig.adem_vl``, ``num_frames``...; see `memvp_form` below), so the benchmark times the tuner's own
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


def memvp_form(name: str, layout: tuple[int, int, str]) -> tuple[Callable[..., MemVPConfig], dict[str, Any]]:
    """How `name`'s `MemVPConfig` is made for `layout`: the constructor (the ADEM-VL preset for ``memvp_adem``) and
    the options, all real `MemVPConfig` fields -- ``pool_kernel=2``; ADEM-VL's multiscale slots of each image's grid
    plus its 2x2 pool (their [256, 64] for a 16x16 grid); ``num_frames`` for a video."""
    images, tokens, kind = layout
    options: dict[str, Any] = {"num_frames": images} if kind == "frames" else {}
    if name == "memvp":
        return MemVPConfig, options
    if name == "memvp_pooled":
        return MemVPConfig, {**options, "pool_kernel": 2}
    if name == "memvp_adem":
        # ADEM-VL's memory on precomputed features: its CLS input token and CLIP adapters need an encoder's pixels
        return MemVPConfig.adem_vl, {**options, "multiscale_tokens": [tokens, tokens // 4], "cls_token": False,
                                     "vision_adapter_dim": 0}
    raise ValueError(f"{name!r} is no MemVP memory form; known: {', '.join(MEMVP_FORMS)}")


def form_slots(name: str, layout: tuple[int, int, str], args: argparse.Namespace) -> tuple[int, int]:
    """(memory slots, tokens the projector runs on) of form `name`: `MemVPConfig.memory_tokens` of the layout (the
    visual slots after compression, which is also what the projector sees) + ``--extra_slots`` learned slots."""
    make_config, options = memvp_form(name, layout)
    probe = make_config(visual_dim=args.visual_dim, num_memory_slots=1, task_type="CAUSAL_LM", **options)
    visual = probe.memory_tokens(layout[1], layout[0])
    return visual + args.extra_slots, visual


def build_memvp_method(name: str, base: nn.Module, args: argparse.Namespace, visual_tokens: int) -> MemVPMethod:
    """Form `name` of MemVP on `base` (consumed: peft modifies it in place) for the point with `visual_tokens`."""
    layout = layout_for(args, visual_tokens)
    make_config, options = memvp_form(name, layout)
    slots, _ = form_slots(name, layout, args)
    return MemVPMethod(base, args.visual_dim, slots, args.projector_hidden_dim, name=name, make_config=make_config,
                       options=options)


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
