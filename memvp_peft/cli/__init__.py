"""The command-line programs `memvp-train` and `memvp-infer`, and what they share.

    options       the option dataclasses, filled from a YAML file and/or flags, with range checks
    base_loading  loading a local base model (and its image processor) the same way in both programs
    train         `memvp-train`: the HF `Trainer` run, the reload check, metrics.json and the loss curve
    reporting     what a run leaves for people: loss lines, the loss-curve PNG, metrics.json
    record        `memvp_cli.json`: how training turned images into the adapter's visual input
    infer         `memvp-infer`: answers from a base model + a saved adapter
    answering     greedy answers and exact-match accuracy, shared so both programs score alike

Nothing is imported here: `memvp-infer --help` should not pay for the training modules, and
`python -m memvp_peft.cli.train` should find its module not yet imported.
"""
