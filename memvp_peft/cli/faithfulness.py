"""`python -m memvp_peft.cli.faithfulness`: are the read maps faithful? Deletion / insertion AUCs of the read map
against random orders, the least-read order and Integrated Gradients, and where the map lies on the digit-layout
tasks, for adapters `memvp-train` wrote on the built-in digit tasks.

    python -m memvp_peft.cli.faithfulness --adapters outputs/explain-digits outputs/explain-grid \\
        outputs/explain-sequence --output_dir docs/explain

Each adapter's task and seed are read from its `metrics.json`, so the records are its own held-out split. For each
record: the model's greedy answer, its read map (`explain.records`), the curves (`explain.faithfulness`) and, on
`digits-grid` / `digits-sequence`, the share of the map on the tile / frame the question asks about (the answer's
first token, the digit itself; chance: one tile's area, one frame of eight). Writes `faithfulness.json`,
`faithfulness.md` (the table), `curves-TASK.png` and example read maps `TASK/` with their `index.html`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Optional, Sequence

import numpy as np

TASK_TITLES = {"digits": "digits", "digits-grid": "digits-grid (2x2 tiles)", "digits-sequence": "digits-sequence"}


def asked_box(record: dict, dataset: str) -> Optional[tuple[int, tuple[float, float, float, float], str]]:
    """(image, box, name) of the tile or frame a digit-layout question asks about; None for other tasks."""
    from ..tasks.digits import DIGIT_LAYOUT_TASKS, GRID_CELLS, ORDINALS

    if dataset not in DIGIT_LAYOUT_TASKS:
        return None
    grid, _ = DIGIT_LAYOUT_TASKS[dataset]
    question = record["question"].rstrip(" ?")
    if grid is not None:
        cells = GRID_CELLS[grid]
        cell = next(name for name in sorted(cells, key=len, reverse=True) if question.endswith(name))
        row, col = divmod(cells.index(cell), grid[1])
        return 0, (row / grid[0], (row + 1) / grid[0], col / grid[1], (col + 1) / grid[1]), cell
    ordinal = question.split()[-1]
    return ORDINALS.index(ordinal), (0.0, 1.0, 0.0, 1.0), f"{ordinal} frame"


def _trained_on(folder: str) -> tuple[str, int]:
    path = os.path.join(folder, "metrics.json")
    if not os.path.isfile(path):
        raise ValueError(f"{folder} has no metrics.json: pass adapter folders memvp-train wrote.")
    with open(path) as handle:
        options = json.load(handle)["options"]
    return options["dataset"], int(options["seed"])


def evaluate_adapter(folder: str, records_wanted: int, steps: int, ig_steps: int, draws: int, seed: int,
                     output_dir: str, examples: int) -> dict[str, Any]:
    """Every figure of one adapter (module docstring)."""
    import torch
    from tqdm.auto import tqdm

    from ..explain.faithfulness import area_under, integrated_gradients, record_curves
    from ..explain.layout import box_share
    from ..explain.pictures import save_answer_maps
    from ..explain.records import explain_records
    from ..explain.report import write_report
    from ..tasks.catalogue import load_task, normalise_answer
    from .answering import generate_answers
    from .infer import load_for_inference
    from .options import InferOptions

    dataset, trained_seed = _trained_on(folder)
    model, tokenizer, collator, kind = load_for_inference(InferOptions(adapter=folder))
    records = load_task(dataset, None, None, trained_seed).eval[:records_wanted]
    answers = generate_answers(model, collator, records, kind, tokenizer, 4, progress=False)
    device = next(model.parameters()).device
    rng = np.random.default_rng(seed)
    aucs: dict[str, dict[str, list[float]]] = {}
    curves_sum: dict[str, dict[str, np.ndarray]] = {}
    shares: dict[str, list[float]] = {"read map (digit token)": [], "read map (answer mean)": [],
                                      "integrated gradients (positive)": []}
    cells: dict[str, list[float]] = {}
    entries, example_folder = [], os.path.join(output_dir, dataset)
    points = None
    for index in tqdm(range(len(records)), desc=f"faithfulness {dataset}"):
        record, answer = records[index], answers[index]
        item = explain_records(model, collator, [record], [answer], tokenizer)[0]
        weights = item.reads.slot_weights()
        mean_map = weights.mean(axis=0)
        image_slots = np.flatnonzero(item.layout.image_slots())
        row = {key: value.to(device) if isinstance(value, torch.Tensor) else value
               for key, value in collator([{**record, "answer": answer}]).items()}
        ig_tokens = integrated_gradients(model, row, ig_steps)
        ig = np.zeros(item.layout.num_slots)
        ig[: len(ig_tokens)] = ig_tokens
        rankings = {"read map": mean_map, "read map (first token)": weights[0], "integrated gradients": ig}
        result = record_curves(model, row, rankings, image_slots,
                               item.layout.num_slots, steps, rng, draws)
        points = result["read map"]["points"]
        for name, curves in result.items():
            for kind_ in ("deletion", "insertion"):
                aucs.setdefault(name, {}).setdefault(kind_, []).append(area_under(points, curves[kind_]))
                total = curves_sum.setdefault(name, {}).setdefault(kind_, np.zeros(len(points)))
                total += curves[kind_]
        box = asked_box(record, dataset)
        if box is not None:
            image, region, cell = box
            digit = box_share(weights[0], item.layout, image, region)
            shares["read map (digit token)"].append(digit)
            shares["read map (answer mean)"].append(box_share(mean_map, item.layout, image, region))
            shares["integrated gradients (positive)"].append(box_share(np.clip(ig, 0, None), item.layout, image,
                                                                       region))
            cells.setdefault(cell, []).append(digit)
        if index < examples:
            pictures = save_answer_maps(example_folder, f"{dataset}-{index}", item)
            entries.append({"source": f"held-out record {index}", "question": record["question"], "answer": answer,
                            "log_prob": item.reads.answer_log_prob, "pictures": pictures})
    if entries:
        write_report(example_folder, entries, title=f"Read maps: {dataset}",
                     note=f"adapter {folder}; made by python -m memvp_peft.cli.faithfulness")
    count = len(records)
    accuracy = sum(normalise_answer(a) == normalise_answer(r["answer"]) for a, r in zip(answers, records)) / count
    return {
        "adapter": folder, "dataset": dataset, "records": count, "accuracy": accuracy, "points": points,
        "auc": {name: {k: float(np.mean(v)) for k, v in kinds.items()} for name, kinds in aucs.items()},
        "auc_sem": {name: {k: float(np.std(v) / np.sqrt(len(v))) for k, v in kinds.items()}
                    for name, kinds in aucs.items()},
        "mean_curves": {name: {k: (v / count).tolist() for k, v in kinds.items()} for name, kinds in curves_sum.items()},
        "share_on_asked": {name: float(np.mean(v)) for name, v in shares.items() if v},
        "share_by_cell": {cell: {"share": float(np.mean(v)), "records": len(v)} for cell, v in sorted(cells.items())},
    }


def plot_curves(result: dict[str, Any], path: str) -> None:
    """Mean deletion and insertion curves of every ranking, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.asarray(result["points"], dtype=float)
    x = x / x[-1]
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for axis, kind in zip(axes, ("deletion", "insertion")):
        for name, kinds in result["mean_curves"].items():
            axis.plot(x, kinds[kind], marker=".", label=f"{name} (AUC {result['auc'][name][kind]:.3f})")
        axis.set_xlabel("fraction of image slots " + ("excluded" if kind == "deletion" else "read"))
        axis.set_ylabel("p(answer)")
        axis.set_title(f"{TASK_TITLES.get(result['dataset'], result['dataset'])}: {kind}", fontsize=10)
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def markdown_table(results: Sequence[dict[str, Any]]) -> str:
    """The AUC table (deletion: lower is better; insertion: higher is better) and the shares on the asked block."""
    lines = ["| task | accuracy | records | ranking | deletion AUC (lower is better) | insertion AUC (higher is better) |",
             "|---|---|---|---|---|---|"]
    for result in results:
        for name in ("read map", "read map (first token)", "integrated gradients", "random", "least read"):
            auc, sem = result["auc"][name], result["auc_sem"][name]
            lines.append(f"| {result['dataset']} | {100 * result['accuracy']:.1f}% | {result['records']} | {name} | "
                         f"{auc['deletion']:.3f} ± {sem['deletion']:.3f} | {auc['insertion']:.3f} ± "
                         f"{sem['insertion']:.3f} |")
    shares = [result for result in results if result["share_on_asked"]]
    if shares:
        lines += ["", "| task | share on the asked tile / frame | value |", "|---|---|---|"]
        for result in shares:
            for name, value in result["share_on_asked"].items():
                lines.append(f"| {result['dataset']} | {name} | {100 * value:.1f}% |")
            for cell, value in result["share_by_cell"].items():
                lines.append(f"| {result['dataset']} | read map (digit token), asked: {cell} | "
                             f"{100 * value['share']:.1f}% ({value['records']} records) |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", nargs="+", required=True, help="adapter folders memvp-train wrote")
    parser.add_argument("--output_dir", default="docs/explain", help="where the JSON, table and pictures go")
    parser.add_argument("--records", type=int, default=100, help="held-out records per adapter")
    parser.add_argument("--steps", type=int, default=11, help="points per deletion / insertion curve")
    parser.add_argument("--ig_steps", type=int, default=32, help="Integrated Gradients steps")
    parser.add_argument("--random_draws", type=int, default=3, help="random orders averaged per record")
    parser.add_argument("--examples", type=int, default=3, help="records per adapter whose read maps are drawn")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random orders")
    args = parser.parse_args(argv)
    for value, name in ((args.records, "--records"), (args.steps, "--steps"), (args.ig_steps, "--ig_steps"),
                        (args.random_draws, "--random_draws")):
        if value < 1:
            parser.error(f"{name} must be >= 1, got {value}.")
    for folder in args.adapters:
        _trained_on(folder)  # every folder checked before the first one runs
    os.makedirs(args.output_dir, exist_ok=True)
    results = []
    for folder in args.adapters:
        result = evaluate_adapter(folder, args.records, args.steps, args.ig_steps, args.random_draws, args.seed,
                                  args.output_dir, args.examples)
        plot_curves(result, os.path.join(args.output_dir, f"curves-{result['dataset']}.png"))
        results.append(result)
    command = "python -m memvp_peft.cli.faithfulness " + " ".join(sys.argv[1:] if argv is None else argv)
    with open(os.path.join(args.output_dir, "faithfulness.json"), "w") as handle:
        json.dump({"command": command, "results": results}, handle, indent=1)
    table = markdown_table(results)
    with open(os.path.join(args.output_dir, "faithfulness.md"), "w") as handle:
        handle.write(f"Made by `{command}`.\n\n{table}")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
