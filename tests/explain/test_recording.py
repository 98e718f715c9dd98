"""`record_reads` records exactly the spec's memory activations, and recording (or not) changes nothing else.

The reference is written from MEMVP_SPEC, not from the layer code: K, V from `reference_memvp.reference_memory`
(its own projector), and plain torch hooks on an unadapted copy of the base that compute `a = act(x K^T)` from the
FFN's input x (GLU: the whole mlp's input; GPT-2: c_fc's input) -- or ADEM-VL's `a = silu(x) silu(K)^T` -- and add
`s * a V` to the FFN's output.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import VISUAL_DIM, VOCAB, memvp_config, randomize_memory, tiny_llama
from peft import get_peft_model
from pristine import describe
from reference_memvp import adapter_state, reference_memory

from memvp_peft.explain import exclude_slots, record_reads

TOL = dict(rtol=1e-5, atol=1e-6)


def reference_activations(base, state, config, input_ids, features, kind):
    """(L, B, T, n) activations of every layer's read, by hooks on an unadapted copy of `base` (module docstring)."""
    model = copy.deepcopy(base).eval()
    keys, values = reference_memory(state, config, features)
    scale, found = float(config.memory_scale), []
    if kind in ("glu", "adem"):
        for layer in model.model.layers:
            def hook(module, args, output):
                if kind == "adem":  # ADEM-VL's read: silu(x) silu(K)^T
                    a = torch.matmul(F.silu(args[0]), F.silu(keys).transpose(-1, -2))
                else:  # MemVP's: act(x K^T), tiny_llama's hidden_act silu
                    a = F.silu(torch.matmul(args[0], keys.transpose(-1, -2)))
                found.append(a)
                return output + scale * torch.matmul(a, values)
            layer.mlp.register_forward_hook(hook)
    else:
        for block in model.transformer.h:
            captured = {}
            block.mlp.c_fc.register_forward_pre_hook(lambda m, args, captured=captured: captured.update(x=args[0]))

            def add(module, args, output, captured=captured, act=block.mlp.act):
                a = act(torch.matmul(captured.pop("x"), keys.transpose(-1, -2)))
                found.append(a)
                return output + scale * torch.matmul(a, values)
            block.mlp.c_proj.register_forward_hook(add)
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    return torch.stack(found), keys, values, logits


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64)).eval()


def adapted(base, **overrides):
    config = memvp_config(**overrides)
    model = get_peft_model(copy.deepcopy(base), config)
    randomize_memory(model, scale=0.3)
    return model.eval(), config


def inputs(seed=5):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (2, 6), generator=generator), torch.randn(2, 5, VISUAL_DIM, generator=generator)


@pytest.mark.parametrize("kind", ["glu", "gpt2", "adem"])
def test_recorded_activations_equal_the_spec_formula(kind):
    base = tiny_gpt2() if kind == "gpt2" else tiny_llama()
    model, config = adapted(base, **({"memory_read": "adem"} if kind == "adem" else {}))
    ids, features = inputs()
    with torch.no_grad(), record_reads(model) as record:
        logits = model(input_ids=ids, image_features=features).logits
    want, _, values, want_logits = reference_activations(base, adapter_state(model), config, ids, features, kind)
    torch.testing.assert_close(logits, want_logits, **TOL)  # the reference really is this model
    torch.testing.assert_close(record.stacked(0, what="activations"), want, **TOL)
    contributions = (config.memory_scale * want).abs() * values.norm(dim=-1)[None, :, None, :]
    torch.testing.assert_close(record.stacked(0, what="contributions"), contributions, **TOL)


def test_generate_records_one_forward_per_step():
    model, _ = adapted(tiny_llama())
    ids, features = inputs()
    with torch.no_grad(), record_reads(model) as record:
        model.generate(input_ids=ids, image_features=features, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert record.forwards() == 3
    assert record.stacked(0).shape[2] == ids.shape[1] and record.stacked(2).shape[2] == 1


def test_outside_the_block_nothing_is_recorded_and_the_model_is_as_before():
    model, _ = adapted(tiny_llama())
    ids, features = inputs()
    before = describe(model)
    with torch.no_grad():
        plain = model(input_ids=ids, image_features=features).logits
        with record_reads(model) as record:
            recorded = model(input_ids=ids, image_features=features).logits
        after = model(input_ids=ids, image_features=features).logits
    assert torch.equal(plain, recorded) and torch.equal(plain, after)
    assert len(record.reads) == 2  # the block's forward only, one read per layer
    assert describe(model) == before
    assert all("memvp_observer" not in vars(module) for module in model.modules())


def test_the_block_is_left_clean_when_the_forward_raises():
    model, _ = adapted(tiny_llama())
    before = describe(model)
    with pytest.raises(ValueError), record_reads(model):
        model(input_ids=torch.ones(1, 3, dtype=torch.long), image_features=torch.randn(1, 5, VISUAL_DIM + 1))
    assert describe(model) == before


def test_excluding_every_slot_reads_nothing():
    model, config = adapted(tiny_llama())
    ids, features = inputs()
    with torch.no_grad():
        with exclude_slots(model, torch.zeros(2, config.num_memory_slots, dtype=torch.bool)):
            excluded = model(input_ids=ids, image_features=features).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        with exclude_slots(model, torch.ones(2, config.num_memory_slots, dtype=torch.bool)):
            kept = model(input_ids=ids, image_features=features).logits
        plain = model(input_ids=ids, image_features=features).logits
    torch.testing.assert_close(excluded, base, **TOL)
    assert torch.equal(kept, plain)


def test_a_second_observer_is_refused():
    model, _ = adapted(tiny_llama())
    with record_reads(model), pytest.raises(ValueError, match="already observed"):
        with record_reads(model):
            pass
