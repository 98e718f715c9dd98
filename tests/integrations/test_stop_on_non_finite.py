"""`StopOnNonFinite` under a launcher: when only one rank's tensors stop being finite, every rank stops at that step
(one rank stopping alone would leave the others waiting in the next collective)."""

import json
import subprocess
import sys
import textwrap

import pytest
from process_launch import free_port, launcher_env

pytestmark = pytest.mark.slow

PROBE = """
import json, pathlib, sys
import torch
import torch.distributed as dist
from torch import nn
from transformers import TrainerControl, TrainerState, TrainingArguments
from memvp_peft import NonFiniteTrainingError, StopOnNonFinite

dist.init_process_group("gloo")
args = TrainingArguments(sys.argv[1], use_cpu=True, report_to=[])
rank = dist.get_rank()
model = nn.Linear(2, 2)
if rank == 1:  # only this rank's weights went NaN
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
try:
    StopOnNonFinite().on_step_end(args, TrainerState(global_step=3), TrainerControl(), model=model)
    result = "went on"
except NonFiniteTrainingError as error:
    result = str(error)
dist.barrier()
# one file per rank: two ranks printing to one pipe at once can interleave their lines
pathlib.Path(sys.argv[2], f"rank{rank}.json").write_text(json.dumps(result))
dist.destroy_process_group()
"""


def test_every_rank_stops_when_one_ranks_weights_are_not_finite(tmp_path):
    (tmp_path / "probe.py").write_text(textwrap.dedent(PROBE))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(tmp_path / "probe.py"), str(tmp_path / "out"), str(tmp_path)]
    done = subprocess.run(command, env=launcher_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    results = {f"RANK{rank}": (tmp_path / f"rank{rank}.json").read_text() for rank in (0, 1)}
    assert json.loads(results["RANK1"]).startswith("training stopped at step 3: after that step the parameter weight "
                                                   "holds 1 NaN value(s)")
    assert json.loads(results["RANK0"]).startswith("training stopped at step 3: after that step the parameter of "
                                                   "another rank is not finite")
