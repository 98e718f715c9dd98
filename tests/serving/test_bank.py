"""The memory bank sharded across tensor-parallel ranks reads exactly what the whole bank reads: each rank's partial
read `s * act(x K_r^T) V_r` over its slots sums to the full read (the sum vLLM's all-reduce forms), also when the
rank count does not divide the slot count (the last rank's padding slots read zero) and for an activation that is
not zero at zero. No engine: the bank and the read are plain torch."""

from __future__ import annotations

import pytest
import torch

from serving_fixtures import NUM_SLOTS, build_models, random_features

from memvp_peft.serving.adapter import read_adapter
from memvp_peft.serving.bank import MemoryBank, SlotShard
from memvp_peft.serving.model import add_memory_read, read_plan


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return read_adapter(build_models(str(tmp_path_factory.mktemp("bank")))["adapter"])


def _read(adapter, shard: SlotShard, x: torch.Tensor, activation) -> torch.Tensor:
    bank = MemoryBank(adapter, max_num_seqs=4, dtype=torch.float32, shard=shard)
    bank.load_adapter(adapter)
    features = {"a": random_features(1, NUM_SLOTS), "b": random_features(2, 7)}  # every slot filled; a short one
    slots = bank.slots_for(["a", "text", "b"], features.get)
    token_slots = torch.tensor([slots[0]] * 3 + [slots[1]] + [slots[2]])  # a prefill run, two decode tokens
    plan = read_plan(bank, token_slots, x.shape[0])
    return add_memory_read(x, torch.zeros_like(x), plan, bank, activation, scale=0.7)


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("activation", [torch.nn.functional.silu, torch.sigmoid], ids=["silu", "sigmoid"])
def test_sharded_partial_reads_sum_to_the_whole_read(adapter, world_size, activation):
    x = torch.randn(5, adapter.model_dim, generator=torch.Generator().manual_seed(0))
    whole = _read(adapter, SlotShard(0, 1), x, activation)
    partial = [_read(adapter, SlotShard(rank, world_size), x, activation) for rank in range(world_size)]
    torch.testing.assert_close(sum(partial), whole, rtol=1e-5, atol=1e-4)
    assert all(not torch.equal(p, whole) for p in partial)  # each rank holds only a part


def test_a_rank_outside_the_world_is_refused(adapter):
    with pytest.raises(ValueError, match="rank 2 of 2"):
        MemoryBank(adapter, max_num_seqs=2, dtype=torch.float32, shard=SlotShard(2, 2))
