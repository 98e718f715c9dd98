"""`memvp-infer`: answer questions about images with a base model + a MemVP adapter.

    memvp-infer --adapter outputs/memvp-digits --image digits:0 digits:1 photo.png
    memvp-infer --adapter out --input_file questions.jsonl --output_file answers.jsonl
    memvp-infer --adapter out --dataset scienceqa:data/scienceqa --split test --output_file preds.jsonl
    memvp-infer --adapter outputs/memvp-digits --image digits:0 digits:1 --explain read-maps   # + read maps
    python -m memvp_peft.infer --help

The base defaults to the one the adapter records (`base_model_name_or_path` in adapter_config.json, at the `revision`
it records; the embedded demo model is saved next to its adapter): a local folder or a Hub id, resolved as
`from_pretrained` does (downloaded when online, the Hugging Face cache offline). How images become the adapter's
visual input (vision encoder, VLM tower, or the built-in digit patches) is read from the run manifest
`memvp_cli.json`, written by `memvp-train`, and so is how the questions were prompted. `--dataset scienceqa:DIR`
scores ScienceQA as the MemVP authors did (`cli.scienceqa_eval`): one line per problem, `scores.json` with the paper's
columns, the table printed.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Any, Optional, Sequence

from ..tuner.save_load import CONFIG_NAME, check_adapter_folder
from ..data.conversations import ORIGIN_FIELD
from .answering import asked_question, generate_answers
from .explaining import check_explain_request, write_read_maps
from ..hub import MODEL_SOURCE, check_model_source, is_hub_id, is_offline
from .model_loading import RUN_MANIFEST, load_base, read_adapter_config, read_run_manifest, without_peft_probe_warning
from .options import InferOptions, run_command
from .visual_input import collator_from_manifest, encoder_image_processor


#: `--image digits:INDEX` (and `"image": "digits:INDEX"` in an --input_file): scikit-learn's digit scan INDEX
DIGIT_IMAGE_PREFIX = "digits:"


@functools.lru_cache(maxsize=1)
def _digit_scans() -> Any:
    from sklearn.datasets import load_digits

    return load_digits().images


def is_digit_image(value: Any) -> bool:
    """Whether an image value names one of scikit-learn's digit scans (`digits:INDEX`) rather than a file."""
    return isinstance(value, str) and value.startswith(DIGIT_IMAGE_PREFIX)


def digit_image(spec: str, where: str = "") -> Any:
    """The array of `digits:INDEX`, for `--image` and for an `--input_file` line alike -- a negative INDEX would count
    from the end (numpy), which is never what was meant, so only 0 <= INDEX < 1797 is accepted."""
    images = _digit_scans()
    expected = f"{where}{': ' if where else ''}{spec!r}: expected digits:INDEX with 0 <= INDEX < {len(images)}."
    try:
        index = int(spec[len(DIGIT_IMAGE_PREFIX):])
    except ValueError as error:
        raise ValueError(expected) from error
    if not 0 <= index < len(images):
        raise ValueError(expected)
    return images[index]


def _resolve_image(spec: str) -> Any:
    """An `--image`: a file path, or the array of `digits:INDEX`."""
    if is_digit_image(spec):
        return digit_image(spec)
    if not os.path.isfile(spec):
        raise ValueError(f"image file {spec} does not exist.")
    return spec


def _with_digit_images(record: dict[str, Any]) -> dict[str, Any]:
    """An `--input_file` record whose `digits:INDEX` images (under `image` or in an `images` list) are arrays, as
    `--image digits:INDEX` makes them; the names stay as the record's `source`, what its answer line shows."""
    for field in ("image", "images"):
        value = record.get(field)
        names = value if isinstance(value, list) else [value]
        if not any(is_digit_image(name) for name in names):
            continue
        where = str(record.get(ORIGIN_FIELD, ""))
        record["source"] = value
        arrays = [digit_image(name, where) if is_digit_image(name) else name for name in names]
        record[field] = arrays if isinstance(value, list) else arrays[0]
    return record


def answer_row(record: dict[str, Any], answer: str) -> dict[str, Any]:
    """One line of the answers: the image as the question named it (`digits:3`, the file's path, a list for several,
    null for a text-only question), the question in whatever layout it came (`question`, `prompt`, `conversations`,
    ...), the answer, and for a video its file or frames."""
    image = record.get("source")
    if image is None:
        image = record.get("image") if record.get("image") is not None else record.get("images")
    row = {"image": image, "question": asked_question(record), "answer": answer}
    video = record.get("video") if record.get("video") is not None else record.get("frames")
    if video is not None:
        row["video"] = video
    return row


def _shown_source(row: dict[str, Any]) -> str:
    """What an answer's printed line starts with: its image(s), else its video, else that it had none."""
    source = row["image"] if row["image"] is not None else row.get("video")
    if source is None:
        return "(no image)"
    return ", ".join(map(str, source)) if isinstance(source, list) else str(source)


def _check_output_file(options: InferOptions) -> None:
    """Refuse an `--output_file` that cannot be written before anything is loaded or answered: finding out after all
    the answering loses the run (and an output file that is the input file would replace the questions)."""
    path = options.output_file
    if not path:
        return
    if os.path.isdir(path):
        example = os.path.join(path, "answers.jsonl")
        raise ValueError(f"--output_file {path} is a folder; pass a file path, e.g. {example}.")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"--output_file {path}: the folder {folder} does not exist; create it first.")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ValueError(f"--output_file {path} cannot be written (no permission).")
    if options.input_file and os.path.exists(path) and os.path.samefile(path, options.input_file):
        raise ValueError(f"--output_file {path} is also the --input_file: the answers would replace the questions; "
                         "pass another file.")


def _write_answers(path: str, results: list[dict[str, Any]]) -> None:
    """Write the JSONL through a staged file moved into place: an interrupted write keeps the previous file whole."""
    staged = f"{path}.tmp-{os.getpid()}"
    try:
        with open(staged, "w") as handle:
            for row in results:
                handle.write(json.dumps(row) + "\n")
        os.replace(staged, path)
    finally:
        if os.path.exists(staged):
            os.remove(staged)


def _adapter_folder(name: str) -> str:
    """The folder of `--adapter`: a local folder, else a Hub repo id -- its snapshot (the adapter files and their
    memvp_cli.json), downloaded when online, taken from the Hugging Face cache offline, as peft resolves it."""
    from huggingface_hub import constants, snapshot_download

    if os.path.isdir(name) or not is_hub_id(name):
        if not os.path.isfile(os.path.join(name, CONFIG_NAME)):
            raise ValueError(f"{name} is not an adapter folder (no {CONFIG_NAME}); run memvp-train first, or pass "
                             "the Hub id ('org/name') of an adapter.")
        return name
    try:
        folder = snapshot_download(name, local_files_only=is_offline())
    except Exception as error:  # offline and not cached, unknown or gated repo, no connection
        if is_offline():
            why = (f"it is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) while downloads are off "
                   f"(HF_HUB_OFFLINE=1): download it once online (`hf download {name}`)")
        else:
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            why = f"it could not be downloaded ({type(error).__name__}: {first}): check the id and the connection"
        raise ValueError(f"--adapter {name!r} is not an adapter folder here, and as a Hub id {why}; or run "
                         "memvp-train first and pass its output folder.") from error
    if not os.path.isfile(os.path.join(folder, CONFIG_NAME)):
        raise ValueError(f"--adapter {name!r}: the Hub repo holds no {CONFIG_NAME}; it is not a peft adapter.")
    return folder


def _base_path(options: InferOptions, adapter: str, recorded: Optional[str], recorded_revision: Optional[str]):
    """(name, revision, what) of the base to load: `--model_name_or_path` (at `--revision`), else the one the adapter
    records (at `--revision`, else the revision it records). Each refusal says what to pass instead: a recorded path
    that moved away needs the flag, a wrong flag a model folder or a Hub id, a Hub id offline a cache holding it."""
    if options.model_name_or_path:
        what = "--model_name_or_path"
        check_model_source(options.model_name_or_path, what, options.revision)
        return options.model_name_or_path, options.revision, what
    if not recorded:
        raise ValueError(f"{os.path.join(adapter, CONFIG_NAME)} records no base model "
                         "(base_model_name_or_path); pass --model_name_or_path with the folder or Hub id of the base "
                         "it was trained on.")
    what = "the base model the adapter records,"
    revision = options.revision or recorded_revision
    if not os.path.isdir(recorded) and not is_hub_id(recorded):
        where = "" if os.path.isabs(recorded) else f" (read relative to the current folder {os.getcwd()})"
        beside = os.path.join(adapter, "base_model")  # the embedded base, when its run folder was moved
        hint = (f"--model_name_or_path {beside} (the base memvp-train saved next to this adapter)"
                if os.path.isfile(os.path.join(beside, "config.json"))
                else f"--model_name_or_path with that base model as {MODEL_SOURCE}")
        raise ValueError(f"the adapter records the base model {recorded!r}{where}, which is not a local folder here; "
                         f"pass {hint}.")
    check_model_source(recorded, what, revision)
    return recorded, revision, what


def _missing_encoder(vision: str) -> ValueError:
    """Why the encoder the adapter names is not attached: a Hub id that cannot be had here gets its reason (the
    tuner only warned, so that the adapter itself still loads), a folder that is gone the way to attach one."""
    from ..vision import load_vision_encoder

    if is_hub_id(vision):
        try:
            load_vision_encoder(vision)
        except ValueError as error:
            return ValueError(f"the adapter was trained with the vision encoder {vision!r}: {error}")
    return ValueError(
        f"the adapter was trained with the vision encoder {vision!r}, which is not a local folder here; load it "
        "with the Python API and `memvp_peft.attach_vision_encoder(peft_model, encoder)`."
    )


def load_for_inference(options: InferOptions):
    """(peft model, tokenizer, collator, kind) for the adapter, with clear errors for wrong pairings."""
    import torch
    from peft import PeftModel

    import memvp_peft  # noqa: F401  (registers MEMVP)

    from ..tasks.digits import DigitPatchFeaturizer

    adapter = _adapter_folder(options.adapter)
    check_adapter_folder(adapter)
    config = read_adapter_config(adapter)  # both files are checked before the base loads
    manifest = read_run_manifest(adapter)
    base_path, revision, what = _base_path(options, adapter, config.base_model_name_or_path, config.revision)
    vision = manifest.get("vision_model_name_or_path")
    if vision and manifest.get("featurizer") is None and is_hub_id(vision):  # offline: in the cache, before any load
        check_model_source(vision, "the vision encoder the adapter was trained with,")
    model, tokenizer, kind = load_base(base_path, load_in_4bit=False, bf16=False, revision=revision,
                                       trust_remote_code=options.trust_remote_code, what=what)
    try:
        with without_peft_probe_warning():  # peft's probe of a deprecated transformers property: nothing to act on
            peft_model = PeftModel.from_pretrained(model, adapter).eval()
    except ValueError as error:
        raise ValueError(f"the adapter {options.adapter} does not fit the base {base_path}: {error}") from error
    peft_model.to("cuda" if torch.cuda.is_available() else "cpu")  # the base loads on the CPU
    input_name = "pixel_values"
    normalization = manifest.get("image_normalization", "encoder")
    if manifest.get("featurizer") == "digit_patches":
        processor, input_name = DigitPatchFeaturizer(), "image_features"
    elif vision:  # an external encoder wins over a VLM's own tower, as in memvp-train
        attached = peft_model.base_model.vision_encoder
        if attached is None:
            raise _missing_encoder(vision)
        processor = encoder_image_processor(vision, attached.model.config, normalization)
    elif kind == "vlm":
        processor = encoder_image_processor(base_path, model.config.vision_config, normalization, revision=revision,
                                            trust_remote_code=options.trust_remote_code)
    else:
        why = (f"its {RUN_MANIFEST} names no vision encoder" if manifest
               else f"no {RUN_MANIFEST}; it was not trained by memvp-train")
        raise ValueError(
            f"{options.adapter} does not say how to turn images into features ({why}) -- use the Python API with "
            "image_features or pixel_values, or pass --vision_encoder when converting the authors' checkpoint."
        )
    collator = collator_from_manifest(tokenizer, processor, manifest, input_name=input_name, kind=kind,
                                      prompt_template=options.prompt_template)  # --input_file paths: load_jsonl
    return peft_model, tokenizer, collator, kind


def infer(options: InferOptions) -> list[dict[str, Any]]:
    """Answer every question; everything that can be checked without a model (the output file, the questions and
    images, then the adapter's files) is checked before the first model loads."""
    from ..tasks.files import load_jsonl

    _check_output_file(options)
    check_explain_request(options)
    if options.dataset is not None:
        return score_dataset(options)
    if options.input_file:
        if not os.path.isfile(options.input_file):
            raise ValueError(f"input file {options.input_file} does not exist.")
        folder = options.image_folder or os.path.dirname(os.path.abspath(options.input_file))
        records = load_jsonl(options.input_file, folder, require_answer=False, image_names=is_digit_image,
                             allow_outside_image_folder=options.allow_outside_image_folder)
        records = [_with_digit_images(record) for record in records]
        if not records:
            raise ValueError(f"input file {options.input_file} holds no questions (it is empty or has only blank "
                             'lines); write one {"image": ..., "question": ...} object per line.')
    elif options.image:
        records = [{"image": _resolve_image(spec), "question": options.question, "source": spec} for spec in options.image]
    else:
        raise ValueError("nothing to answer: pass --image FILE [FILE ...] (or digits:INDEX) or --input_file.")
    model, tokenizer, collator, kind = load_for_inference(options)
    if options.explain and kind == "seq2seq":
        raise ValueError("--explain draws the reads of decoder-only bases; this adapter's base is an encoder-decoder "
                         "model.")
    answers = generate_answers(model, collator, records, kind, tokenizer, options.max_new_tokens or 16,
                               batch_size=options.batch_size, progress=len(records) > options.batch_size)
    results = [answer_row(record, answer) for record, answer in zip(records, answers)]
    for row in results:
        print(f"{_shown_source(row)}: {row['question']} -> {row['answer']}")
    if options.output_file:
        _write_answers(options.output_file, results)
    if options.explain:
        page = write_read_maps(options, model, tokenizer, collator, records, answers, results)
        print(f"wrote the read maps and {page}")
    return results


def score_dataset(options: InferOptions) -> list[dict[str, Any]]:
    """`--dataset scienceqa:DIR`: answer every problem of `--split`, write the prediction lines and `scores.json`
    (with `--output_file`), print the paper's table. The problems and their images are read before any model loads."""
    from ..tasks.scienceqa import format_scores_table, is_scienceqa_dataset, load_scienceqa, scienceqa_scores
    from .scienceqa_eval import answer_scienceqa, prediction_rows, scores_path, write_scienceqa_results

    given = [flag for flag, value in (("--image", options.image), ("--input_file", options.input_file)) if value]
    if given:
        raise ValueError(f"--dataset scores a whole benchmark; {' and '.join(given)} answer questions of your own: "
                         "pass one or the other.")
    if not is_scienceqa_dataset(options.dataset):
        raise ValueError(f"memvp-infer --dataset scores ScienceQA: pass scienceqa:DIR, got {options.dataset!r} (to "
                         "answer other questions, use --input_file or --image).")
    if options.output_file:
        scores_path(options.output_file)  # refused before the answering, not after
    records = load_scienceqa(options.dataset, options.split, options.use_caption,
                             allow_outside_image_folder=options.allow_outside_image_folder)
    model, tokenizer, collator, kind = load_for_inference(options)
    predictions = answer_scienceqa(model, collator, records, kind, tokenizer, batch_size=options.batch_size,
                                   max_new_tokens=options.max_new_tokens or 1)
    rows = prediction_rows(records, predictions, collator)
    if options.output_file:
        scores = write_scienceqa_results(options.output_file, records, rows)
        where = f"; wrote {options.output_file} and {scores_path(options.output_file)}"
    else:
        scores, where = scienceqa_scores(records, predictions), ""
    print(f"ScienceQA {options.split}: {len(records)} problems{where}")
    print(format_scores_table(scores))
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_command("memvp-infer", InferOptions, infer, argv, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
