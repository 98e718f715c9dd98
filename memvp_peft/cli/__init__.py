"""The command-line programs `memvp-train` and `memvp-infer`, what they share, and the commands around them.

    options         the option dataclasses, filled from a YAML file and/or flags, with range checks
    train           `memvp-train`, as named steps: check, build, fit, reload (the saved adapter answers again from
                    disk), report (loss lines, the loss-curve PNG, metrics.json, the model card)
    run_folder      `output_dir`: what a run may write, a replacing run switched in once it has trained, each
                    `checkpoint-N` written whole, a failed write as one error line
    infer           `memvp-infer`: answers from a base model + a saved adapter
    model_loading   what both programs load the same way: a base model (local folder or Hub id) and its image
                    processor, the adapter config, the run manifest `memvp_cli.json`
    visual_input    how images become the adapter's visual input in both programs: tiles / frames / compression /
                    ADEM-VL layout, the collator (and what the manifest keeps of it), `--cache_image_features`
    answering       greedy answers and exact-match accuracy, shared so both programs score alike
    scienceqa_eval  answering ScienceQA the authors' way; `preds.jsonl`, `scores.json`
    convert         `python -m memvp_peft.convert`: the MemVP / ADEM-VL authors' `.pth` -> an adapter folder
    seeds           `python -m memvp_peft.cli.seeds`: one configuration over several seeds, and the spread
    token_budget    `python -m memvp_peft.cli.token_budget`: tokens per step, the authors' padding against ours

Nothing is imported here: `memvp-infer --help` should not pay for the training modules, and
`python -m memvp_peft.cli.train` should find its module not yet imported.
"""
