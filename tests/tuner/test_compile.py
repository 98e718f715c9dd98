"""The hot path compiles as one graph: `torch.compile(peft_model, fullgraph=True)` forward + backward equals eager."""

import pytest
import torch
from conftest import VISUAL_DIM, memvp_config, randomize_memory, tiny_llama
from peft import get_peft_model


@pytest.fixture
def pm():
    model = get_peft_model(tiny_llama(), memvp_config(memory_scale=1.0, memory_dropout=0.0))
    randomize_memory(model, scale=1.0)
    return model.train()


@pytest.fixture
def inputs():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 64, (2, 7), generator=generator)
    features = torch.randn(2, 5, VISUAL_DIM, generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids, "image_features": features}


def _step(model, pm, inputs):
    pm.zero_grad()
    out = model(**inputs)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}


def test_forward_with_images_is_one_graph_without_breaks(pm, inputs):
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(pm)(**inputs)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1


def _assert_compiled_equals_eager(pm, inputs, backend):
    eager_logits, eager_grads = _step(pm, pm, inputs)
    torch._dynamo.reset()
    compiled = torch.compile(pm, fullgraph=True, backend=backend)
    logits, grads = _step(compiled, pm, inputs)
    torch.testing.assert_close(logits, eager_logits, rtol=1e-5, atol=1e-6)
    assert sorted(grads) == sorted(eager_grads) and any("memvp" in n for n in grads)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-7)


def test_fullgraph_forward_and_backward_equal_eager(pm, inputs):
    """AOTAutograd captures forward and backward as graphs (fullgraph: a break would raise)."""
    _assert_compiled_equals_eager(pm, inputs, "aot_eager")


@pytest.mark.slow
def test_fullgraph_inductor_forward_and_backward_equal_eager(pm, inputs):
    """The default backend users get (generates C++ kernels: about a minute on 2 cores)."""
    _assert_compiled_equals_eager(pm, inputs, "inductor")


def test_compiled_model_still_follows_the_images(pm, inputs):
    torch._dynamo.reset()
    compiled = torch.compile(pm, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        first = compiled(**inputs).logits
        other = compiled(**dict(inputs, image_features=inputs["image_features"] * 3)).logits
    assert not torch.allclose(first, other)


def test_bad_features_still_get_a_clear_error_in_eager_use(pm, inputs):
    bad = inputs["image_features"].clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        pm(**dict(inputs, image_features=bad))
