"""No host-device synchronisation on MemVP's hot path.

What "the first validation of a call" means here: the value checks at a call's entry -- finite features/pixels,
a 0/1 integer mask, no VLM placeholder in the text (`tuner/visual_inputs.py`, `entry._reject_image_placeholders`) --
which run on CPU tensors, once per forward and once per `generate()` call (on accelerator tensors only with
MEMVP_CHECK_VALUES=1). After them, nothing MemVP runs -- building the memory, every layer's read, the backward, every
decode step, the batch-size bookkeeping -- reads a tensor value on the host, and MemVP makes the base model read
none that it would not read without the adapter. `host_syncs.SyncCounter` intercepts the reads for real (a
TorchFunctionMode and a TorchDispatchMode) while the model runs on CPU.
"""

import pytest
import torch
import transformers as T
from conftest import VOCAB, memvp_config, randomize_memory, tiny_llama
from host_syncs import SyncCounter
from peft import get_peft_model

NEW_TOKENS = 5


def _gpt2():
    torch.manual_seed(0)
    return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_inner=64,
                                          n_positions=64, pad_token_id=0, bos_token_id=1, eos_token_id=2))


BASES = {"llama (whole-FFN layer)": tiny_llama, "gpt2 (key/value layers of a plain FFN)": _gpt2}


def _adapted(base: str):
    pm = get_peft_model(BASES[base](), memvp_config(memory_dropout=0.1))
    randomize_memory(pm)
    return pm


def _inputs() -> dict:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (3, 7), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "image_features": torch.randn(3, 5, 16, generator=generator),
            "image_mask": torch.tensor([1, 0, 1])}  # an integer mask: its 0/1 check is part of the validation


def _train_step(pm, inputs: dict) -> None:
    pm.train()
    pm(**inputs, labels=inputs["input_ids"]).loss.backward()


def _generate(pm, inputs: dict, **kwargs) -> torch.Tensor:
    pm.eval()
    with torch.no_grad():
        return pm.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                           pad_token_id=0, **kwargs)


def _listing(syncs) -> str:
    return "host reads outside the validation:\n" + "\n".join(f"  {s.call} ({s.level}) at {s.where}" for s in syncs)


@pytest.mark.parametrize("base", BASES)
def test_training_step_reads_no_value_on_the_host_after_validating_its_inputs(base):
    pm = _adapted(base)
    with SyncCounter() as counter:
        _train_step(pm, _inputs())
    assert counter.in_validation("aten"), "the counter saw not even the validation's own checks"
    assert counter.ours_outside_validation() == [], _listing(counter.ours_outside_validation())


@pytest.mark.parametrize("base", BASES)
def test_generate_validates_once_and_its_decode_steps_read_no_value_on_the_host(base):
    pm, inputs = _adapted(base), _inputs()
    pm.eval()
    with torch.no_grad(), SyncCounter() as one_forward:
        pm(**inputs)
    with SyncCounter() as counter:
        _generate(pm, inputs)
    assert counter.ours_outside_validation() == [], _listing(counter.ours_outside_validation())
    # the validation ran once for the whole call, not once per decode step
    assert len(counter.in_validation("aten")) == len(one_forward.in_validation("aten")) > 0


def test_beam_search_expands_the_memory_without_reading_a_value_on_the_host():
    """Beams grow the decode batch (3 -> 6): the memory follows with repeat_interleave by an int, no host read."""
    pm = _adapted("llama (whole-FFN layer)")
    with SyncCounter() as counter:
        _generate(pm, _inputs(), num_beams=2)
    assert counter.ours_outside_validation() == [], _listing(counter.ours_outside_validation())


@pytest.mark.parametrize("phase", ["training step", "generate"])
def test_memvp_makes_the_base_model_read_no_more_values_than_without_the_adapter(phase):
    """The base model's own host reads (transformers' mask shortcuts, generate's stopping checks) are the same with
    the adapter on as with it off: MemVP adds none, its own or by what it hands the base model."""
    pm, inputs = _adapted("llama (whole-FFN layer)"), _inputs()
    # a trainable embedding gives the adapter-off step a backward through the whole base as well
    pm.get_base_model().get_input_embeddings().weight.requires_grad_(True)
    run = _train_step if phase == "training step" else _generate
    with SyncCounter() as with_memvp:
        run(pm, inputs)
    with pm.disable_adapter(), SyncCounter() as without:
        run(pm, inputs)
    assert len(without.outside_validation("aten")) > 0  # the base model does read some: the comparison is not empty
    assert len(with_memvp.outside_validation("aten")) == len(without.outside_validation("aten")), _listing(
        with_memvp.outside_validation("aten"))


def test_the_counter_sees_a_host_read_in_a_layer_forward_and_in_backward():
    """The counter is not blind where it matters: a `.item()` in an FFN's forward (Python level) and a `bool()` in a
    gradient hook run by autograd (aten level) are both caught and attributed to their code."""
    pm = _adapted("llama (whole-FFN layer)")
    mlp = pm.get_base_model().model.layers[0].mlp
    mlp.register_forward_hook(lambda module, args, out: out.sum().item() and None)
    inputs = _inputs()
    inputs["image_features"].requires_grad_(True)
    inputs["image_features"].register_hook(lambda grad: bool(grad.sum()) and None)
    with SyncCounter() as counter:
        _train_step(pm, inputs)
    reads = {(s.call, s.level) for s in counter.syncs if "test_host_syncs.py" in s.where}
    assert ("item", "python") in reads and ("_local_scalar_dense", "aten") in reads
