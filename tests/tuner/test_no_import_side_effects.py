"""`import memvp_peft` registers the MEMVP peft type and changes nothing else for other peft users."""

import subprocess
import sys
import textwrap


def _run(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_peft_model_methods_are_the_same_objects_before_and_after_import():
    out = _run(
        """
        import peft, transformers
        names = ("save_pretrained", "load_adapter", "from_pretrained")
        before = {n: peft.PeftModel.__dict__[n] for n in names}
        generate_before = transformers.GenerationMixin.__dict__["generate"]
        import memvp_peft
        assert all(peft.PeftModel.__dict__[n] is before[n] for n in names), "PeftModel was patched"
        assert transformers.GenerationMixin.__dict__["generate"] is generate_before
        print("MEMVP" in peft.PeftType.__members__)
        """
    )
    assert out.strip() == "True"


def test_a_lora_user_saves_and_loads_exactly_as_without_memvp(tmp_path):
    code = """
        import sys, torch
        from peft import LoraConfig, PeftModel, get_peft_model
        from transformers import LlamaConfig, LlamaForCausalLM
        if sys.argv[1] == "with":
            import memvp_peft
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)
        pm = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
        pm.save_pretrained(sys.argv[2])
        loaded = PeftModel.from_pretrained(LlamaForCausalLM(config), sys.argv[2])
        print(type(loaded.base_model).__name__, sorted(__import__("os").listdir(sys.argv[2])))
    """
    outputs = []
    for mode in ("without", "with"):
        result = subprocess.run([sys.executable, "-c", textwrap.dedent(code), mode, str(tmp_path / mode)],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs.append(result.stdout.strip())
    assert outputs[0] == outputs[1]
    assert (tmp_path / "without" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "with" / "adapter_model.safetensors"
    ).read_bytes()
