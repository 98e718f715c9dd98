"""Serving MemVP adapters on vLLM: a vLLM plugin, loaded in every vLLM process through the `vllm.general_plugins`
entry point (`plugin.register`), that runs an untouched base model with a MemVP adapter's memory read in every FFN.

* `adapter`     -- the adapter folder as the server reads it (`adapter_config.json`, `adapter_model.safetensors`,
                   the run manifest `memvp_cli.json`), every option the plugin does not implement refused by name;
* `bank`        -- the per-request memory: a fixed bank of keys/values, one slot per running request, slot 0 the
                   text-only memory (p_k, p_v);
* `model`       -- the model classes (Llama, Mistral, Qwen2, Qwen3): vLLM's own layers and weight names, each FFN's
                   output plus `s * act(x K[slot]^T) V[slot]`;
* `processor`   -- vLLM's multimodal processor for them: image features or pixels (through the adapter's vision
                   encoder) become one whole-prompt item of the request, validated in the front end;
* `pixels`      -- pixels to the features the adapter was trained on, with memvp-peft's own encoder code;
* `runner_hook` -- the one wrapper of vLLM's V1 model runner: which bank slot each scheduled token reads;
* `plugin`      -- `register()`: the model classes and the runner hook, once per process;
* `launch`      -- `memvp-serve`: vLLM's OpenAI-compatible server with the adapter.

Nothing here imports the training stack (TRL, DeepSpeed, datasets, the trainers): a serving environment holds vLLM,
memvp-peft's core and nothing more. docs/serving.md is the user's page.
"""
