"""Pixels to the visual features a served adapter reads, computed by memvp-peft's own code.

An adapter answers as it was trained only when its images become the same numbers: the same encoder (the one
`memvp-train` recorded in the run manifest, or the adapter config's `vision_encoder`), the same image processor
(the one the encoder's folder saved, else CLIP defaults; ImageNet normalisation when the run used it), the same
feature selection (layer, CLS token, post-layernorm) and the same RGB conversion. So this module calls exactly what
`memvp-infer` calls -- `data.images.to_rgb_image`, `cli.model_loading.image_processor_for`,
`vision.encoder.VisionEncoder` / `pixel_features` -- and adds nothing of its own but the loading.

Why transformers' CLIP/SigLIP model rather than a vLLM tower: vLLM's vision towers come with its VLMs (whose
processors need torchvision, which the CPU serving environment cannot have) and with their own weight layouts; the
tower here runs once per image in the front end, beside the request's tokenisation, and its output is what the
engine receives -- the same `(tokens, visual_dim)` features a client may send itself with `--enable-mm-embeds`.
"""

from __future__ import annotations

import threading
from typing import Any, Optional

import torch

from .adapter import ServingAdapter


class PixelEncoder:
    """The adapter's vision encoder and image processor, loaded on first use (a server that only receives
    features never loads them). `features(image)` -> `(tokens, visual_dim)` float32 features of one image."""

    def __init__(self, adapter: ServingAdapter) -> None:
        self.adapter = adapter
        self._lock = threading.Lock()
        self._loaded: Optional[tuple[Any, Any]] = None

    @property
    def available(self) -> bool:
        """Whether the adapter records how to turn pixels into its features."""
        return self.unavailable_reason() is None

    def unavailable_reason(self) -> Optional[str]:
        manifest = self.adapter.manifest
        if manifest.get("featurizer") is not None:
            return (f"it was trained on features of the built-in featurizer {manifest['featurizer']!r}, not on a "
                    "vision encoder's")
        if not self.adapter.vision_encoder:
            return "neither its memvp_cli.json nor its adapter_config.json names the vision encoder it was trained with"
        return None

    def _load(self) -> tuple[Any, Any]:
        with self._lock:
            if self._loaded is None:
                from ..cli.model_loading import image_processor_for
                from ..vision import VisionEncoder, imagenet_image_processor, load_vision_encoder

                name = self.adapter.vision_encoder
                model = load_vision_encoder(name, revision=self.adapter.vision_encoder_revision).eval()
                selection = self.adapter.feature_selection
                encoder = VisionEncoder(model, feature_layer=selection["feature_layer"],
                                        select_strategy=selection["select_strategy"],
                                        layernorm=selection["layernorm"])
                encoder.check_feature_layer()
                vision_config = getattr(model.config, "vision_config", model.config)
                if self.adapter.manifest.get("image_normalization", "encoder") == "imagenet":
                    processor = imagenet_image_processor(int(vision_config.image_size))
                else:
                    processor = image_processor_for(name, vision_config,
                                                    revision=self.adapter.vision_encoder_revision)
                self._loaded = (encoder, processor)
            return self._loaded

    @torch.no_grad()
    def features(self, image: Any) -> torch.Tensor:
        """One image (a PIL image, as vLLM's parser gives it) -> its `(tokens, visual_dim)` features."""
        reason = self.unavailable_reason()
        if reason is not None:
            raise ValueError(f"MemVP serving: this adapter cannot take images as pixels: {reason}. Send the image's "
                             "features instead (image embeddings, with --enable-mm-embeds).")
        from ..data.images import to_rgb_image
        from ..vision import pixel_features

        encoder, processor = self._load()
        pixel_values = processor(images=[to_rgb_image(image)], return_tensors="pt")["pixel_values"]
        features = pixel_features(encoder, pixel_values, _Selection(self.adapter.feature_selection))
        return features[0].to(torch.float32)


class _Selection:
    """The feature-selection fields of an adapter config, as `vision.encoder.feature_selection` reads them."""

    def __init__(self, selection: dict[str, Any]) -> None:
        self.vision_feature_layer = selection["feature_layer"]
        self.vision_feature_select_strategy = selection["select_strategy"]
        self.vision_feature_layernorm = selection["layernorm"]
        self.vision_adapter_scale = 0.0
