"""transformers.Trainer with danlu optimizers: optimizers=(optimizer, scheduler), EMA evaluation, resume.

Skipped when transformers or accelerate (which Trainer needs) is not installed.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from danlu.integrations import unwrap_optimizer  # noqa: E402
from danlu.integrations.transformers import (  # noqa: E402
    EMATrainer,
    create_optimizer_and_scheduler,
    optimizer_kwargs_from_args,
)


def _model(seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=30, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=16, num_labels=2,
    )
    return transformers.BertForSequenceClassification(config)


class _Data(torch.utils.data.Dataset):
    def __init__(self, n=16, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 30, (n, 6), generator=gen)
        self.labels = (self.ids[:, 0] > 15).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, per_device_eval_batch_size=8, learning_rate=1e-2,
        weight_decay=0.01, max_steps=6, warmup_steps=2, lr_scheduler_type="linear", report_to=[], use_cpu=True,
        save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    base.update(kw)
    return transformers.TrainingArguments(**base)


def test_trainer_runs_danlu_optimizer_and_scheduler(tmp_path):
    model = _model()
    args = _args(tmp_path)
    opt, sched = create_optimizer_and_scheduler(model, args, args.max_steps, "lamb+lookahead", steps_per_slow_update=2)
    lrs = []

    class Record(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            lrs.append(opt.param_groups[0]["lr"])

    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Data(), optimizers=(opt, sched), callbacks=[Record()])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    assert unwrap_optimizer(trainer.optimizer) is opt
    assert opt.param_groups[0]["applied_steps"] == 6
    # linear warm-up over 2 steps, then linear decay to 0 at step 6 (after each step's scheduler.step())
    assert lrs == pytest.approx([5e-3, 1e-2, 7.5e-3, 5e-3, 2.5e-3, 0.0])
    # biases and LayerNorm weights are in the no-decay group
    no_decay = {n for g in opt.param_groups if g["weight_decay_rate"] == 0 for n in g["param_names"]}
    assert "bert.encoder.layer.0.attention.output.LayerNorm.weight" in no_decay
    assert "classifier.bias" in no_decay and "classifier.weight" not in no_decay
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_trainer_accumulation_counts_optimizer_steps(tmp_path):
    """Trainer's gradient_accumulation_steps calls optimizer.step() once per accumulated batch."""
    model = _model()
    args = _args(tmp_path, gradient_accumulation_steps=2, max_steps=3)
    opt, sched = create_optimizer_and_scheduler(model, args, args.max_steps, "adamw")
    transformers.Trainer(model=model, args=args, train_dataset=_Data(), optimizers=(opt, sched)).train()
    assert opt.param_groups[0]["applied_steps"] == 3
    assert opt.state[next(model.parameters())]["step"].item() == 3


def test_ema_trainer_evaluates_with_ema_weights(tmp_path):
    model = _model()
    args = _args(tmp_path, max_steps=4)
    opt, sched = create_optimizer_and_scheduler(model, args, 4, "adamw+ema", ema_momentum=0.5)
    data = _Data()
    trainer = EMATrainer(model=model, args=args, train_dataset=data, eval_dataset=data, optimizers=(opt, sched))
    trainer.train()
    training_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    metrics = trainer.evaluate()

    def loss_now():
        model.eval()
        with torch.no_grad():
            return model(input_ids=data.ids, labels=data.labels).loss.item()

    with opt.ema_weights():
        ema_loss = loss_now()
    train_loss = loss_now()
    assert metrics["eval_loss"] == pytest.approx(ema_loss, rel=1e-5)
    assert metrics["eval_loss"] != pytest.approx(train_loss, rel=1e-5)
    for n, p in model.named_parameters():  # the training weights are back
        assert torch.equal(p, training_weights[n]), n


def test_trainer_resume_from_checkpoint_is_exact(tmp_path):
    """Trainer saves optimizer.state_dict(): EMA weights and counters come back on resume."""

    def run(output, max_steps, resume=None):
        model = _model()
        args = _args(output, max_steps=6, save_strategy="steps", save_steps=3)
        opt, sched = create_optimizer_and_scheduler(model, args, 6, "adamw+ema", ema_momentum=0.9)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=_Data(), optimizers=(opt, sched))
        if max_steps < 6:
            trainer.args.max_steps = max_steps
        trainer.train(resume_from_checkpoint=resume)
        return model, opt

    full_model, full_opt = run(tmp_path / "full", 6)
    run(tmp_path / "half", 3)
    resumed_model, resumed_opt = run(tmp_path / "half", 6, resume=str(tmp_path / "half" / "checkpoint-3"))
    for (n, p), q in zip(full_model.named_parameters(), resumed_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=n)
    with full_opt.ema_weights(), resumed_opt.ema_weights():
        for p, q in zip(full_model.parameters(), resumed_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_kwargs_from_args_for_torch_base(tmp_path):
    args = _args(tmp_path, adam_beta1=0.8, adam_epsilon=1e-7)
    assert optimizer_kwargs_from_args(args, "torch.AdamW") == {
        "lr": 1e-2, "weight_decay": 0.01, "betas": (0.8, 0.999), "eps": 1e-7,
    }
    assert optimizer_kwargs_from_args(args, "sgd") == {"lr": 1e-2}
