"""Convert the MemVP authors' released checkpoints into a peft adapter folder.

The authors' training code saves a `.pth` whose `model` dict holds (LLaMA recipe):

* `adapter_proj.fc1.{weight,bias}`, `adapter_proj.fc2.{weight,bias}`: the projector Linear(D_v, h) -> SiLU -> Linear(h, d)
* `adapter_emb1`, `adapter_emb2` of shape (1, n, d): the key and value position embeddings (emb1 starts ~N(0, 0.02^2),
  emb2 at zero -- p_k and p_v of MEMVP_SPEC.md)
* `backbone.visual.transformer.resblocks.{i}.adapter_mlp.fc{1,2}.weight`: the bottleneck adapters in CLIP block i

All sizes are read off the tensors; the result loads with `PeftModel.from_pretrained(base, folder)` onto the HF
LLaMA the checkpoint was trained on (attach the CLIP ViT-L/14 encoder with `vision_encoder=` or
`attach_vision_encoder`). Usage: `python -m memvp_peft.convert checkpoint.pth output_dir`.

The folder also gets the `memvp_cli.json` `memvp-infer` reads: the authors fed their images resized to 224 x 224
(bicubic, no crop) and normalised with ImageNet's mean/std, not CLIP's, so it records `image_normalization:
imagenet` -- with the encoder's own processor a converted checkpoint would be scored on other pixels than it learnt
from -- and their plain prompt (no chat template); `--vision_encoder` is recorded there too.

Everything is checked before anything is written -- the file is a readable PyTorch checkpoint holding the MemVP
tensors, every one floating-point and finite after the cast to fp32 -- so a refused conversion leaves `output_dir`
untouched, and the command line reports it as one `error:` line with exit status 2.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any, Optional

import torch
from safetensors.torch import save_file

from .cli.record import write_cli_record
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
PROG = "python -m memvp_peft.convert"


def _model_state(checkpoint: Any, path: str) -> dict[str, torch.Tensor]:
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a dict with a 'model' state dict, got {type(checkpoint).__name__}.")
    state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise ValueError(f"{path} is not a MemVP checkpoint: missing {missing}.")
    return state


def _load_checkpoint(path: str) -> Any:
    """`torch.load(path)` with `weights_only=True` (a checkpoint from the internet runs no code), allowing the one
    non-tensor class the authors' `save_model` stores (`'args': argparse.Namespace`); any failure -- a zero-byte,
    truncated or foreign file, another unsafe global -- is one ValueError naming the file and torch's reason."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load's reasons vary (EOFError, UnpicklingError, RuntimeError ...): all one
        text = str(error)
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n|$)", text)  # torch's long advice hides the reason
        reason = detail.group(1).strip() if detail else (text.strip().splitlines() or ["empty or truncated file"])[0]
        raise ValueError(f"{path} is not a PyTorch checkpoint that torch.load can read with weights_only=True "
                         f"({type(error).__name__}: {reason}).") from error


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
    sources = {  # our name -> the authors' name, so that a refused tensor is named as the user's file names it
        "projector.0.weight": "adapter_proj.fc1.weight",
        "projector.0.bias": "adapter_proj.fc1.bias",
        "projector.2.weight": "adapter_proj.fc2.weight",
        "projector.2.bias": "adapter_proj.fc2.bias",
        "key_pos": "adapter_emb1",
        "value_pos": "adapter_emb2",
    }
    tensors = {name: state[source] for name, source in sources.items()}
    tensors["key_pos"], tensors["value_pos"] = emb1[0], emb2[0]
    blocks: dict[int, dict[str, str]] = {}  # CLIP block -> {"fc1": the authors' key, "fc2": ...}
    for key in state:
        match = _RESBLOCK.search(key)
        if match:
            blocks.setdefault(int(match.group(1)), {})[match.group(2)] = key
    if blocks and sorted(blocks) != list(range(len(blocks))):
        raise ValueError(f"vision adapters found for CLIP blocks {sorted(blocks)}; expected 0..{len(blocks) - 1}.")
    for index, pair in blocks.items():
        if set(pair) != {"fc1", "fc2"}:
            raise ValueError(f"CLIP block {index} has an incomplete adapter_mlp ({sorted(pair)}).")
        for fc in ("fc1", "fc2"):
            tensors[f"vision_adapters.{index}.{fc}.weight"] = state[pair[fc]]
            sources[f"vision_adapters.{index}.{fc}.weight"] = pair[fc]
    settings = dict(
        visual_dim=int(fc1.shape[1]),
        projector_hidden_dim=int(fc1.shape[0]),
        num_memory_slots=int(emb1.shape[1]),
        vision_adapter_dim=int(state[blocks[0]["fc1"]].shape[0]) if blocks else 0,
        vision_num_layers=len(blocks) or None,
        task_type="CAUSAL_LM",
    )
    settings.update(config_overrides)
    config = MemVPConfig(**settings)
    return config, {_PREFIX + name: _as_fp32(sources[name], value) for name, value in tensors.items()}


def _as_fp32(source: str, value: torch.Tensor) -> torch.Tensor:
    """`value` as a contiguous fp32 tensor, refused (named as in the authors' file) if it is not floating-point --
    an integer tensor is not trained weights -- or holds NaN/inf after the cast (float64 beyond 3.4e38 becomes inf)."""
    if not value.is_floating_point():
        raise ValueError(f"{source} has dtype {value.dtype}; expected floating-point trained weights.")
    converted = value.detach().to(torch.float32).contiguous()
    if not torch.isfinite(converted).all():
        raise ValueError(f"{source} holds NaN or inf values (in fp32); the checkpoint is damaged or diverged.")
    return converted


def convert_authors_checkpoint(path: str, output_dir: str, **config_overrides: Any) -> MemVPConfig:
    """Write `adapter_config.json` + `adapter_model.safetensors` for the authors' `.pth` at `path`."""
    if not os.path.isfile(path):
        raise ValueError(f"MemVP checkpoint {path} does not exist.")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"output_dir {output_dir} is a file; pass a folder for the adapter.")
    checkpoint = _load_checkpoint(path)
    config, tensors = convert_authors_state(_model_state(checkpoint, path), **config_overrides)
    os.makedirs(output_dir, exist_ok=True)
    save_file(tensors, os.path.join(output_dir, WEIGHTS_NAME), metadata={"format": "pt"})
    config.save_pretrained(output_dir)
    write_cli_record(output_dir, authors_cli_record(config.vision_encoder))  # the name MemVPConfig records
    return config


def authors_cli_record(vision_encoder: Optional[str]) -> dict[str, Any]:
    """How the authors fed their LLaMA: CLIP patch features of ImageNet-normalised 224-px images, the QCM-A prompt
    as plain text (what `memvp-infer` reads from `memvp_cli.json`)."""
    return {"featurizer": None, "vision_model_name_or_path": vision_encoder, "array_value_range": None,
            "kind": "causal", "prompt_template": None, "chat_template": False, "image_normalization": "imagenet"}


def main(argv: Optional[list[str]] = None) -> int:
    """The command line: 0 after a conversion; a refused file is one `error:` line on stderr and 2, like a bad flag."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("checkpoint", help="the authors' .pth file")
    parser.add_argument("output_dir", help="folder for the peft adapter")
    parser.add_argument("--base_model_name_or_path", default=None, help="recorded in adapter_config.json")
    parser.add_argument("--vision_encoder", default=None, help="local CLIP ViT-L/14 folder to record/attach")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k in ("base_model_name_or_path", "vision_encoder") and v}
    try:
        config = convert_authors_checkpoint(args.checkpoint, args.output_dir, **overrides)
    except ValueError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.output_dir}: visual_dim={config.visual_dim} slots={config.num_memory_slots} "
        f"projector_hidden_dim={config.projector_hidden_dim} vision_adapters={config.vision_num_layers or 0}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
