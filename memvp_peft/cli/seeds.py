"""`python -m memvp_peft.cli.seeds`: one `memvp-train` configuration over several seeds, and the spread of its held-out
accuracy -- how the docs state their figures, in a command anyone can rerun.

    python -m memvp_peft.cli.seeds                                     # the embedded default, seeds 0 1 2
    python -m memvp_peft.cli.seeds --dataset digits-grid --max_steps 2000 --visual_scale 0.1

Why a spread and not one run: a run is deterministic on one machine, but its seed picks the held-out split, the
embedded random base and the adapter's start, and a CPU with other float kernels lands a digit or two away; a single
figure reads as more exact than it is. Every option but `--seeds` is memvp-train's (`memvp-train --help`). Seed N
trains into OUTPUT_DIR/seed-N -- OUTPUT_DIR is `--output_dir`, else memvp-train's default folder with `-seeds` --
and OUTPUT_DIR/seeds.json records each seed's figures, their mean, min and max, the CPU and the command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import sys
from typing import Any, Optional, Sequence

from .options import TrainOptions, build_parser, default_output_dir, load_yaml_options, parse_options

PROGRAM = "python -m memvp_peft.cli.seeds"
DEFAULT_SEEDS = (0, 1, 2)


def seed_runs(argv: Sequence[str]) -> tuple[str, list[TrainOptions]]:
    """(the folder of the runs, one `TrainOptions` per seed), every refusal before anything trains."""
    parser = argparse.ArgumentParser(prog=PROGRAM, allow_abbrev=False, description=__doc__.split("\n\n")[0],
                                     epilog="Every other option is memvp-train's (memvp-train --help).")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS),
                        help=f"the seeds to train with (default: {' '.join(map(str, DEFAULT_SEEDS))})")
    known, rest = parser.parse_known_args(argv)
    seeds = known.seeds
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {' '.join(map(str, seeds))} names a seed twice; each seed is one run.")
    options = parse_options(TrainOptions, rest, PROGRAM)  # memvp-train's checks of every other option
    given = build_parser(TrainOptions, PROGRAM).parse_args(rest)
    if given.seed is not None or (given.config and "seed" in load_yaml_options(given.config, TrainOptions)):
        raise ValueError("--seeds sets each run's seed: drop --seed (or the YAML file's 'seed').")
    derived = default_output_dir(options.dataset, options.model_name_or_path, options.vision_model_name_or_path,
                                 options.quick)
    folder = f"{derived}-seeds" if options.output_dir == derived else options.output_dir
    if os.path.isdir(folder) and os.listdir(folder) and not options.overwrite_output_dir:
        raise ValueError(f"{folder!r} is not empty: pass --overwrite_output_dir to replace its runs, or another "
                         "--output_dir.")
    return folder, [dataclasses.replace(options, seed=seed, output_dir=os.path.join(folder, f"seed-{seed}"))
                    for seed in seeds]


def spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, min and max."""
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}


def run_seeds(argv: Sequence[str]) -> dict[str, Any]:
    """Train each seed in turn, then write and print the spread."""
    import torch

    from ..bench.measure import cpu_name
    from .train import train

    folder, runs = seed_runs(argv)
    figures: dict[str, dict[str, Any]] = {}
    for options in runs:
        metrics = train(options)
        figures[str(options.seed)] = {key: metrics[key] for key in
                                      ("heldout_accuracy", "reloaded_heldout_accuracy", "eval_samples", "train_time_s")}
    accuracies = [seed["heldout_accuracy"] for seed in figures.values()]
    summary = {
        "command": shlex.join([*PROGRAM.split(), *argv]),
        "cpu": cpu_name(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "seeds": figures,
        "heldout_accuracy": spread(accuracies),
    }
    with open(os.path.join(folder, "seeds.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    stats = summary["heldout_accuracy"]
    samples = sorted({seed["eval_samples"] for seed in figures.values()})
    print(f"held-out accuracy over seeds {', '.join(figures)} ({'/'.join(map(str, samples))} samples each): "
          f"{stats['mean']:.2%} mean, {stats['min']:.2%} - {stats['max']:.2%} (min - max); {summary['cpu']}; wrote "
          f"{os.path.join(folder, 'seeds.json')}")
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        run_seeds(list(sys.argv[1:] if argv is None else argv))
    except ValueError as error:
        print(f"{PROGRAM}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from memvp_peft_console import quiet_third_party_output

    quiet_third_party_output()
    sys.exit(main())
