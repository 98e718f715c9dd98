"""Training details users hit: gradient checkpointing, mixed precision, the HF Trainer."""

import pytest
import torch
from conftest import VISUAL_DIM, memvp_config, randomize_memory, tiny_llama
from peft import get_peft_model


def _grads(pm, batch, checkpointing=None, steps=1):
    pm.train()
    if checkpointing is not None:
        pm.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
    pm.zero_grad()
    for _ in range(steps):
        out = pm(**batch, labels=batch["input_ids"])
        out.loss.backward()
    return {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}


def _fresh(seed=0):
    pm = get_peft_model(tiny_llama(), memvp_config())
    randomize_memory(pm, seed=seed)
    return pm


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(batch, use_reentrant):
    expected = _grads(_fresh(), batch)
    got = _grads(_fresh(), batch, checkpointing=use_reentrant)
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_two_forwards_before_one_backward_under_checkpointing(batch, use_reentrant):
    """The second forward replaces the memory; the first forward's recomputation must still see its own."""
    other = dict(batch, image_features=torch.randn_like(batch["image_features"]) * 2)

    def run(pm, checkpointing):
        pm.train()
        if checkpointing is not None:
            pm.base_model.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": checkpointing}
            )
        loss = pm(**batch, labels=batch["input_ids"]).loss + 0.5 * pm(**other, labels=other["input_ids"]).loss
        loss.backward()
        return {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}

    expected = run(_fresh(), None)
    got = run(_fresh(), use_reentrant)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_base_model_gets_no_gradients(batch):
    pm = _fresh()
    _grads(pm, batch)
    assert all(p.grad is None for n, p in pm.named_parameters() if "memvp" not in n)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_keeps_fp32_adapter(batch, dtype):
    model = tiny_llama().to(dtype)
    pm = get_peft_model(model, memvp_config())
    assert all(p.dtype == torch.float32 for n, p in pm.named_parameters() if "memvp" in n)
    out = pm(**batch, labels=batch["input_ids"])
    assert out.logits.dtype == dtype
    out.loss.backward()
    grads = [p.grad for n, p in pm.named_parameters() if "memvp" in n]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_autocast_bf16_forward_and_backward(batch):
    pm = get_peft_model(tiny_llama(), memvp_config())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pm(**batch, labels=batch["input_ids"])
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for n, p in pm.named_parameters() if "memvp" in n)


def test_dropout_is_active_in_training_and_off_in_eval(batch):
    pm = get_peft_model(tiny_llama(), memvp_config(memory_dropout=0.5))
    randomize_memory(pm)
    pm.train()
    a = pm(**batch).logits
    b = pm(**batch).logits
    assert not torch.allclose(a, b)
    pm.eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(**batch).logits, pm(**batch).logits)


CLASSES = 4
PROMPT = [1, 5, 6, 7]  # bos + the same "question" in every row: the text never tells the answer


def _image_only_answers(num_rows: int, seed: int, prototypes: torch.Tensor) -> dict:
    """Rows whose answer token (10 + class) is told by the image alone: `image_features` are noisy copies of the
    class prototype, the prompt is the same everywhere, the classes are balanced, only the answer is supervised."""
    generator = torch.Generator().manual_seed(seed)
    classes = torch.arange(num_rows) % CLASSES
    features = prototypes[classes] + 0.3 * torch.randn(num_rows, *prototypes.shape[1:], generator=generator)
    input_ids = torch.cat([torch.tensor(PROMPT).expand(num_rows, -1), (10 + classes)[:, None]], dim=1)
    labels = torch.full_like(input_ids, -100)
    labels[:, -1] = input_ids[:, -1]
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "image_features": features,
            "labels": labels}  # fmt: skip


def test_optimizer_steps_learn_answers_only_the_image_tells():
    """Held-out rows are answered from their image: without `image_features` the best a model can do is one fixed
    answer for every row, right for a quarter of them (a falling loss would not show this: learning the four answer
    tokens lowers it without any image)."""
    prototypes = torch.randn(CLASSES, 5, VISUAL_DIM, generator=torch.Generator().manual_seed(0))
    train, held_out = _image_only_answers(32, 1, prototypes), _image_only_answers(64, 2, prototypes)
    pm = get_peft_model(tiny_llama(), memvp_config())
    optimizer = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=3e-2)
    pm.train()
    for _ in range(30):
        pm(**train).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    pm.eval()
    with torch.no_grad():
        predicted = pm(**held_out).logits[:, -2].argmax(dim=-1)
    accuracy = (predicted == held_out["labels"][:, -1]).float().mean().item()
    assert accuracy >= 0.9, f"held-out accuracy {accuracy:.3f}; one answer for every row reaches {1 / CLASSES}"


class _Rows(torch.utils.data.Dataset):
    """16 rows of random tokens, each with 4 image-feature vectors."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        rows = [{"input_ids": torch.randint(3, 64, (6,)), "image_features": torch.randn(4, 16)} for _ in range(16)]
        self.rows = [dict(r, labels=r["input_ids"].clone(), attention_mask=torch.ones(6, dtype=torch.long))
                     for r in rows]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _trainer(pm, tmp_path, callbacks=(), **settings):
    """A plain HF Trainer over `_Rows`, 4 rows a step, 4 steps (`settings` override the TrainingArguments)."""
    from transformers import Trainer, TrainingArguments

    args = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2,
                logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", remove_unused_columns=True)
    args.update(settings)
    return Trainer(model=pm, args=TrainingArguments(**args), train_dataset=_Rows(), callbacks=list(callbacks))


def test_trainer_keeps_image_features_and_trains(tmp_path):
    seen = []
    pm = get_peft_model(tiny_llama(), memvp_config(task_type="CAUSAL_LM"))
    pm.base_model.memvp_memory["default"].register_forward_pre_hook(lambda m, args: seen.append(args))
    trainer = _trainer(pm, tmp_path)
    before = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    trainer.train()
    assert seen and all(a and a[0] is not None and a[0].shape == (4, 4, 16) for a in seen)
    changed = [n for n, p in pm.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("projector" in n for n in changed)


def test_stop_on_non_finite_ends_a_run_whose_loss_is_nan_before_the_step_is_applied(tmp_path):
    """visual_scale=1e38 is a finite float32, but the first product with it overflows: the loss of step 1 is NaN.
    Without the callback the Trainer writes the NaN gradients into the weights and carries on."""
    from memvp_peft import NonFiniteTrainingError, StopOnNonFinite

    pm = get_peft_model(tiny_llama(), memvp_config(task_type="CAUSAL_LM", visual_scale=1e38))
    before = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    with pytest.raises(NonFiniteTrainingError, match=r"training stopped at step 1: the loss of that step, or its "
                                                     r"gradient, is not finite \(the gradient of .*memvp_memory"):
        _trainer(pm, tmp_path, callbacks=[StopOnNonFinite()]).train()
    assert all(torch.equal(p, before[n]) for n, p in pm.named_parameters() if p.requires_grad)


def test_stop_on_non_finite_names_the_parameter_a_huge_learning_rate_blew_up(tmp_path):
    """lr 1e38: Adam's first step moves the weights by about 1e38 (finite, but beyond what an adapter may hold) or
    beyond float32 (inf, then NaN)."""
    from memvp_peft import NonFiniteTrainingError, StopOnNonFinite

    pm = get_peft_model(tiny_llama(), memvp_config(task_type="CAUSAL_LM"))
    with pytest.raises(NonFiniteTrainingError, match=r"training stopped at step 1: after that step the parameter "
                                                     r"\S*memvp_memory\S* holds .*The learning rate \(1e\+38\)"):
        _trainer(pm, tmp_path, callbacks=[StopOnNonFinite()], learning_rate=1e38).train()


def test_stop_on_non_finite_ends_a_run_whose_logged_loss_is_nan(tmp_path):
    """What fp16 runs rely on (their loss scaler skips steps with inf gradients, so gradients are not checked)."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from memvp_peft import NonFiniteTrainingError, StopOnNonFinite

    state = TrainerState(global_step=7)
    with pytest.raises(NonFiniteTrainingError, match="step 7: the logged training loss is nan"):
        StopOnNonFinite().on_log(TrainingArguments(str(tmp_path), report_to=[]), state, TrainerControl(),
                                 logs={"loss": float("nan")})


def test_text_only_batch_still_touches_every_adapter_parameter(batch):
    """Data-parallel ranks must use the same parameters each step, even when one rank's batch has no image."""
    pm = get_peft_model(tiny_llama(), memvp_config())
    pm.train()
    text = {k: v for k, v in batch.items() if k != "image_features"}
    pm(**text, labels=text["input_ids"]).loss.backward()
    projector = [p for n, p in pm.named_parameters() if "projector" in n]
    assert all(p.grad is not None for p in projector)
    assert all(torch.count_nonzero(p.grad) == 0 for p in projector)  # touched times 0: the math is unchanged


@pytest.mark.parametrize("with_images", [True, False], ids=["images", "text-only"])
def test_memory_tensors_are_visible_to_deepspeed_output_hooks(with_images):
    """ZeRO-3 re-gathers a module's partitioned parameters in backward through hooks on the tensors it finds in the
    module's output (tuples, lists, dicts). `VisualMemory.forward` must return its keys/values where DeepSpeed looks,
    and DeepSpeed's rebuilt output must still be a working `MemoryState` (otherwise: "size of tensor a (0) must match
    the size of tensor b" in backward)."""
    zero_utils = pytest.importorskip("deepspeed.runtime.zero.utils")
    from memvp_peft import MemoryState, VisualMemory

    memory = VisualMemory(visual_dim=16, hidden_dim=8, model_dim=32, num_slots=6, visual_scale=1.0, key_init_std=0.1)
    features = torch.randn(2, 4, 16) if with_images else None
    state = memory(features)
    seen = []

    def hook(tensor):
        seen.append(tensor)
        return tensor * 1.0  # a new tensor, as DeepSpeed's backward-hook wrapper returns

    rebuilt = zero_utils.apply_to_tensors_only(hook, state)
    assert len(seen) == 2 and seen[0] is state.keys and seen[1] is state.values
    assert isinstance(rebuilt, MemoryState) and rebuilt.cache is state.cache  # the per-forward cast cache is shared
    keys, _ = rebuilt.for_input(2, torch.float32, torch.device("cpu"))
    assert keys.shape == ((2, 6, 32) if with_images else (6, 32))  # text-only memory broadcasts over the batch
    torch.testing.assert_close(rebuilt.keys, state.keys)
    (rebuilt.keys.sum() + rebuilt.values.sum()).backward()
    assert memory.key_pos.grad is not None and memory.projector[0].weight.grad is not None
