"""VLM bases and the families whose own processor's batches MemVP reads: one object per family, picked once.

A VLM's processor puts every image into the text as placeholder tokens (hundreds per image) and hands the pixels
beside it in the family's own layout (Llava: one `(C, H, W)` per image of the whole batch; LLaVA-NeXT: the tiles of
each image plus its `image_sizes`; Qwen2-VL: flattened patches plus `image_grid_thw`). MemVP puts the image into the
FFN memory instead, so with such a batch it must (1) take the placeholders out of the sequence and (2) hand each
row's images to that row's memory. What (1) and (2) need to know is the family's, not the tuner's: which token ids
the processor writes, how many of them each image stands for, which keywords come beside `pixel_values`, and which
tower turns the pixels into features. A `VLMFamily` holds exactly that; `family_of(model)` picks it once, when an
adapter is injected on a VLM base (by `config.model_type`), and the tuner's entry (`tuner/entry.py`) asks it,
never the model's class, so adding a family is adding a subclass here (like peft's LoRA variants).

Token ids are read from the model's config (`image_token_id` / `image_token_index`, `video_token_id`, begin/end of
image where the family has them), never hard-coded: checkpoints of one family disagree on them.

Which tower MemVP reads, and where (Qwen-VL, whose tower needs each image's grid and ends in a patch merger, says its
own in `QwenVLFamily`): for the Llava-layout families (Llava, LLaVA-NeXT, LLaVA-OneVision) the VLM's own
`vision_tower`, through `VisionEncoder`, at the hidden state the adapter's config selects -- *before* the VLM's
multi-modal projector, as MemVP reads CLIP's penultimate block. The VLM's projector maps the tower's features into
the language model's *input* space for the tokens it puts in the sequence; MemVP's own projector maps them into the
FFN memory, a different space the VLM's projector never learnt, so it stays frozen and never runs.
Gemma 3 (SigLIP `vision_tower` before its pooling projector) and Idefics3 / SmolVLM (`vision_model` before the
connector's pixel shuffle) are read the same way; their class docstrings say what that costs in memory slots.
Mistral 3's Pixtral tower is read before its projector too (the patch merger is part of that projector), but by the
family itself, each image at its own size (`Mistral3Family`). Markers the config names no id for (Idefics3's crop
markers, Mistral 3's row and image ends) are found by where they stand (`image_marking_tokens`).

The module also keeps the helpers that tell a VLM base from a language model (`has_own_vision_model`), find a
Llava-layout tower (`vlm_vision_tower`, `is_vlm`: any model with that layout, with or without a family; without one
the batch must come without placeholders, e.g. from `MemVPProcessor`) and name the modules beside its language model
(`vlm_modules_outside_language_model`).
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, NamedTuple, Optional, Sequence

import torch
from torch import nn

__all__ = [
    "FAMILIES",
    "Gemma3Family",
    "Idefics3Family",
    "LlavaFamily",
    "LlavaLayoutFamily",
    "LlavaNextFamily",
    "LlavaOnevisionFamily",
    "Mistral3Family",
    "ProcessorImages",
    "QwenVLFamily",
    "VLMFamily",
    "config_token_id",
    "family_of",
    "has_own_vision_model",
    "is_vlm",
    "supported_families",
    "unread_tower_message",
    "unsupported_vlm_message",
    "vlm_modules_outside_language_model",
    "vlm_vision_tower",
]


# ------------------------------------------------------------------------------------------------- VLM bases


def config_token_id(config: Any, *names: str) -> Optional[int]:
    """The first of `names` that `config` sets to an int (transformers maps `image_token_id` to `image_token_index`
    on some configs and not on others, so both spellings are read)."""
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def vlm_vision_tower(model: nn.Module) -> Optional[nn.Module]:
    """The vision tower of a Llava-layout VLM (`model.model.vision_tower` / `model.vision_tower`), else None."""
    for owner in (getattr(model, "model", None), model):
        tower = getattr(owner, "vision_tower", None)
        if isinstance(tower, nn.Module):
            return tower
    return None


def is_vlm(model: Any) -> bool:
    """A Llava-layout VLM: MemVP reads `pixel_values` through its own tower (`vlm_vision_tower`)."""
    return vlm_vision_tower(model) is not None and hasattr(model, "get_image_features")


def has_own_vision_model(model: Any) -> bool:
    """Whether the base brings a vision model of its own (its config has a `vision_config`): any VLM, whether or not
    MemVP can read its tower (`is_vlm`)."""
    return getattr(getattr(model, "config", None), "vision_config", None) is not None


def unread_tower_message(model_class: str) -> str:
    """What a VLM base whose tower MemVP cannot read (neither the Llava layout nor a family's: Idefics3 and kin) gives
    and takes."""
    return (
        f"the base {model_class} is a VLM whose vision tower MemVP does not read yet (it reads the tower of "
        "Llava-layout VLMs, a `vision_tower` beside the language model, and those of the families "
        f"{supported_families()}): the adapter goes on its language model and "
        "takes `image_features` (batch, tokens, visual_dim) computed elsewhere, but not this VLM's `pixel_values`. To "
        "give it images as pixels, set MemVPConfig(vision_encoder=<a CLIP/SigLIP folder or Hub id>) and build batches "
        "with that encoder's image processor (memvp_peft.MemVPDataCollator / MemVPProcessor), or use a "
        "VLM of a supported family."
    )


def unsupported_vlm_message(model_class: str) -> str:
    """Why a VLM base of no supported family is refused at injection, and what to do instead.

    Without a family MemVP knows neither which placeholders that VLM's processor writes nor how its pixels become
    features, so an adapter on it would only fail once `pixel_values` arrive -- or, worse, train on a batch whose
    images the memory never sees. A separate encoder (`vision_encoder`) is the one way such a base is taken: the
    VLM's own image path then never runs (its placeholders are refused at the call), the encoder reads the pixels
    and `image_features` computed with that same encoder are read as they come."""
    return (
        f"the base {model_class} is a VLM of no family MemVP supports (supported families: "
        f"{supported_families()}), so MemVP cannot read its processor's batches nor its own vision tower. Use a VLM "
        "of a supported family, or keep this base's language model and give the adapter a separate encoder: "
        "MemVPConfig(vision_encoder=<a built CLIP/SigLIP vision model, a local folder or a Hub id>), with batches "
        "from that encoder's image processor (memvp_peft.MemVPProcessor / MemVPDataCollator) or `image_features` "
        "that encoder computed."
    )


def vlm_modules_outside_language_model(model: nn.Module) -> list[str]:
    """Qualified names of the modules of a VLM base that sit beside its language model: the vision tower and the
    multi-modal projector (every sibling of the language model in the VLM's inner model, the LM head excepted).
    Empty for any other model.

    Why they matter: MemVP runs a VLM's language model on the text alone; the tower runs frozen, without gradients,
    to turn `pixel_values` into features (`VisionEncoder`) -- a tower MemVP cannot read (`unread_tower_message`)
    never runs -- and the VLM's own projector never runs (MemVP's replaces it). Trainable weights placed there would
    never get a gradient.
    """
    tower = vlm_vision_tower(model) if is_vlm(model) else None
    if tower is None and not has_own_vision_model(model):
        return []
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    anchor = tower if tower is not None else decoder  # a tower MemVP cannot read never runs: all beside the LM
    if anchor is None:
        return []
    for owner_name, owner in model.named_modules():
        children = dict(owner.named_children())
        if any(child is anchor for child in children.values()):
            prefix = f"{owner_name}." if owner_name else ""
            if decoder is None or all(child is not decoder for child in children.values()):
                # the language model is not the tower's sibling: only the tower is known to be outside it
                return [prefix + name for name, child in children.items() if child is tower]
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            return [prefix + name for name, child in children.items()
                    if child is not decoder and not any(module is head for module in child.modules())]
    return []


# ------------------------------------------------------------------------------------------------ the families


class ProcessorImages(NamedTuple):
    """The images of one call as the VLM's processor gave them: `pixel_values` in the family's layout and the
    keywords it adds beside them (`image_sizes`, ...), by name."""

    pixel_values: torch.Tensor
    keywords: dict[str, Any]


class VLMFamily(abc.ABC):
    """What MemVP must know of one VLM family to read a batch its own processor built (module docstring).

    A subclass names the family (`name`), the `config.model_type`s it covers (`model_types`), the keywords its
    processor adds beside `pixel_values` that MemVP reads (`image_keywords`: taken out of the call) and those it
    refuses (`refused_keywords`: a ValueError, never dropped), and implements the four abstract methods: which tower
    MemVP's `VisionEncoder` reads (`encoder_tower`), how many placeholder tokens each image stands for
    (`image_token_counts`), and how the images of each row become MemVP's visual inputs (`memvp_visual_inputs`).
    Everything that is the same for every family -- the token ids from the config, assigning images to rows by their
    placeholders, the checks -- is here, so a family that differs overrides it (e.g. `images_of_rows` for a processor
    that already groups images by row). A family whose tower is run by the family itself checks an adapter's config
    against it at injection (`check_config`).
    """

    #: The family's name, as messages and docs say it.
    name: ClassVar[str]
    #: The `config.model_type`s this family covers.
    model_types: ClassVar[tuple[str, ...]]
    #: Keywords the processor adds beside `pixel_values` that MemVP reads; taken out of the call.
    image_keywords: ClassVar[tuple[str, ...]] = ()
    #: Keywords the processor may add that MemVP does not read (videos, ...): refused, so nothing is silently dropped.
    refused_keywords: ClassVar[tuple[str, ...]] = ()
    #: Why those are refused, as the message says it.
    refused_because: ClassVar[str] = ""
    #: Whether the processor tiles high-resolution images itself (then an adapter's own `image_grid` tiling is refused).
    tiles_images: ClassVar[bool] = False
    #: Config attributes of the tokens around an image (begin / end of image), removed with the placeholders.
    boundary_token_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module) -> None:
        config = model.config
        self.model_type: str = config.model_type
        self.image_token_id = config_token_id(config, "image_token_id", "image_token_index")
        if self.image_token_id is None:
            raise ValueError(
                f"MemVP: the {self.name} base {type(model).__name__} has no image token in its config "
                "(image_token_id / image_token_index): the placeholders its processor writes cannot be found."
            )
        self.video_token_id = config_token_id(config, "video_token_id", "video_token_index")
        boundaries = (config_token_id(config, name) for name in self.boundary_token_names)
        self.boundary_token_ids = tuple(token for token in boundaries if token is not None)

    @classmethod
    def covers(cls, model: nn.Module) -> bool:
        """Whether `model` belongs to this family (by `config.model_type`)."""
        return getattr(getattr(model, "config", None), "model_type", None) in cls.model_types

    @property
    def sequence_token_ids(self) -> tuple[int, ...]:
        """Every token id MemVP takes out of the sequence: the image placeholder and the tokens around an image."""
        return (self.image_token_id, *self.boundary_token_ids)

    def image_marking_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Where `input_ids` hold a token that marks an image (True): what MemVP takes out of the sequence with the
        images. By id (`sequence_token_ids`); a family whose markers have no id in the config finds them otherwise."""
        return torch.isin(input_ids, torch.tensor(self.sequence_token_ids, device=input_ids.device))

    def image_sizes(self, images: ProcessorImages, pixel_layout: str, why: str) -> list[list[int]]:
        """The processor's `image_sizes` beside its `pixel_values`: one `[height, width]` per image, refused (saying
        `why` they are needed) when missing, and refused when they do not pair with `pixel_values` laid out as
        `pixel_layout` (its dimensions' names, e.g. "images, channels, height, width")."""
        sizes = images.keywords.get("image_sizes")
        pixel_values = images.pixel_values
        if sizes is None:
            raise ValueError(f"MemVP: the {self.name} processor's `image_sizes` are needed with its `pixel_values` "
                             f"({why}); the call has none.")
        sizes = torch.as_tensor(sizes).tolist()
        dims = len(pixel_layout.split(","))
        if pixel_values.dim() != dims or len(sizes) != pixel_values.shape[0] or any(len(s) != 2 for s in sizes):
            raise ValueError(
                f"MemVP: the {self.name} processor gives `pixel_values` ({pixel_layout}) and `image_sizes` (images, "
                f"2); got shapes {tuple(pixel_values.shape)} and {len(sizes)} sizes."
            )
        return sizes

    # ----------------------------------------------------------------------------------------- what a subclass says

    @abc.abstractmethod
    def encoder_tower(self, model: nn.Module) -> Optional[nn.Module]:
        """The tower MemVP's `VisionEncoder` reads `pixel_values` with (attached at injection), or None for a family
        whose `memvp_visual_inputs` computes features itself (a tower `VisionEncoder` cannot read, e.g. Qwen2-VL's
        `model.model.visual`, which needs `image_grid_thw`: it then returns `image_features`)."""

    @abc.abstractmethod
    def image_token_counts(self, images: ProcessorImages) -> list[int]:
        """How many image placeholder tokens each image of the call stands for in `input_ids`, in the order the
        processor lists the images (the model's own count: Llava's patches, LLaVA-NeXT's unpadded grid with its
        newlines, Qwen2-VL's `t*h*w / merge**2` of `image_grid_thw`). Checked against the text row by row: a
        mismatch is refused, never guessed around."""

    @abc.abstractmethod
    def memvp_visual_inputs(self, images: ProcessorImages, rows: list[list[int]],
                            configs: Sequence[Any] = ()) -> dict[str, torch.Tensor]:
        """The call's images as MemVP's visual inputs, row by row: `rows[b]` lists the indices of row b's images
        (`images_of_rows`); `configs` are the active adapters' configs (a family that runs its tower itself reads
        the hidden state they select). Returns the keywords `MemoryRuntime.build` takes: `pixel_values`
        `(B, I, C, H, W)` with an `image_mask` `(B, I)` (the Llava layout: the attached `VisionEncoder` reads them), or
        `image_features` `(B, T, D)` with an `image_mask` -- or in the variable form, one list of `(tokens,
        visual_dim)` tensors per row -- for a family that encodes itself (`encoder_tower` None). Rows with fewer
        images are padded with masked-out entries; a row without an image has an all-False mask or an empty list (it
        reads p_k/p_v)."""

    def check_config(self, config: Any) -> None:
        """Refuse, when an adapter is injected, a `MemVPConfig` this family cannot read its tower with (the default
        checks nothing: a `VisionEncoder` tower is checked by `checked_vision`)."""

    # --------------------------------------------------------------------------------------------- the same for all

    def take_image_inputs(self, pixel_values: torch.Tensor, kwargs: dict[str, Any]) -> ProcessorImages:
        """Take the family's image keywords out of the call's `kwargs` (they never reach the language model);
        refuse the keywords MemVP does not read."""
        refused = [name for name in self.refused_keywords if kwargs.get(name) is not None]
        if refused:
            raise ValueError(f"MemVP: {refused} came with the call: {self.refused_because}")
        if not isinstance(pixel_values, torch.Tensor):
            raise ValueError(f"MemVP: `pixel_values` must be a torch.Tensor, got {type(pixel_values).__name__}.")
        return ProcessorImages(pixel_values, {name: kwargs.pop(name) for name in self.image_keywords if name in kwargs})

    def check_unread_tokens(self, input_ids: torch.Tensor) -> None:
        """Refuse video placeholders: MemVP reads the call's images, and the frames behind these tokens would be
        dropped with them."""
        if self.video_token_id is not None and bool((input_ids == self.video_token_id).any()):
            raise ValueError(
                f"MemVP: `input_ids` contain the {self.name} video placeholder token (id {self.video_token_id}): "
                "MemVP takes images out of the sequence, not videos. Build the batch from images only."
            )

    def images_of_rows(self, input_ids: torch.Tensor, real: torch.Tensor, images: ProcessorImages) -> list[list[int]]:
        """Which images belong to which row: the processor lists the batch's images in order, and each row's
        placeholder tokens (at its `real`, not padded, positions) must be exactly the tokens of its images
        (`image_token_counts`). A row whose tokens do not add up, or images left over or missing, are refused."""
        counts = self.image_token_counts(images)
        per_row = ((input_ids == self.image_token_id) & real).sum(dim=1).tolist()
        rows: list[list[int]] = []
        taken = 0
        for row, tokens in enumerate(per_row):
            indices: list[int] = []
            total = 0
            while total < tokens and taken < len(counts):
                total += counts[taken]
                indices.append(taken)
                taken += 1
            if total != tokens:
                raise ValueError(
                    f"MemVP: row {row} of `input_ids` holds {tokens} image placeholder tokens (id "
                    f"{self.image_token_id}), which do not add up to whole images: the call's {self.name} images stand "
                    f"for {counts} tokens (in order), this row's for {total}. The text's placeholders must match its "
                    "images: build text and images with the same processor call."
                )
            rows.append(indices)
        if taken != len(counts):
            raise ValueError(
                f"MemVP: the call brings {len(counts)} images but the placeholders of `input_ids` stand for {taken}: "
                "each image needs its placeholder in the text (the processor writes them for each image of a text)."
            )
        return rows

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_token_id={self.image_token_id})"


class LlavaLayoutFamily(VLMFamily):
    """Families with Llava's layout: a `vision_tower` beside the language model, read by `VisionEncoder` (before the
    multi-modal projector: module docstring). Every image is one or more tiles of the tower's input size; the memory
    holds each row's tiles in order, each tile's patch features as the adapter's config selects them. A subclass says
    which tiles an image has (`image_tiles`) and how many placeholders it stands for (`image_token_counts`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        config = model.config
        self.patch_size = int(config.vision_config.patch_size)
        self.tile_size = int(config.vision_config.image_size)
        self.select_strategy = getattr(config, "vision_feature_select_strategy", "default")
        tower = vlm_vision_tower(model)
        embeddings = getattr(getattr(tower, "vision_model", tower), "embeddings", None)
        self.has_cls = hasattr(embeddings, "class_embedding")

    def encoder_tower(self, model: nn.Module) -> Optional[nn.Module]:
        return vlm_vision_tower(model)

    def tokens_per_tile(self, height: int, width: int) -> int:
        """The tokens the VLM puts in the sequence for one tile of `height` x `width` pixels: its patches, plus the
        CLS token unless the VLM's `vision_feature_select_strategy` is "default" (which drops the first token)."""
        return (height // self.patch_size) * (width // self.patch_size) + int(self.has_cls) - int(
            self.select_strategy == "default")

    @abc.abstractmethod
    def image_tiles(self, images: ProcessorImages) -> list[torch.Tensor]:
        """Each image's tiles as the tower reads them, `(tiles, C, H, W)`, in the processor's order (padding tiles
        the processor added to stack the batch left out)."""

    def whole_images(self, images: ProcessorImages) -> list[torch.Tensor]:
        """`image_tiles` of a processor that hands each image whole, `(images, C, H, W)` for the whole batch: one
        tile per image."""
        pixel_values = images.pixel_values
        if pixel_values.dim() != 4:
            raise ValueError(
                f"MemVP: a {self.name} processor's `pixel_values` are (images, channels, height, width), one image "
                f"after the other for the whole batch; got shape {tuple(pixel_values.shape)}."
            )
        return list(pixel_values[:, None])

    def memvp_visual_inputs(self, images: ProcessorImages, rows: list[list[int]],
                            configs: Sequence[Any] = ()) -> dict[str, torch.Tensor]:
        tiles = self.image_tiles(images)
        per_row = [torch.cat([tiles[i] for i in indices]) if indices else None for indices in rows]
        longest = max((len(row) for row in per_row if row is not None), default=0)
        shape = tiles[0].shape[1:] if tiles else images.pixel_values.shape[-3:]
        reference = images.pixel_values
        pixel_values = reference.new_zeros(len(rows), max(longest, 1), *shape)
        image_mask = torch.zeros(len(rows), max(longest, 1), dtype=torch.bool, device=reference.device)
        for row, row_tiles in enumerate(per_row):
            if row_tiles is not None:
                pixel_values[row, : len(row_tiles)] = row_tiles
                image_mask[row, : len(row_tiles)] = True
        return {"pixel_values": pixel_values, "image_mask": image_mask}


class LlavaFamily(LlavaLayoutFamily):
    """Llava (`LlavaForConditionalGeneration`): `pixel_values` `(images, C, H, W)` for the whole batch, one tile
    per image, each standing for its patches (`tokens_per_tile`). `image_sizes` (which Llava passes on only to a
    Pixtral tower) is refused: MemVP reads whole images of one size."""

    name = "Llava"
    model_types = ("llava",)
    refused_keywords = ("image_sizes",)
    refused_because = ("Llava passes `image_sizes` only to a Pixtral tower, for images of other sizes; MemVP reads "
                       "Llava's images as whole images of one size. Build the batch without them.")

    def image_tiles(self, images: ProcessorImages) -> list[torch.Tensor]:
        return self.whole_images(images)

    def image_token_counts(self, images: ProcessorImages) -> list[int]:
        self.image_tiles(images)  # the layout checked first
        height, width = images.pixel_values.shape[-2:]
        return [self.tokens_per_tile(height, width)] * images.pixel_values.shape[0]


class LlavaNextFamily(LlavaLayoutFamily):
    """LLaVA-NeXT (`LlavaNextForConditionalGeneration`): each image is the overview plus the tiles of the best grid
    for its size (`image_sizes`), stacked as `(images, most tiles, C, H, W)` with padding tiles. MemVP reads every
    real tile of an image (the overview first, then the grid row by row, as its own AnyRes tiling lays them out); the
    text stands for the overview's tokens plus the unpadded grid's, a newline token per grid row."""

    name = "LLaVA-NeXT"
    model_types = ("llava_next",)
    image_keywords = ("image_sizes",)
    tiles_images = True

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.grid_pinpoints = [list(pinpoint) for pinpoint in model.config.image_grid_pinpoints]

    def _image_sizes(self, images: ProcessorImages) -> list[list[int]]:
        return self.image_sizes(images, "images, tiles, channels, height, width",
                                "which tiles of each image are real depends on its size")

    def tiles_per_image(self, images: ProcessorImages) -> list[int]:
        """The real tiles of each image: the overview plus the grid `select_best_resolution` picks for its size."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        sizes = self._image_sizes(images)
        return [image_size_to_num_patches(size, self.grid_pinpoints, self.tile_size) for size in sizes]

    def image_tiles(self, images: ProcessorImages) -> list[torch.Tensor]:
        counts = self.tiles_per_image(images)
        if max(counts, default=0) > images.pixel_values.shape[1]:
            raise ValueError(
                f"MemVP: the {self.name} images need up to {max(counts)} tiles by their `image_sizes`, but "
                f"`pixel_values` hold {images.pixel_values.shape[1]} per image."
            )
        return [image[:count] for image, count in zip(images.pixel_values, counts)]

    def grid_tokens(self, size: list[int], patches: int) -> tuple[int, int]:
        """Rows and columns of an image's tile grid in patches, after the model removes the padding around it."""
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

        grid_rows, grid_cols = get_anyres_image_grid_shape(size, self.grid_pinpoints, self.tile_size)
        unpadded = unpad_image(torch.empty(0, grid_rows * patches, grid_cols * patches), size)
        return unpadded.shape[1], unpadded.shape[2]

    def image_token_counts(self, images: ProcessorImages) -> list[int]:
        height, width = images.pixel_values.shape[-2:]
        base = self.tokens_per_tile(height, width)
        patches = self.tile_size // self.patch_size
        counts = []
        for size in self._image_sizes(images):
            rows, cols = self.grid_tokens(size, patches)
            counts.append(base + rows * (cols + 1))  # a newline token closes every row of the grid
        return counts


class LlavaOnevisionFamily(LlavaNextFamily):
    """LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): LLaVA-NeXT's tiles, with two differences the
    placeholder count follows -- a grid larger than `vision_aspect_ratio` ("anyres_max_N") allows is pooled down,
    and a row with several images (`batch_num_images`) gives each image only its overview plus one newline. Its
    videos (`pixel_values_videos`, `image_sizes_videos`, the video token) are refused."""

    name = "LLaVA-OneVision"
    model_types = ("llava_onevision",)
    image_keywords = ("image_sizes", "batch_num_images")
    refused_keywords = ("pixel_values_videos", "image_sizes_videos")
    refused_because = ("the LLaVA-OneVision processor's video inputs, which MemVP does not read (its memory holds "
                       "the call's images). Build the batch from images only.")

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.max_tiles = int(str(getattr(model.config, "vision_aspect_ratio", "anyres_max_9")).strip("anyres_max_"))

    def _patched(self, images: ProcessorImages) -> list[bool]:
        """Per image: whether it is tiled (the only image of its row) or read as its overview alone."""
        per_row = images.keywords.get("batch_num_images")
        if per_row is None:
            return [True] * images.pixel_values.shape[0]
        per_row = torch.as_tensor(per_row).tolist()
        return [count == 1 for count in per_row for _ in range(count)]

    def tiles_per_image(self, images: ProcessorImages) -> list[int]:
        tiles = super().tiles_per_image(images)
        return [count if patched else 1 for count, patched in zip(tiles, self._patched(images))]

    def image_token_counts(self, images: ProcessorImages) -> list[int]:
        import math

        height, width = images.pixel_values.shape[-2:]
        base = self.tokens_per_tile(height, width)
        patches = self.tile_size // self.patch_size
        counts = []
        for size, patched in zip(self._image_sizes(images), self._patched(images)):
            if not patched:
                counts.append(base + 1)  # the overview and one newline
                continue
            rows, cols = self.grid_tokens(size, patches)
            ratio = math.sqrt(rows * cols / (self.max_tiles * patches**2))
            if ratio > 1.1:  # pooled down to at most `max_tiles` tiles' worth (the model interpolates)
                rows, cols = int(rows // ratio), int(cols // ratio)
            counts.append(base + rows * (cols + 1))
        return counts


class Gemma3Family(LlavaLayoutFamily):
    """Gemma 3 (`Gemma3ForConditionalGeneration`): `pixel_values` `(images, C, H, W)` for the whole batch (pan-and-scan
    crops are images of their own), each written as `<start_of_image>` + `mm_tokens_per_image` image soft tokens +
    `<end_of_image>`; all three are taken out (the processor's `token_type_ids` follow the text). Its processor's
    `image_token_id` is the begin-of-image id, so the ids are read from the model's config (`image_token_index`,
    `boi_token_index`, `eoi_token_index`).

    MemVP reads the SigLIP `vision_tower`'s patches, before the multi-modal projector, as it reads CLIP before
    Llava's: the projector's average pooling and normed projection learnt the language model's input space, not its
    FFN memory. The memory thus holds every patch of an image -- (image_size / patch_size)^2 slots, 4096 for the
    896-pixel checkpoints, against the 256 tokens the VLM puts in its sequence: MemVP's memory costs one FFN column per
    slot, not attention over the sequence, so the full patch grid is kept (an adapter that wants fewer reads them
    through `pool_kernel` / `pool_tokens`)."""

    name = "Gemma 3"
    model_types = ("gemma3",)
    boundary_token_names = ("boi_token_index", "eoi_token_index")

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.tokens_per_image = int(model.config.mm_tokens_per_image)

    def image_tiles(self, images: ProcessorImages) -> list[torch.Tensor]:
        return self.whole_images(images)

    def image_token_counts(self, images: ProcessorImages) -> list[int]:
        return [self.tokens_per_image] * len(self.image_tiles(images))


class Idefics3Family(LlavaLayoutFamily):
    """Idefics3 and SmolVLM (`Idefics3ForConditionalGeneration`, `SmolVLMForConditionalGeneration`): the processor
    splits each image into crops of the tower's size plus a global view and stacks them per row, `pixel_values`
    `(rows, crops, C, H, W)`, padding crops all zero (`pixel_attention_mask` zero there). Each crop stands for
    `(image_size / patch_size)^2 / scale_factor^2` image tokens (the connector's pixel shuffle), written as
    `<fake_token_around_image><row_i_col_j>` + image tokens per crop and `<fake_token_around_image><global-img>` +
    image tokens + `<fake_token_around_image>` for the global view. MemVP reads every real crop of a row in order
    (the processor already groups images by row: `images_of_rows`), and takes out the image tokens together with the
    markers around them: the config names only the image token, so the markers are found by where they stand (the two
    tokens before each run of image tokens, and the around-image token closing the last run of an image). The
    newlines the processor writes between crop rows are ordinary text and stay.

    MemVP reads the tower (`model.model.vision_model`) before the connector, as it reads CLIP before Llava's
    projector: the connector's pixel shuffle folds scale_factor^2 neighbouring patches into one vector of
    scale_factor^2 times the tower's width only so that its linear map can shorten the *sequence*; MemVP's memory
    slots cost no attention, and its own projector reads the tower's width. The memory holds every patch of every
    crop ((image_size / patch_size)^2 per crop). A crop padded inside (a partial `pixel_attention_mask`, from
    `do_image_splitting=False` with a non-square image) is refused: the tower would read its padding as image."""

    name = "Idefics3"
    model_types = ("idefics3", "smolvlm")
    image_keywords = ("pixel_attention_mask",)
    tiles_images = True

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.tokens_per_crop = (self.tile_size // self.patch_size) ** 2 // int(model.config.scale_factor) ** 2

    def encoder_tower(self, model: nn.Module) -> Optional[nn.Module]:
        inner = getattr(model, "model", model)
        tower = getattr(inner, "vision_model", None)
        return tower if isinstance(tower, nn.Module) else None

    def _crops(self, images: ProcessorImages) -> torch.Tensor:
        """Which crops of each row are real `(rows, crops)`: those not all zero (the model's own test)."""
        pixel_values = images.pixel_values
        if pixel_values.dim() != 5:
            raise ValueError(
                f"MemVP: an {self.name} processor's `pixel_values` are (rows, crops, channels, height, width); got "
                f"shape {tuple(pixel_values.shape)}."
            )
        real = (pixel_values != 0).flatten(2).any(dim=2)
        mask = images.keywords.get("pixel_attention_mask")
        if mask is not None:
            mask = torch.as_tensor(mask).bool()
            if mask.shape != (*pixel_values.shape[:2], *pixel_values.shape[-2:]):
                raise ValueError(
                    f"MemVP: `pixel_attention_mask` has shape {tuple(mask.shape)}, but the {self.name} `pixel_values` "
                    f"{tuple(pixel_values.shape)} need (rows, crops, height, width)."
                )
            covered = mask.flatten(2)
            partial = covered.any(dim=2) & ~covered.all(dim=2)
            if bool(partial.any()):
                raise ValueError(
                    f"MemVP: some {self.name} crops are padded inside (their `pixel_attention_mask` is partly zero): "
                    "MemVP reads whole crops, and the tower would read the padding as image. Build the batch with "
                    "do_image_splitting=True (whole crops of the tower's size)."
                )
            real = real & covered.any(dim=2)
        return real

    def image_tiles(self, images: ProcessorImages) -> list[torch.Tensor]:
        """Every crop of the call, row after row (`images_of_rows` picks the real ones)."""
        self._crops(images)
        return list(images.pixel_values.flatten(0, 1)[:, None])

    def image_token_counts(self, images: ProcessorImages) -> list[int]:
        real = self._crops(images).flatten()
        return [self.tokens_per_crop if is_real else 0 for is_real in real.tolist()]

    def images_of_rows(self, input_ids: torch.Tensor, real: torch.Tensor, images: ProcessorImages) -> list[list[int]]:
        crops = self._crops(images)
        if crops.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"MemVP: the {self.name} processor's `pixel_values` hold the crops of {crops.shape[0]} rows, but "
                f"`input_ids` has {input_ids.shape[0]} rows: build text and images with the same processor call."
            )
        per_row = ((input_ids == self.image_token_id) & real).sum(dim=1).tolist()
        rows = []
        for row, tokens in enumerate(per_row):
            indices = [row * crops.shape[1] + crop for crop in crops[row].nonzero().flatten().tolist()]
            if tokens != len(indices) * self.tokens_per_crop:
                raise ValueError(
                    f"MemVP: row {row} of `input_ids` holds {tokens} image tokens (id {self.image_token_id}), but its "
                    f"{len(indices)} real crops stand for {len(indices) * self.tokens_per_crop} "
                    f"({self.tokens_per_crop} each). Build text and images with the same processor call."
                )
            rows.append(indices if tokens else [])
        return rows

    def image_marking_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        image = input_ids == self.image_token_id
        previous = torch.nn.functional.pad(image[:, :-1], (1, 0), value=False)
        following = torch.nn.functional.pad(image[:, 1:], (0, 1), value=False)
        starts, ends = image & ~previous, image & ~following
        marked = image.clone()
        before = torch.nn.functional.pad(starts[:, 1:], (0, 1), value=False)  # the crop's row/col or global marker
        around = torch.nn.functional.pad(starts[:, 2:], (0, 2), value=False)  # the around-image token before it
        marked |= before | around
        closing = torch.nn.functional.pad(ends[:, :-1], (1, 0), value=False)
        around_ids = input_ids[around]
        if around_ids.numel():
            marked |= closing & torch.isin(input_ids, around_ids.unique())
        return marked


class QwenVLFamily(VLMFamily):
    """Qwen2-VL, Qwen2.5-VL and Qwen3-VL (`Qwen2VLForConditionalGeneration` and kin): dynamic resolution. The
    processor gives `pixel_values` as the flattened patches of every image of the batch, one after the other, with
    each image's patch grid in `image_grid_thw` `(images, 3)`; an image stands for `t * h * w / merge**2`
    placeholders between `<|vision_start|>` and `<|vision_end|>` (both taken out with them). Its videos
    (`pixel_values_videos`, `video_grid_thw`, the video token) are refused.

    Where MemVP reads: the output of the VLM's own tower `model.model.visual`, run frozen (without gradients) with
    the images' `grid_thw` -- *after* its patch merger, in the language model's width, the tokens the VLM's
    placeholders carry. MemVP reads CLIP before the Llava projector because that projector only maps features into
    the LM's input space; Qwen's merger is more than that: it is where the tower's 2 x 2 neighbouring patches become
    one token. Reading before it would give the memory 4x the slots (a 448 x 448 image: 1024 patches instead of 256,
    the dominant cost of a memory read and a limit `num_memory_slots` must cover) in the tower's raw width, in the
    tower's window order, features the VLM itself never hands on. After it, each image holds as many slots as it has
    placeholders (`visual_dim` = the text width, e.g. 3584 for Qwen2-VL-7B), and MemVP's own projector maps them
    into the FFN memory. Qwen3-VL's DeepStack features (added to the first text layers' hidden states) are not read:
    they belong to the sequence the placeholders are taken out of.

    Every image gives its own number of tokens, so a row's images go to the memory in the variable form (one
    `(tokens, visual_dim)` tensor per image, in order; a row holding more than `num_memory_slots` tokens is refused,
    see `check_memory_slots`). The tower is the VLM's, not a `VisionEncoder`, so MemVP's vision adapters (bottlenecks
    in the encoder's blocks) cannot be placed in it.

    The text positions: M-RoPE positions count the image's grid; without its placeholders the language model must
    see a text-only prompt's positions, which it computes itself when no position inputs and no `image_grid_thw`
    reach it (the entry drops `position_ids`, `rope_deltas` and `mm_token_type_ids`). The `rope_deltas` the model
    caches on its inner model from an earlier call with images are cleared here, so none of them shifts this call's
    positions.
    """

    name = "Qwen-VL"
    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
    image_keywords = ("image_grid_thw",)
    refused_keywords = ("pixel_values_videos", "video_grid_thw")
    refused_because = ("the Qwen-VL processor's video inputs, which MemVP does not read (its memory holds the call's "
                       "images). Build the batch from images only.")
    tiles_images = True  # dynamic resolution: each image at its own size, never MemVP's image_grid tiles
    boundary_token_names = ("vision_start_token_id", "vision_end_token_id")

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        inner = getattr(model, "model", None)
        if not isinstance(getattr(inner, "visual", None), nn.Module) or not hasattr(inner, "get_image_features"):
            raise ValueError(f"MemVP: the {self.name} base {type(model).__name__} has no `model.visual` tower with "
                             "`model.get_image_features`: its processor's images cannot be read.")
        self.inner = inner
        self.merge = int(model.config.vision_config.spatial_merge_size)

    def encoder_tower(self, model: nn.Module) -> Optional[nn.Module]:
        return None  # the tower needs `grid_thw`: `memvp_visual_inputs` runs it

    def _grid(self, images: ProcessorImages) -> torch.Tensor:
        grid = images.keywords.get("image_grid_thw")
        if grid is None:
            raise ValueError(f"MemVP: the {self.name} processor's `image_grid_thw` are needed with its `pixel_values` "
                             "(flattened patches: the grid says which belong to which image); the call has none.")
        grid = torch.as_tensor(grid)
        pixel_values = images.pixel_values
        layout = grid.dim() == 2 and grid.shape[1] == 3 and pixel_values.dim() == 2
        if not layout or int(grid.prod(-1).sum()) != pixel_values.shape[0]:
            raise ValueError(
                f"MemVP: the {self.name} processor gives `pixel_values` (patches, patch_dim) with `image_grid_thw` "
                f"(images, 3) whose grids add up to the patches; got shapes {tuple(pixel_values.shape)} and "
                f"{tuple(grid.shape)}."
            )
        return grid

    def image_token_counts(self, images: ProcessorImages) -> list[int]:
        return (self._grid(images).prod(-1) // self.merge**2).tolist()

    def memvp_visual_inputs(self, images: ProcessorImages, rows: list[list[int]],
                            configs: Sequence[Any] = ()) -> dict[str, Any]:
        grid = self._grid(images).to(images.pixel_values.device)
        self.inner.rope_deltas = None  # positions of an earlier call's images must not shift this text-only call's
        with torch.no_grad():  # the VLM's tower and merger stay frozen: MemVP trains only its own modules
            features = list(self.inner.get_image_features(images.pixel_values, grid).pooler_output)
        return {"image_features": [[features[i] for i in indices] for indices in rows]}


class Mistral3Family(VLMFamily):
    """Mistral 3 (`Mistral3ForConditionalGeneration`, e.g. Mistral-Small-3.1): a Pixtral tower
    (`model.model.vision_tower`) reads every image at its own size. The processor resizes each image (longest side
    at most its `size`, both sides multiples of `patch_size * spatial_merge_size`), pads the batch's images to the
    largest and gives `pixel_values` `(images, C, H, W)` for the whole batch with each image's real `image_sizes`
    `(images, 2)`. An image of h x w pixels stands for `(h / m) * (w / m)` `[IMG]` tokens (m = patch_size *
    spatial_merge_size), written row by row, each row closed by `[IMG_BREAK]` and the last one by `[IMG_END]`
    instead; both markers leave the text with the `[IMG]` tokens. The config names only `[IMG]`, so the markers are
    found by where they stand -- the token right after each run of `[IMG]` -- and checked: every run of a row must
    be one row of its image (`w / m` tokens, `h / m` runs per image), the markers closing an image's rows all one id
    and those closing its last row another, the same ids for the whole call. A text laid out otherwise is refused,
    so no text token is ever taken for a marker.

    Where MemVP reads: the Pixtral tower's hidden state the adapter's `vision_feature_layer` selects (-2 by default,
    the paper's penultimate block; -1 is the output Mistral 3's own projector reads), run frozen with the images'
    `image_sizes` -- *before* `multi_modal_projector`, as MemVP reads CLIP before Llava's projector. Unlike Qwen-VL's
    merger, which ends Qwen's tower and whose output is what the tower hands on, Mistral 3's patch merger sits inside
    the projector, between its RMSNorm and its two-layer MLP: its output is a middle layer of a map learnt, end to
    end, into the language model's *input* space, a basis that MLP is free to rotate and a space MemVP's memory
    never reads. MemVP's own projector replaces that whole map (norm, merger and MLP), which stays frozen and never
    runs. The tower's patches are what the VLM's projector itself starts from.

    What it costs: the memory holds every real patch of an image, `(h / p) * (w / p)` slots (p = patch_size), 4x
    the `[IMG]` tokens the VLM puts in its sequence: a 448 x 448 image is 1024 slots, a 1540-pixel one (Mistral 3's
    largest) 12100. A memory slot costs one FFN column, not attention over the sequence; the processor's `size`
    (`{"longest_edge": ...}`) caps it, and `num_memory_slots` must hold a row's images (else the row is refused:
    `check_memory_slots`). Each image is its own grid of its own size, so a row's images go to the memory in the
    variable form (one `(patches, visual_dim)` tensor per image, in order; `visual_dim` = the tower's width);
    `pool_kernel` / `pool_tokens` read only square grids and refuse the others. The padding the processor adds
    around smaller images is never read (the tower crops each image to its `image_sizes`). The tower is the VLM's,
    run by the family rather than as a `VisionEncoder`, so MemVP's vision adapters cannot be placed in it; adapters
    active together must read the same hidden state (one encoding serves them all)."""

    name = "Mistral 3"
    model_types = ("mistral3",)
    image_keywords = ("image_sizes",)
    tiles_images = True  # each image at its own size, never MemVP's image_grid tiles

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        tower = vlm_vision_tower(model)
        if tower is None or not hasattr(tower, "patch_size"):
            raise ValueError(f"MemVP: the {self.name} base {type(model).__name__} has no Pixtral `vision_tower`: its "
                             "processor's images cannot be read.")
        self.tower = tower
        self.patch_size = int(model.config.vision_config.patch_size)
        self.merged = self.patch_size * int(model.config.spatial_merge_size)
        self.width = int(model.config.vision_config.hidden_size)
        self.hidden_states = int(model.config.vision_config.num_hidden_layers) + 1  # the embeddings, then each block

    def encoder_tower(self, model: nn.Module) -> Optional[nn.Module]:
        return None  # the tower needs each image's `image_sizes`: `memvp_visual_inputs` runs it

    def check_config(self, config: Any) -> None:
        layer = config.vision_feature_layer
        if not -self.hidden_states <= layer < self.hidden_states:
            raise ValueError(
                f"MemVP: vision_feature_layer={layer} is out of range for the {self.name} base's Pixtral tower, which "
                f"has {self.hidden_states} hidden states (the embeddings and {self.hidden_states - 1} blocks): use an "
                f"index in [{-self.hidden_states}, {self.hidden_states - 1}] (-1 = what the VLM's projector reads)."
            )
        if config.visual_dim != self.width:
            raise ValueError(
                f"MemVP: the {self.name} base's Pixtral tower gives features of width {self.width} (MemVP reads it "
                f"before the VLM's projector) but MemVPConfig.visual_dim={config.visual_dim}; set visual_dim="
                f"{self.width} (vlm.config.vision_config.hidden_size)."
            )

    def _image_sizes(self, images: ProcessorImages) -> list[tuple[int, int]]:
        """Each image's `(height, width)` in pixels, checked against `pixel_values` and the merged patch size."""
        sizes = self.image_sizes(images, "images, channels, height, width",
                                 "each image is read at its own size, padded to the batch's largest")
        pixel_values = images.pixel_values
        height, width = pixel_values.shape[-2:]
        for index, (h, w) in enumerate(sizes):
            if not (0 < h <= height and 0 < w <= width) or h % self.merged or w % self.merged:
                raise ValueError(
                    f"MemVP: image {index} of the {self.name} call has `image_sizes` {[h, w]}, which must lie within "
                    f"its `pixel_values` ({height} x {width}) and be multiples of patch_size * spatial_merge_size "
                    f"({self.merged}), as the processor makes them."
                )
        return [(int(h), int(w)) for h, w in sizes]

    def image_token_counts(self, images: ProcessorImages) -> list[int]:
        return [(h // self.merged) * (w // self.merged) for h, w in self._image_sizes(images)]

    def images_of_rows(self, input_ids: torch.Tensor, real: torch.Tensor, images: ProcessorImages) -> list[list[int]]:
        rows = super().images_of_rows(input_ids, real, images)
        self._check_layout(input_ids, real, self._image_sizes(images), rows)
        return rows

    def _check_layout(self, input_ids: torch.Tensor, real: torch.Tensor, sizes: list[tuple[int, int]],
                      rows: list[list[int]]) -> None:
        """Refuse a text whose `[IMG]` tokens are not laid out as the processor writes its images (class
        docstring): the markers are taken out by where they stand, which only that layout makes them."""
        image = (input_ids == self.image_token_id) & real
        starts, ends = self._runs(image)
        closing: dict[str, set[int]] = {"[IMG_BREAK]": set(), "[IMG_END]": set()}
        for row, indices in enumerate(rows):
            want = [sizes[i][1] // self.merged for i in indices for _ in range(sizes[i][0] // self.merged)]
            got = [end - start + 1 for start, end in zip(starts[row], ends[row])]
            following = [int(input_ids[row, end + 1]) if end + 1 < input_ids.shape[1] and bool(real[row, end + 1])
                         else None for end in ends[row]]
            if got != want or None in following:
                raise ValueError(
                    f"MemVP: row {row} of `input_ids` holds runs of {got} `[IMG]` tokens (id {self.image_token_id}), "
                    f"but its {self.name} images stand for rows of {want} tokens, each closed by `[IMG_BREAK]` (the "
                    "last by `[IMG_END]`): build text and images with the same processor call."
                )
            last = 0
            for i in indices:
                count = sizes[i][0] // self.merged
                closing["[IMG_BREAK]"].update(following[last: last + count - 1])
                closing["[IMG_END]"].add(following[last + count - 1])
                last += count
        breaks, image_ends = closing["[IMG_BREAK]"], closing["[IMG_END]"]
        if len(breaks) > 1 or len(image_ends) > 1 or breaks & image_ends:
            raise ValueError(
                f"MemVP: the tokens closing the rows of the call's {self.name} images are {sorted(breaks)} (rows) and "
                f"{sorted(image_ends)} (images): the processor closes every row with one `[IMG_BREAK]` id and every "
                "image with one `[IMG_END]` id. Build text and images with the same processor call."
            )

    @staticmethod
    def _runs(image: torch.Tensor) -> tuple[list[list[int]], list[list[int]]]:
        """Per row, where each run of image tokens starts and ends (inclusive)."""
        previous = torch.nn.functional.pad(image[:, :-1], (1, 0), value=False)
        following = torch.nn.functional.pad(image[:, 1:], (0, 1), value=False)
        starts, ends = image & ~previous, image & ~following
        return ([row.nonzero().flatten().tolist() for row in starts],
                [row.nonzero().flatten().tolist() for row in ends])

    def image_marking_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        image = input_ids == self.image_token_id
        following = torch.nn.functional.pad(image[:, 1:], (0, 1), value=False)
        closing = torch.nn.functional.pad((image & ~following)[:, :-1], (1, 0), value=False)  # after each run
        return image | closing

    def feature_layer(self, configs: Sequence[Any]) -> int:
        """The hidden state the active adapters read (one encoding serves them all, so they must agree)."""
        layers = sorted({config.vision_feature_layer for config in configs})
        if not layers:
            raise ValueError(f"MemVP: the {self.name} tower is read at the active adapters' vision_feature_layer; "
                             "no adapter is active.")
        if len(layers) != 1:
            raise ValueError(
                f"MemVP: the active adapters read the {self.name} tower at vision_feature_layer={layers}; the tower "
                "is run once per call for all of them, so they must read the same hidden state. Activate one "
                "adapter, or give them the same vision_feature_layer."
            )
        for config in configs:
            self.check_config(config)
        return layers[0]

    def memvp_visual_inputs(self, images: ProcessorImages, rows: list[list[int]],
                            configs: Sequence[Any] = ()) -> dict[str, Any]:
        sizes = self._image_sizes(images)
        layer = self.feature_layer(configs)
        with torch.no_grad():  # the VLM's tower stays frozen: MemVP trains only its own modules
            outputs = self.tower(images.pixel_values, image_sizes=torch.tensor(sizes), output_hidden_states=True)
        patches = [(h // self.patch_size) * (w // self.patch_size) for h, w in sizes]
        features = outputs.hidden_states[layer].squeeze(0).split(patches)  # each image's real patches, row-major
        return {"image_features": [[features[i] for i in indices] for indices in rows]}


#: The families whose own processor's batches MemVP reads, in the order `family_of` tries them.
FAMILIES: tuple[type[VLMFamily], ...] = (LlavaFamily, LlavaNextFamily, LlavaOnevisionFamily, Gemma3Family,
                                          Idefics3Family, QwenVLFamily, Mistral3Family)


def family_of(model: nn.Module) -> Optional[VLMFamily]:
    """The family object of a VLM base (built once, when an adapter is injected), or None for any other model."""
    if not has_own_vision_model(model):
        return None
    for family in FAMILIES:
        if family.covers(model):
            return family(model)
    return None


def supported_families() -> str:
    """The supported families and their model types, as messages and docs name them."""
    return ", ".join(f"{family.name} ({', '.join(family.model_types)})" for family in FAMILIES)
