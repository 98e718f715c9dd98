"""The runner hook's guard: the V1 runner methods it wraps still exist with the parameters it was written for, the
decoder layers still call the submodules the MemVP loop calls, and anything else is refused clearly."""

from __future__ import annotations

import inspect

import pytest

pytest.importorskip("vllm")

from memvp_peft.serving.model import BASES, LAYER_STEPS  # noqa: E402
from memvp_peft.serving.runner_hook import WRAPPED, check_signatures, check_vllm_version  # noqa: E402


def test_the_wrapped_runner_methods_keep_their_signatures():
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    for name, parameters in WRAPPED.items():
        method = getattr(GPUModelRunner, name)
        original = getattr(method, "__wrapped__", method)
        assert tuple(inspect.signature(original).parameters) == parameters
    check_signatures(GPUModelRunner)


def test_a_runner_with_another_signature_or_without_the_method_is_refused():
    class Changed:
        def _init_model_kwargs(self, num_reqs, extra):
            return {}

        def _on_request_state_removed(self, req_id, req_state):
            return None

    class Missing:
        def _init_model_kwargs(self, num_reqs):
            return {}

    with pytest.raises(RuntimeError, match="takes"):
        check_signatures(Changed)
    with pytest.raises(RuntimeError, match="has no _on_request_state_removed"):
        check_signatures(Missing)


def test_an_untested_vllm_release_is_refused():
    check_vllm_version("0.32.0")
    with pytest.raises(RuntimeError, match="tested with vLLM 0.32"):
        check_vllm_version("0.33.0")


@pytest.mark.parametrize("base", sorted(BASES))
def test_each_supported_decoder_layer_calls_the_steps_the_memvp_loop_calls(base):
    import importlib

    module = importlib.import_module(BASES[base][0])
    layer_class = next(value for name, value in vars(module).items() if name.endswith("DecoderLayer")
                       and inspect.isclass(value) and value.__module__ == module.__name__)
    source = inspect.getsource(layer_class.forward)
    positions = [source.find(f"self.{step}(") for step in LAYER_STEPS]
    assert -1 not in positions and positions == sorted(positions), (layer_class.__name__, positions)
