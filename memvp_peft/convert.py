"""Convert the MemVP authors' released checkpoints into a peft adapter folder.

The authors' training code saves a `.pth` whose `model` dict holds (LLaMA recipe):

* `adapter_proj.fc1.{weight,bias}`, `adapter_proj.fc2.{weight,bias}`: the projector Linear(D_v, h) -> SiLU -> Linear(h, d)
* `adapter_emb1`, `adapter_emb2` of shape (1, n, d): the key and value position embeddings (emb1 starts ~N(0, 0.02^2),
  emb2 at zero -- p_k and p_v of MEMVP_SPEC.md)
* `backbone.visual.transformer.resblocks.{i}.adapter_mlp.fc{1,2}.weight`: the bottleneck adapters in CLIP block i

All sizes are read off the tensors; the result loads with `PeftModel.from_pretrained(base, folder)` onto the HF
LLaMA the checkpoint was trained on (attach the CLIP ViT-L/14 encoder with `vision_encoder=` or
`attach_vision_encoder`). Usage: `python -m memvp_peft.convert checkpoint.pth output_dir`.
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Any, Optional

import torch
from safetensors.torch import save_file

from .tuner.save_load import WEIGHTS_NAME
from .tuner.config import MemVPConfig

_RESBLOCK = re.compile(r"(?:^|\.)resblocks\.(\d+)\.adapter_mlp\.(fc1|fc2)\.weight$")
_REQUIRED = (
    "adapter_proj.fc1.weight",
    "adapter_proj.fc1.bias",
    "adapter_proj.fc2.weight",
    "adapter_proj.fc2.bias",
    "adapter_emb1",
    "adapter_emb2",
)
_PREFIX = "base_model.memvp_memory."


def _model_state(checkpoint: Any, path: str) -> dict[str, torch.Tensor]:
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a dict with a 'model' state dict, got {type(checkpoint).__name__}.")
    state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise ValueError(f"{path} is not a MemVP checkpoint: missing {missing}.")
    return state


def convert_authors_state(
    state: dict[str, torch.Tensor], **config_overrides: Any
) -> tuple[MemVPConfig, dict[str, torch.Tensor]]:
    """(MemVPConfig, adapter tensors in our checkpoint naming) from the authors' state dict."""
    fc1, fc2 = state["adapter_proj.fc1.weight"], state["adapter_proj.fc2.weight"]
    emb1, emb2 = state["adapter_emb1"], state["adapter_emb2"]
    if emb1.dim() != 3 or emb1.shape[0] != 1 or emb1.shape != emb2.shape:
        raise ValueError(f"adapter_emb1/adapter_emb2 must both be (1, n, d), got {tuple(emb1.shape)} and {tuple(emb2.shape)}.")
    if fc2.shape[0] != emb1.shape[2] or fc2.shape[1] != fc1.shape[0]:
        raise ValueError(
            f"inconsistent projector: fc1 {tuple(fc1.shape)}, fc2 {tuple(fc2.shape)}, memory width {emb1.shape[2]}."
        )
    tensors = {
        "projector.0.weight": fc1,
        "projector.0.bias": state["adapter_proj.fc1.bias"],
        "projector.2.weight": fc2,
        "projector.2.bias": state["adapter_proj.fc2.bias"],
        "key_pos": emb1[0],
        "value_pos": emb2[0],
    }
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        match = _RESBLOCK.search(key)
        if match:
            blocks.setdefault(int(match.group(1)), {})[match.group(2)] = value
    if blocks and sorted(blocks) != list(range(len(blocks))):
        raise ValueError(f"vision adapters found for CLIP blocks {sorted(blocks)}; expected 0..{len(blocks) - 1}.")
    for index, pair in blocks.items():
        if set(pair) != {"fc1", "fc2"}:
            raise ValueError(f"CLIP block {index} has an incomplete adapter_mlp ({sorted(pair)}).")
        tensors[f"vision_adapters.{index}.fc1.weight"] = pair["fc1"]
        tensors[f"vision_adapters.{index}.fc2.weight"] = pair["fc2"]
    settings = dict(
        visual_dim=int(fc1.shape[1]),
        projector_hidden_dim=int(fc1.shape[0]),
        num_memory_slots=int(emb1.shape[1]),
        vision_adapter_dim=int(blocks[0]["fc1"].shape[0]) if blocks else 0,
        vision_num_layers=len(blocks) or None,
        task_type="CAUSAL_LM",
    )
    settings.update(config_overrides)
    config = MemVPConfig(**settings)
    return config, {_PREFIX + k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()}


def convert_authors_checkpoint(path: str, output_dir: str, **config_overrides: Any) -> MemVPConfig:
    """Write `adapter_config.json` + `adapter_model.safetensors` for the authors' `.pth` at `path`."""
    if not os.path.isfile(path):
        raise ValueError(f"MemVP checkpoint {path} does not exist.")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    config, tensors = convert_authors_state(_model_state(checkpoint, path), **config_overrides)
    os.makedirs(output_dir, exist_ok=True)
    save_file(tensors, os.path.join(output_dir, WEIGHTS_NAME), metadata={"format": "pt"})
    config.save_pretrained(output_dir)
    return config


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="the authors' .pth file")
    parser.add_argument("output_dir", help="folder for the peft adapter")
    parser.add_argument("--base_model_name_or_path", default=None, help="recorded in adapter_config.json")
    parser.add_argument("--vision_encoder", default=None, help="local CLIP ViT-L/14 folder to record/attach")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k in ("base_model_name_or_path", "vision_encoder") and v}
    config = convert_authors_checkpoint(args.checkpoint, args.output_dir, **overrides)
    print(
        f"wrote {args.output_dir}: visual_dim={config.visual_dim} slots={config.num_memory_slots} "
        f"projector_hidden_dim={config.projector_hidden_dim} vision_adapters={config.vision_num_layers or 0}"
    )


if __name__ == "__main__":
    main()
