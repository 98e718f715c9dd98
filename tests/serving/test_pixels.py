"""The server's pixels-to-features path computes memvp-peft's own numbers, and the adapter reader refuses what the
plugin does not implement."""

from __future__ import annotations

import json
import os
import shutil

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from memvp_peft.serving.adapter import read_adapter  # noqa: E402
from memvp_peft.serving.pixels import PixelEncoder  # noqa: E402
from serving_fixtures import Reference, build_models, digit_image  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    paths = build_models(str(tmp_path_factory.mktemp("served")))
    return paths, Reference(paths)


def test_served_pixel_features_equal_memvp_peft_features(models):
    paths, reference = models
    encoder = PixelEncoder(read_adapter(paths["adapter"]))
    for index in (0, 7):
        served = encoder.features(digit_image(index))
        assert served.shape == (16, 32)
        assert torch.equal(served, reference.pixel_features(digit_image(index)))


@pytest.mark.parametrize("field, value, named", [
    ("memory_read", "adem", "memory_read='adem'"),
    ("drop_ratio", 0.1, "drop_ratio=0.1"),
    ("cls_token", True, "cls_token=True"),
    ("pool_kernel", 2, "pool_kernel=2"),
    ("vision_adapter_dim", 12, "vision_adapter_dim=12"),
    ("layers_to_transform", [0], "layers_to_transform=[0]"),
    ("memory_activation", "identity", "memory_activation='identity'"),
])
def test_an_adapter_option_the_plugin_does_not_implement_is_refused_by_name(models, tmp_path, field, value, named):
    paths, _ = models
    folder = shutil.copytree(paths["adapter"], tmp_path / "adapter")
    config_path = os.path.join(folder, "adapter_config.json")
    with open(config_path) as handle:
        config = json.load(handle)
    config[field] = value
    with open(config_path, "w") as handle:
        json.dump(config, handle)
    with pytest.raises(ValueError, match="does not implement") as refused:
        read_adapter(folder)
    assert named in str(refused.value)


def test_an_adapter_without_a_recorded_encoder_refuses_pixels_clearly(models, tmp_path):
    paths, _ = models
    folder = shutil.copytree(paths["adapter"], tmp_path / "adapter")
    os.remove(os.path.join(folder, "memvp_cli.json"))
    config_path = os.path.join(folder, "adapter_config.json")
    with open(config_path) as handle:
        config = json.load(handle)
    config["vision_encoder"] = None
    with open(config_path, "w") as handle:
        json.dump(config, handle)
    with pytest.raises(ValueError, match="names the vision encoder"):
        PixelEncoder(read_adapter(folder)).features(digit_image(0))
