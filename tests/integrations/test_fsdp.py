"""MemVP under PyTorch FSDP2 (`fully_shard`): real 2-process runs on the CPU (gloo), nothing mocked.

What is tested where:

* the `fully_shard` path -- `integrations/train_fsdp.py` under `torchrun --nproc_per_node 2`, forced onto the CPU
  (no visible CUDA device, so gloo): every decoder layer and the PeftModel (root) sharded, 6 AdamW steps on real
  digit images with one rank's batch text-only every other step, `generate` after `register_fsdp_forward_method`,
  the trainable parameters gathered into full tensors and saved by rank 0 with `save_adapter(state_dict=...)`.
  The test replays the same batches in this process without FSDP (`train_fsdp.train_unsharded`) and compares
  losses, logits and generated ids, and reloads the saved adapter onto a fresh base;
* `integrations/fsdp/fsdp2.yaml` -- only how accelerate reads it (`accelerate launch` with a probe script that
  builds accelerate's FSDP plugin from the environment the launcher sets), and that on a CPU-only machine accelerate
  runs plain multi-CPU DDP instead (which is why the Trainer + FSDP path cannot be tested here: it needs GPUs).

Runtime on 2 CPU cores: about 40 s (two launches of 15-20 s, mostly start-up, and the in-process reference).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")
if not hasattr(pytest.importorskip("torch.distributed.fsdp"), "fully_shard"):  # public from torch 2.6
    pytest.skip("FSDP2 (torch.distributed.fsdp.fully_shard) needs torch >= 2.6", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "integrations" / "train_fsdp.py"
ACCELERATE_CONFIG = ROOT / "integrations" / "fsdp" / "fsdp2.yaml"

sys.path.insert(0, str(RECIPE.parent))
import train_fsdp as recipe  # noqa: E402  (the recipe's data, model and unsharded replay)
from process_launch import free_port, launcher_env  # noqa: E402

pytestmark = pytest.mark.slow

RUN_TIMEOUT = 300  # seconds per launch (a run takes ~15-20 s on 2 cores)
RUN_ARGS = ["--max_steps", "6", "--per_device_batch_size", "8", "--text_only_every", "2", "--num_eval", "16"]
LOSS_TOLERANCE = 1e-5  # float reduction order: FSDP2 averages two per-rank gradients, the replay one summed loss


def _launch(command: list[str]) -> str:
    """Run a launcher in its own process group; on timeout kill the whole group (the ranks are grandchildren)."""
    proc = subprocess.Popen(command, cwd=ROOT, env=launcher_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"timed out after {RUN_TIMEOUT}s (a hung collective?): {' '.join(command)}\n{output[-5000:]}")
    if proc.returncode != 0:
        pytest.fail(f"exit {proc.returncode}: {' '.join(command)}\n{output[-5000:]}")
    return output


def _torchrun(script: Path, *args: str) -> str:
    port = str(free_port())
    prefix = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    return _launch([*prefix, str(script), *args])


# What a script launched by `accelerate launch --config_file fsdp2.yaml` sees: accelerate's FSDP plugin built from
# the launcher's environment (as Accelerator() builds it), and the distributed type accelerate picks on the CPU.
PROBE = """
import json, logging, os
from accelerate import Accelerator
from accelerate.utils import FullyShardedDataParallelPlugin
state = Accelerator(cpu=True).state  # first: accelerate's logger refuses to log before a state exists
caught = []
handler = logging.Handler()
handler.emit = caught.append  # accelerate logs the FSDP1-only options FSDP2 drops ("... is obsolete in FSDP2")
logging.getLogger("accelerate").addHandler(handler)
plugin = FullyShardedDataParallelPlugin()
report = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rank_" + os.environ["RANK"] + ".json")
with open(report, "w") as handle:  # a file per rank: two ranks printing long lines may interleave them
    json.dump({
        "rank": int(os.environ["RANK"]),
        "version": plugin.fsdp_version,
        "wrap": getattr(plugin.auto_wrap_policy, "__name__", None),
        "classes": plugin.transformer_cls_names_to_wrap,
        "state_dict_type": str(plugin.state_dict_type),
        "reshard_after_forward": plugin.reshard_after_forward,
        "use_orig_params": plugin.use_orig_params,
        "warnings": [record.getMessage() for record in caught],
        "cpu_distributed_type": str(state.distributed_type),
        "cpu_fsdp_plugin": getattr(state, "fsdp_plugin", None) is not None,
    }, handle)
"""


# ------------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> dict:
    output_dir = tmp_path_factory.mktemp("fsdp")
    _torchrun(RECIPE, "--output_dir", str(output_dir), *RUN_ARGS)
    infos = [json.loads((output_dir / f"rank_{r}.json").read_text()) for r in (0, 1)]
    assert [i["rank"] for i in infos] == [0, 1]
    return {"dir": output_dir, "infos": infos, "reference": torch.load(output_dir / "reference.pt")}


@pytest.fixture(scope="module")
def unsharded() -> dict:
    """The same 6 steps in this process, no FSDP: each step's loss is the mean over both ranks' batches."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the launched ranks (OMP_NUM_THREADS=1)
    try:
        return recipe.train_unsharded(recipe.parse_args(["--output_dir", "unused", *RUN_ARGS]), world=2)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def accelerate_probe(tmp_path_factory) -> list[dict]:
    """`PROBE`'s report from both ranks of `accelerate launch --config_file integrations/fsdp/fsdp2.yaml`."""
    probe = tmp_path_factory.mktemp("probe") / "probe.py"
    probe.write_text(PROBE)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIG),
               "--main_process_port", str(free_port()), str(probe)]
    _launch(command)
    return [json.loads((probe.parent / f"rank_{r}.json").read_text()) for r in (0, 1)]


# --------------------------------------------------------------------------------------------------------- checks


def test_every_decoder_layer_and_the_root_are_sharded(fsdp_run):
    for info in fsdp_run["infos"]:
        assert (info["world_size"], info["backend"]) == (2, "gloo")
        assert info["sharded_layers"] == ["base_model.model.model.layers.0", "base_model.model.model.layers.1"]
        assert info["root"] == "FSDPPeftModelForCausalLM"  # fully_shard's class swap of the PeftModel


def test_losses_equal_an_unsharded_run_of_the_same_batches(fsdp_run, unsharded):
    for rank, info in enumerate(fsdp_run["infos"]):
        expected = [step[rank] for step in unsharded["losses"]]
        assert info["losses"] == pytest.approx(expected, abs=LOSS_TOLERANCE, rel=0)
    assert unsharded["losses"][-1] != pytest.approx(unsharded["losses"][0], abs=1e-2)  # it did train


def test_ranks_may_disagree_on_having_images(fsdp_run, unsharded):
    """Steps 1, 3, 5: one rank text-only (no image_features), the other with images. MemVP runs its projector on
    text-only batches too (times 0), so both ranks reduce-scatter gradients for the same parameters: the run
    neither hangs nor drifts from the unsharded replay."""
    rank0, rank1 = fsdp_run["infos"]
    assert (rank0["text_only_steps"], rank1["text_only_steps"]) == ([1, 5], [3])
    for rank, info in enumerate(fsdp_run["infos"]):
        for step in (1, 3, 5):
            assert info["losses"][step] == pytest.approx(unsharded["losses"][step][rank], abs=LOSS_TOLERANCE)


def test_generate_after_register_fsdp_forward_method_equals_unsharded_generate(fsdp_run, unsharded):
    reference = fsdp_run["reference"]
    assert torch.equal(reference["generated"], unsharded["generated"])
    torch.testing.assert_close(reference["logits"], unsharded["logits"], rtol=0, atol=1e-5)
    rank0, rank1 = fsdp_run["infos"]
    assert rank0["answers"] == rank1["answers"] == unsharded["answers"]


def test_full_state_dict_saved_on_rank0_reloads_with_identical_logits(fsdp_run, unsharded):
    from peft import PeftModel, get_peft_model_state_dict

    expected_keys = set(get_peft_model_state_dict(unsharded["model"]))
    saved = fsdp_run["dir"]
    from safetensors.torch import load_file

    weights = load_file(saved / "adapter_model.safetensors")
    assert set(weights) == expected_keys and all(v.numel() > 0 for v in weights.values())
    args = recipe.parse_args(["--output_dir", "unused", *RUN_ARGS])
    reloaded = PeftModel.from_pretrained(recipe.build_base(args, recipe.Words(None)), str(saved)).eval()
    reference = fsdp_run["reference"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            logits = reloaded(input_ids=reference["input_ids"], attention_mask=reference["attention_mask"],
                              image_features=reference["image_features"]).logits
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(logits, reference["logits"], rtol=0, atol=1e-6)


def test_accelerate_config_is_read_as_fsdp2_with_decoder_layer_wrap_and_full_state_dict(accelerate_probe):
    from memvp_peft.demo_models import tiny_llama

    decoder_layer = tiny_llama()._no_split_modules  # the class the recipe's models shard per layer
    assert [info["rank"] for info in accelerate_probe] == [0, 1]
    for info in accelerate_probe:
        assert info["version"] == 2
        assert info["wrap"] == "transformer_auto_wrap_policy" and info["classes"] == list(decoder_layer)
        assert info["state_dict_type"] == "StateDictType.FULL_STATE_DICT"
        assert info["reshard_after_forward"] is True
        assert info["use_orig_params"] is None  # FSDP2 always trains the original parameters
        assert info["warnings"] == []  # no FSDP1-only option that accelerate would drop


def test_accelerate_runs_plain_ddp_instead_of_fsdp_on_cpu(accelerate_probe):
    """Why the Trainer + fsdp2.yaml path is not tested here: on a CPU-only machine accelerate ignores the FSDP
    settings and runs multi-CPU DDP, without a word."""
    for info in accelerate_probe:
        assert info["cpu_distributed_type"] == "DistributedType.MULTI_CPU"
        assert info["cpu_fsdp_plugin"] is False
