"""Convert the MemVP and ADEM-VL authors' released checkpoints into a peft adapter folder.

The MemVP authors' training code saves a `.pth` whose `model` dict holds (LLaMA recipe):

* `adapter_proj.fc1.{weight,bias}`, `adapter_proj.fc2.{weight,bias}`: the projector Linear(D_v, h) -> SiLU -> Linear(h, d)
* `adapter_emb1`, `adapter_emb2` of shape (1, n, d): the key and value position embeddings (emb1 starts ~N(0, 0.02^2),
  emb2 at zero -- p_k and p_v of MEMVP_SPEC.md)
* `backbone.visual.transformer.resblocks.{i}.adapter_mlp.fc{1,2}.weight`: the bottleneck adapters in CLIP block i

ADEM-VL's code (Hao et al. 2024, a fork of MemVP's) saves the same tensors plus `adapter_proj_cls.*` (the projector of
the CLS input token, unless trained with `--no_cls`), and its model is set by the `args` saved with the checkpoint:
`down_sample_num` (the multiscale slots), `drop_ratio`, `alpha` (s), `beta` (lambda), `no_cls`. A checkpoint whose
`args` carry those (or that holds `adapter_proj_cls.*`) is an ADEM-VL checkpoint, and every setting comes from its
`args`: `memory_read='adem'`, `multiscale_tokens=down_sample_num`, `drop_ratio`, `memory_scale=alpha`,
`visual_scale=beta`, no dropout on the scores (their read has none), and the CLS token (`cls_token`, after the LLaMA
tokenizer's ids of 'Image: '; 'Image: N/A' in rows without an image -- every ADEM-VL checkpoint was trained on
LLaMA's tokenizer). An ADEM-VL checkpoint without its `args` is refused: its settings cannot be read off the tensors.

All sizes are read off the tensors; the result loads with `PeftModel.from_pretrained(base, folder)` onto the HF
LLaMA the checkpoint was trained on (attach the CLIP ViT-L/14 encoder with `vision_encoder=` or
`attach_vision_encoder`). Usage: `python -m memvp_peft.convert checkpoint.pth output_dir`.

The folder also gets the `memvp_cli.json` `memvp-infer` reads: both authors fed their images resized to 224 x 224
(bicubic, no crop) and normalised with ImageNet's mean/std, not CLIP's, so it records `image_normalization:
imagenet` -- with the encoder's own processor a converted checkpoint would be scored on other pixels than it learnt
from -- and their plain prompt (no chat template); `--vision_encoder` is recorded there too.

Everything is checked before anything is written -- the file is a readable PyTorch checkpoint holding the MemVP
tensors, every one floating-point and finite after the cast to fp32, no trained (`adapter`) tensor is left over, and
every tensor has the shape the adapter's model-side memory (built from the written config) has -- so a refused
conversion leaves `output_dir` untouched, and the command line reports it as one `error:` line with exit status 2.
`output_dir` must be new or empty (a folder holding a run is never replaced), and the folder is written whole: staged
beside it and moved into place.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from ..tuner.config import MemVPConfig
from ..tuner.memory import VisualMemory
from ..tuner.save_load import WEIGHTS_NAME, check_adapter_folder
from .model_loading import write_run_manifest

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


#: The LLaMA tokenizer's ids of ADEM-VL's prefixes, each text encoded on its own without BOS/EOS (their
#: `tokenizer.encode(text, bos=False, eos=False)`): 'Image: ' -> '▁Image' ':' '▁', 'Image: N/A' -> '▁Image' ':' '▁N'
#: '/' 'A'. Every ADEM-VL checkpoint was trained with this tokenizer (LLaMA-7B and -13B share it); pass
#: `cls_token_prefix_ids=` / `cls_token_text_only_prefix_ids=` to `convert_authors_checkpoint` for another.
LLAMA_ADEM_VL_PREFIX_IDS = {"cls_token_prefix_ids": [7084, 29901, 29871],
                            "cls_token_text_only_prefix_ids": [7084, 29901, 405, 29914, 29909]}
#: what ADEM-VL's `args` set that its tensors do not show (their train.py flags)
_ADEM_VL_ARGS = ("down_sample_num", "drop_ratio", "alpha", "beta", "no_cls")
_CLS_PROJECTOR = {
    "cls_projector.0.weight": "adapter_proj_cls.fc1.weight",
    "cls_projector.0.bias": "adapter_proj_cls.fc1.bias",
    "cls_projector.2.weight": "adapter_proj_cls.fc2.weight",
    "cls_projector.2.bias": "adapter_proj_cls.fc2.bias",
}


def _saved_args(checkpoint: Any) -> Optional[dict[str, Any]]:
    """The training flags saved with the checkpoint (`'args': argparse.Namespace`, or a dict), else None."""
    args = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return args if isinstance(args, dict) else None


def _number(args: dict[str, Any], name: str) -> float:
    value = args[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"the checkpoint's args.{name} must be a number, got {value!r}.")
    return float(value)


def adem_vl_settings(state: dict[str, torch.Tensor], args: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The `MemVPConfig` fields of an ADEM-VL checkpoint, every one from its saved `args`; {} for a MemVP one."""
    has_cls = any(key.startswith("adapter_proj_cls.") for key in state)
    named = [name for name in _ADEM_VL_ARGS if args is not None and name in args]
    if not has_cls and not named:
        return {}
    missing = [name for name in _ADEM_VL_ARGS if args is None or name not in args]
    if missing:
        seen = "it holds adapter_proj_cls.*" if has_cls else f"its args name {named}"
        raise ValueError(
            f"an ADEM-VL checkpoint ({seen}) whose saved 'args' lack {missing}: ADEM-VL's multiscale slots, score "
            "drop, scales and CLS token are set by those flags, not by the tensors. Convert the .pth its training "
            "run saved (with its 'args')."
        )
    scales = args["down_sample_num"]
    scales = [scales] if isinstance(scales, int) and not isinstance(scales, bool) else scales
    if not isinstance(scales, (list, tuple)) or not all(isinstance(c, int) and not isinstance(c, bool) for c in scales):
        raise ValueError(f"the checkpoint's args.down_sample_num must be token counts, got {args['down_sample_num']!r}.")
    slots = int(state["adapter_emb1"].shape[1])
    if sum(scales) != slots:
        raise ValueError(f"the checkpoint's args.down_sample_num={list(scales)} make {sum(scales)} slots, but "
                         f"adapter_emb1 holds {slots}.")
    if not isinstance(args["no_cls"], bool):
        raise ValueError(f"the checkpoint's args.no_cls must be True or False, got {args['no_cls']!r}.")
    cls_token = not args["no_cls"]
    if cls_token != has_cls:
        raise ValueError(
            f"the checkpoint's args.no_cls={args['no_cls']} but it {'holds' if has_cls else 'lacks'} the CLS "
            "projector adapter_proj_cls.*: the tensors and the flags disagree."
        )
    for name, key, dim in (("hidden_proj", "adapter_proj.fc1.weight", 0),):
        if name in args and args[name] != state[key].shape[dim]:
            raise ValueError(f"the checkpoint's args.{name}={args[name]!r} but {key} has {state[key].shape[dim]} "
                             "rows: the tensors and the flags disagree.")
    settings = dict(memory_read="adem", multiscale_tokens=list(scales), drop_ratio=_number(args, "drop_ratio"),
                    memory_scale=_number(args, "alpha"), visual_scale=_number(args, "beta"), memory_dropout=0.0,
                    cls_token=cls_token)
    if cls_token:
        settings.update(LLAMA_ADEM_VL_PREFIX_IDS)
    return settings


def convert_authors_state(
    state: dict[str, torch.Tensor], args: Optional[dict[str, Any]] = None, **config_overrides: Any
) -> tuple[MemVPConfig, dict[str, torch.Tensor]]:
    """(MemVPConfig, adapter tensors in our checkpoint naming) from the authors' state dict and saved `args`.

    Every tensor is checked against the memory the config builds (`VisualMemory.from_config`: the shapes a load
    will insist on), and a trained tensor the adapter has no place for (a key with `adapter` in it: the authors save
    exactly those) is refused, never dropped."""
    fc1, fc2 = state["adapter_proj.fc1.weight"], state["adapter_proj.fc2.weight"]
    emb1, emb2 = state["adapter_emb1"], state["adapter_emb2"]
    if emb1.dim() != 3 or emb1.shape[0] != 1 or emb1.shape != emb2.shape:
        raise ValueError(f"adapter_emb1/adapter_emb2 must both be (1, n, d), got {tuple(emb1.shape)} and {tuple(emb2.shape)}.")
    if fc1.dim() != 2 or fc2.dim() != 2:
        raise ValueError(f"adapter_proj.fc1/fc2 weights must be 2-D, got {tuple(fc1.shape)} and {tuple(fc2.shape)}.")
    sources = {  # our name -> the authors' name, so that a refused tensor is named as the user's file names it
        "projector.0.weight": "adapter_proj.fc1.weight",
        "projector.0.bias": "adapter_proj.fc1.bias",
        "projector.2.weight": "adapter_proj.fc2.weight",
        "projector.2.bias": "adapter_proj.fc2.bias",
        "key_pos": "adapter_emb1",
        "value_pos": "adapter_emb2",
    }
    adem = adem_vl_settings(state, args)
    if adem.get("cls_token"):
        sources.update(_CLS_PROJECTOR)
    missing = [source for source in sources.values() if source not in state]
    if missing:
        raise ValueError(f"the checkpoint lacks {missing}.")
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
    used = set(sources.values())
    left_over = sorted(key for key in state if "adapter" in key and key not in used)
    if left_over:
        raise ValueError(f"the checkpoint holds trained tensors the adapter has no place for: {left_over[:6]}"
                         f"{' ...' if len(left_over) > 6 else ''}; a checkpoint of another method or version?")
    settings = dict(
        visual_dim=int(fc1.shape[1]),
        projector_hidden_dim=int(fc1.shape[0]),
        num_memory_slots=int(emb1.shape[1]),
        vision_adapter_dim=int(state[blocks[0]["fc1"]].shape[0]) if blocks else 0,
        vision_num_layers=len(blocks) or None,
        task_type="CAUSAL_LM",
        **adem,
    )
    settings.update(config_overrides)
    config = MemVPConfig(**settings)
    converted = {name: _as_fp32(sources[name], value) for name, value in tensors.items()}
    check_shapes(config, converted, int(emb1.shape[2]), sources)
    return config, {_PREFIX + name: value for name, value in converted.items()}


def check_shapes(config: MemVPConfig, tensors: dict[str, torch.Tensor], model_dim: int,
                 sources: Optional[dict[str, str]] = None) -> None:
    """Every tensor the memory of `config` (on a model of width `model_dim`) has, of its shape, and no other --
    what loading the adapter insists on, checked on the meta device (no memory allocated)."""
    with torch.device("meta"):
        expected = {name: tuple(value.shape) for name, value in VisualMemory.from_config(config, model_dim).state_dict().items()}
    named = (sources or {}).get
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"the checkpoint does not fit the adapter its config describes: missing "
                         f"{[named(n, n) for n in missing]}, unexpected {[named(n, n) for n in extra]}.")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(
                f"{named(name, name)} has shape {tuple(tensors[name].shape)}, but the adapter "
                f"(visual_dim={config.visual_dim}, projector_hidden_dim={config.projector_hidden_dim}, model width "
                f"{model_dim}, vision_adapter_dim={config.vision_adapter_dim}) needs {shape}: the checkpoint would "
                "not load."
            )


def _as_fp32(source: str, value: torch.Tensor) -> torch.Tensor:
    """`value` as a contiguous fp32 tensor, refused (named as in the authors' file) if it is not floating-point --
    an integer tensor is not trained weights -- or holds NaN/inf after the cast (float64 beyond 3.4e38 becomes inf)."""
    if not value.is_floating_point():
        raise ValueError(f"{source} has dtype {value.dtype}; expected floating-point trained weights.")
    converted = value.detach().to(torch.float32).contiguous()
    if not torch.isfinite(converted).all():
        raise ValueError(f"{source} holds NaN or inf values (in fp32); the checkpoint is damaged or diverged.")
    return converted


def check_output_dir(output_dir: str) -> None:
    """`output_dir` must be new or an empty folder: a conversion never replaces a run or an adapter."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"output_dir {output_dir} is a file; pass a folder for the adapter.")
    if os.path.isdir(output_dir):
        held = sorted(os.listdir(output_dir))
        if held:
            raise ValueError(f"output_dir {output_dir} is not empty (it holds {held[:5]}{' ...' if len(held) > 5 else ''}); "
                             "convert into a new or empty folder, so that no run or adapter is replaced.")


def convert_authors_checkpoint(path: str, output_dir: str, **config_overrides: Any) -> MemVPConfig:
    """Write `adapter_config.json` + `adapter_model.safetensors` (+ `memvp_cli.json`) for the authors' `.pth` at
    `path` into `output_dir` (new or empty), staged beside it, read back and checked, then moved into place."""
    if not os.path.isfile(path):
        raise ValueError(f"MemVP checkpoint {path} does not exist.")
    check_output_dir(output_dir)
    checkpoint = _load_checkpoint(path)
    config, tensors = convert_authors_state(_model_state(checkpoint, path), _saved_args(checkpoint),
                                            **config_overrides)
    model_dim = int(tensors[_PREFIX + "key_pos"].shape[1])
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".memvp-converting-", dir=parent)
    try:
        save_file(tensors, os.path.join(staging, WEIGHTS_NAME), metadata={"format": "pt"})
        config.save_pretrained(staging)
        write_run_manifest(staging, authors_run_manifest(config.vision_encoder))  # the name MemVPConfig records
        _check_written(staging, model_dim)
        check_output_dir(output_dir)  # still new or empty
        if os.path.isdir(output_dir):
            os.rmdir(output_dir)
        os.rename(staging, output_dir)
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging)
    return config


def _check_written(folder: str, model_dim: int) -> None:
    """The written folder as a load reads it: a complete adapter whose config builds the memory its weights fit."""
    check_adapter_folder(folder)
    config = MemVPConfig.from_pretrained(folder)
    weights = load_file(os.path.join(folder, WEIGHTS_NAME))
    check_shapes(config, {key.removeprefix(_PREFIX): value for key, value in weights.items()}, model_dim)


def authors_run_manifest(vision_encoder: Optional[str]) -> dict[str, Any]:
    """How the authors fed their LLaMA: CLIP patch features of ImageNet-normalised 224-px images, the QCM-A prompt
    as plain text (what `memvp-infer` reads from `memvp_cli.json`)."""
    return {"featurizer": None, "vision_model_name_or_path": vision_encoder, "array_value_range": None,
            "kind": "causal", "prompt_template": None, "chat_template": False, "image_normalization": "imagenet"}


def main(argv: Optional[list[str]] = None) -> int:
    """The command line: 0 after a conversion; a refused file is one `error:` line on stderr and 2, like a bad flag."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("checkpoint", help="the authors' .pth file")
    parser.add_argument("output_dir", help="new or empty folder for the peft adapter")
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
        + (f" ADEM-VL: multiscale_tokens={config.multiscale_tokens} drop_ratio={config.drop_ratio} "
           f"cls_token={config.cls_token}" if config.memory_read == "adem" else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
