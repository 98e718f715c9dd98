"""Each forward / generate() call sees its own visual memory: across threads, after errors, inside generate()."""

import threading

import pytest
import torch
from conftest import VISUAL_DIM, memvp_config, randomize_memory, tiny_llama
from peft import get_peft_model
from transformers import LogitsProcessor, LogitsProcessorList


@pytest.fixture
def pm():
    model = get_peft_model(tiny_llama(), memvp_config(memory_scale=1.0))
    randomize_memory(model, scale=1.0)
    return model.eval()


def _ids(seed: int, batch: int = 2, length: int = 6) -> torch.Tensor:
    return torch.randint(3, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def _features(seed: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 4, VISUAL_DIM, generator=torch.Generator().manual_seed(seed)) * 2


def _logits(model, ids, features=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), image_features=features).logits


class _Rendezvous:
    """Holds every thread inside its first FFN until all threads are there: their calls are active at once."""

    def __init__(self, model, parties: int) -> None:
        self.barrier = threading.Barrier(parties, timeout=30)
        self.arrived: set[int] = set()
        mlp = model.get_base_model().model.layers[0].mlp
        self.handle = mlp.register_forward_pre_hook(lambda *args: self._wait())

    def _wait(self) -> None:
        me = threading.get_ident()
        if me in self.arrived:  # a later forward of the same thread (e.g. a decode step) does not wait again
            return
        self.arrived.add(me)
        self.barrier.wait()

    def remove(self) -> None:
        self.handle.remove()


def _run_threads(targets) -> None:
    errors = []

    def guarded(fn):
        def run():
            try:
                fn()
            except BaseException as error:  # surfaced in the main thread below
                errors.append(error)

        return run

    threads = [threading.Thread(target=guarded(fn)) for fn in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors


@pytest.mark.parametrize("trial", range(3))
def test_two_threads_with_different_images_each_get_their_own_logits(pm, trial):
    ids = _ids(trial)
    feats_a, feats_b = _features(10 + trial), _features(20 + trial)
    expected_a, expected_b = _logits(pm, ids, feats_a), _logits(pm, ids, feats_b)
    assert not torch.allclose(expected_a, expected_b)
    results = {}
    rendezvous = _Rendezvous(pm, parties=2)
    try:
        _run_threads([
            lambda: results.__setitem__("a", _logits(pm, ids, feats_a)),
            lambda: results.__setitem__("b", _logits(pm, ids, feats_b)),
        ])
    finally:
        rendezvous.remove()
    torch.testing.assert_close(results["a"], expected_a, rtol=0, atol=0)
    torch.testing.assert_close(results["b"], expected_b, rtol=0, atol=0)


def test_text_only_call_after_image_calls_equals_a_fresh_models(pm):
    ids = _ids(1)
    fresh = get_peft_model(tiny_llama(), memvp_config(memory_scale=1.0))
    randomize_memory(fresh, scale=1.0)
    expected = _logits(fresh.eval(), ids)
    _logits(pm, ids, _features(3))
    _run_threads([lambda: _logits(pm, ids, _features(4))])
    torch.testing.assert_close(_logits(pm, ids), expected, rtol=0, atol=0)


def test_generate_in_one_thread_does_not_leak_into_a_text_only_forward_in_another(pm):
    ids = _ids(2)
    text_only = _logits(pm, ids)
    seen = []
    rendezvous = _Rendezvous(pm, parties=2)

    def generate():
        with torch.no_grad():
            pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), image_features=_features(5),
                        max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)

    def text_forwards():
        for _ in range(10):
            seen.append(_logits(pm, ids))

    try:
        _run_threads([generate, text_forwards])
    finally:
        rendezvous.remove()
    assert len(seen) == 10
    for logits in seen:
        torch.testing.assert_close(logits, text_only, rtol=0, atol=0)


def test_text_only_forward_inside_a_logits_processor_is_text_only(pm):
    ids = _ids(3)
    text_only = _logits(pm, ids)
    seen = []

    class ProbeTextOnly(LogitsProcessor):
        def __call__(self, input_ids, scores):
            seen.append(_logits(pm, ids))
            return scores

    with torch.no_grad():
        with_probe = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), image_features=_features(6),
                                 max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0,
                                 logits_processor=LogitsProcessorList([ProbeTextOnly()]))
        plain = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), image_features=_features(6),
                            max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    assert len(seen) == 4
    for logits in seen:
        torch.testing.assert_close(logits, text_only, rtol=0, atol=0)
    assert torch.equal(with_probe, plain)  # the probe did not disturb generate's own memory either


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_an_error_mid_forward_leaves_no_active_memory(pm, error):
    ids = _ids(4)
    text_only = _logits(pm, ids)

    def fail(*args):
        raise error

    handle = pm.get_base_model().model.layers[1].mlp.register_forward_pre_hook(fail)
    with pytest.raises(type(error)):
        _logits(pm, ids, _features(7))
    handle.remove()
    assert pm.base_model._memvp_runtime.active() is None
    torch.testing.assert_close(_logits(pm, ids), text_only, rtol=0, atol=0)


def test_checkpoint_recomputation_on_another_thread_reads_the_forwards_images():
    pm = get_peft_model(tiny_llama(), memvp_config(memory_scale=1.0))
    randomize_memory(pm, scale=1.0)
    pm.train()
    ids = _ids(6)
    feats = _features(8)

    def grads():
        return {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}

    loss = pm(input_ids=ids, labels=ids, image_features=feats).loss
    loss.backward()
    reference = grads()
    pm.zero_grad()
    pm.get_base_model().gradient_checkpointing_enable({"use_reentrant": False})
    loss = pm(input_ids=ids, labels=ids, image_features=feats).loss
    _run_threads([loss.backward])  # the recomputation runs in a thread where the call was never active
    got = grads()
    assert sorted(got) == sorted(reference)
    for name in reference:
        torch.testing.assert_close(got[name], reference[name], rtol=1e-5, atol=1e-7)
