"""Encoder-decoder MemVP (T5 plain and gated, BART): the half of the paper that was never released."""

import pytest
import torch
from conftest import VISUAL_DIM, assert_fresh_process_reproduces, memvp_config, randomize_memory
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from reference_memvp import adapter_state, reference_seq2seq_logits

from memvp_peft.tuner.layer import MemVPLayer

VOCAB = 64


def t5(gated=False, seed=0):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=VOCAB, d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, dropout_rate=0.0,
        feed_forward_proj="gated-gelu" if gated else "relu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    return T5ForConditionalGeneration(config).eval()


def bart(seed=0):
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(seed)
    config = BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        dropout=0.0, activation_dropout=0.0, attention_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=2, forced_eos_token_id=None,
    )
    return BartForConditionalGeneration(config).eval()


BUILDERS = {"t5": t5, "t5-gated": lambda seed=0: t5(gated=True, seed=seed), "bart": bart}


def s2s_config(**overrides):
    return memvp_config(task_type="SEQ_2_SEQ_LM", **overrides)


@pytest.fixture
def inputs():
    torch.manual_seed(3)
    ids = torch.randint(3, VOCAB, (3, 7))
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "decoder_input_ids": torch.randint(3, VOCAB, (3, 5)),
        "image_features": torch.randn(3, 5, VISUAL_DIM),
    }


def adapted(name, **overrides):
    pm = get_peft_model(BUILDERS[name](), s2s_config(**overrides))
    randomize_memory(pm)
    return pm.eval()


@pytest.mark.parametrize(
    "name, expected",
    [
        ("t5", ["encoder.block.0.layer.1.DenseReluDense.wi", "encoder.block.0.layer.1.DenseReluDense.wo"]),
        ("t5-gated", ["encoder.block.0.layer.1.DenseReluDense", "decoder.block.1.layer.2.DenseReluDense"]),
        ("bart", ["model.encoder.layers.1.fc1", "model.decoder.layers.0.fc2"]),
    ],
)
def test_ffns_of_both_stacks_are_found(name, expected):
    targets = get_peft_model(BUILDERS[name](), s2s_config()).peft_config["default"].target_modules
    assert set(expected) <= set(targets)
    assert len(targets) == (4 if name == "t5-gated" else 8)


@pytest.mark.parametrize("side", ["encoder", "decoder"])
def test_memory_side_restricts_to_one_stack(side):
    targets = get_peft_model(bart(), s2s_config(memory_side=side)).peft_config["default"].target_modules
    other = "decoder" if side == "encoder" else "encoder"
    assert targets and all(f".{side}." in t for t in targets) and not any(f".{other}." in t for t in targets)


def test_memory_side_on_a_decoder_only_model_is_rejected():
    from conftest import tiny_llama

    with pytest.raises(ValueError, match="encoder-decoder"):
        get_peft_model(tiny_llama(), memvp_config(memory_side="encoder"))


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("masked", [False, True])
def test_logits_match_reference(name, masked, inputs):
    pm = adapted(name)
    mask = torch.tensor([True, False, True]) if masked else None
    with torch.no_grad():
        got = pm(**inputs, image_mask=mask).logits
    want = reference_seq2seq_logits(
        BUILDERS[name](), adapter_state(pm), pm.peft_config["default"], inputs["input_ids"],
        inputs["decoder_input_ids"], inputs["attention_mask"], inputs["image_features"], mask,
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side", ["encoder", "decoder"])
def test_one_sided_logits_match_reference(side, inputs):
    pm = adapted("t5-gated", memory_side=side)
    with torch.no_grad():
        got = pm(**inputs).logits
    want = reference_seq2seq_logits(
        t5(gated=True), adapter_state(pm), pm.peft_config["default"], inputs["input_ids"],
        inputs["decoder_input_ids"], inputs["attention_mask"], inputs["image_features"], sides=(side,),
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_text_only_matches_reference(inputs):
    pm = adapted("bart")
    text = {k: v for k, v in inputs.items() if k != "image_features"}
    with torch.no_grad():
        got = pm(**text).logits
    want = reference_seq2seq_logits(
        bart(), adapter_state(pm), pm.peft_config["default"], inputs["input_ids"], inputs["decoder_input_ids"],
        inputs["attention_mask"],
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _generate(pm, inputs, **kwargs):
    args = {k: v for k, v in inputs.items() if k != "decoder_input_ids"}
    options = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, suppress_tokens=[0, 1, 2])
    options.update(kwargs)
    with torch.no_grad():
        return pm.generate(**args, **options)


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_generate_cache_equals_no_cache_equals_manual_loop(name, inputs):
    pm = adapted(name, memory_scale=1.0)
    cached = _generate(pm, inputs, use_cache=True)
    uncached = _generate(pm, inputs, use_cache=False)
    assert torch.equal(cached, uncached)
    decoder = cached[:, :1]
    with torch.no_grad():
        for _ in range(6):
            logits = pm(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                        decoder_input_ids=decoder, image_features=inputs["image_features"]).logits[:, -1]
            logits[:, [0, 1, 2]] = float("-inf")  # suppress_tokens of _generate
            decoder = torch.cat([decoder, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, decoder)


def test_generate_computes_memory_once_and_runs_encoder_once(inputs):
    pm = adapted("t5", memory_scale=1.0)
    calls, encoder_calls = [], []
    pm.base_model.memvp_memory["default"].register_forward_hook(lambda *a: calls.append(1))
    pm.base_model.model.encoder.register_forward_hook(lambda *a: encoder_calls.append(1))
    _generate(pm, inputs)
    assert len(calls) == 1 and len(encoder_calls) == 1


def test_beam_search_follows_each_samples_memory(inputs):
    pm = adapted("bart", memory_scale=1.0)
    batched = _generate(pm, inputs, num_beams=3, num_return_sequences=2)
    for row in range(3):
        single = {k: v[row : row + 1] for k, v in inputs.items()}
        assert torch.equal(batched[2 * row : 2 * row + 2], _generate(pm, single, num_beams=3, num_return_sequences=2))


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_image_changes_every_generation_step(name, inputs):
    pm = adapted(name, memory_scale=1.0)
    other = dict(inputs, image_features=inputs["image_features"] * -3)
    a = _generate(pm, inputs, output_scores=True, return_dict_in_generate=True).scores
    b = _generate(pm, other, output_scores=True, return_dict_in_generate=True).scores
    finite = [torch.nan_to_num(x, neginf=0.0) for x in a], [torch.nan_to_num(x, neginf=0.0) for x in b]
    assert all(not torch.allclose(x, y) for x, y in zip(*finite))


def test_save_and_reload_in_a_fresh_process(inputs, tmp_path):
    pm = adapted("t5-gated")
    with torch.no_grad():
        expected = pm(**inputs).logits
    pm.save_pretrained(tmp_path / "adapter")
    assert_fresh_process_reproduces(
        tmp_path, "from test_seq2seq import t5", "t5(gated=True)", tmp_path / "adapter", inputs, expected,
        adapter_name="img",
    )


def test_lora_composition_saves_and_restores_both(inputs, tmp_path):
    lora = LoraConfig(r=4, target_modules=["q", "v", "wi"], init_lora_weights=False)
    pm = get_peft_model(t5(), s2s_config(lora_config=lora))
    randomize_memory(pm, scale=0.3)
    pm.eval()
    assert isinstance(pm.base_model.model.encoder.block[0].layer[1].DenseReluDense.wi, MemVPLayer)
    lora_layers = [n for n, m in pm.named_modules() if isinstance(m, LoraLayer)]
    assert any(n.endswith("SelfAttention.q") for n in lora_layers) and any(".wi.base_layer" in n for n in lora_layers)
    with torch.no_grad():
        expected = pm(**inputs).logits
    pm.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert any("lora_A" in k for k in saved) and any("memvp_memory" in k for k in saved)
    loaded = PeftModel.from_pretrained(t5(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_matches(inputs, use_reentrant):
    def grads(checkpointing):
        pm = get_peft_model(t5(), s2s_config())
        randomize_memory(pm, scale=0.3)
        pm.train()
        if checkpointing is not None:
            pm.base_model.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": checkpointing}
            )
        labels = inputs["decoder_input_ids"]
        pm(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels,
           image_features=inputs["image_features"]).loss.backward()
        checkpointed = any(getattr(m, "gradient_checkpointing", False) for m in pm.base_model.model.modules())
        assert checkpointed == (checkpointing is not None)  # the layers' own flag: every transformers 5 release has it
        return {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}

    expected, got = grads(None), grads(use_reentrant)
    assert expected and all(g is not None for g in expected.values())
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_bad_input_is_rejected(inputs):
    pm = adapted("bart")
    with pytest.raises(ValueError, match=r"batch \(2\) must equal the input batch \(3\)"):
        pm(**dict(inputs, image_features=torch.randn(2, 5, VISUAL_DIM)))
    with pytest.raises(ValueError, match="visual_dim"):
        _generate(pm, dict(inputs, image_features=torch.randn(3, 5, VISUAL_DIM + 1)))
    pm(**inputs)


def test_pixel_values_with_an_attached_encoder(inputs):
    from memvp_peft.demo_models import tiny_clip

    encoder = tiny_clip(hidden_size=VISUAL_DIM)
    pm = get_peft_model(bart(), s2s_config(num_memory_slots=20, vision_encoder=encoder))
    randomize_memory(pm, scale=0.3)
    pixels = torch.randn(3, 3, 32, 32)
    args = {k: v for k, v in inputs.items() if k != "image_features"}
    pm.train()
    pm(**args, pixel_values=pixels, labels=inputs["decoder_input_ids"]).loss.backward()
    projector = [p for n, p in pm.named_parameters() if "projector" in n]
    assert all(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in projector)  # the pixels were used
    pm.eval()
    with torch.no_grad():
        assert not torch.allclose(pm(**args, pixel_values=pixels).logits, pm(**args, pixel_values=-pixels).logits)
    assert _generate(pm, dict(args, pixel_values=pixels)).shape[0] == 3
