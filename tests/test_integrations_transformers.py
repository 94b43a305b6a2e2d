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


def _no_decay(name):
    return "bias" in name or "LayerNorm" in name


def test_trainer_groups_decay_as_torch_adamw_does(tmp_path):
    """Trainer's groups say weight_decay (0.0 for biases and LayerNorm): danlu.AdamW reads it as weight_decay_rate."""
    import warnings

    import danlu

    reference = _model()
    transformers.Trainer(model=reference, args=_args(tmp_path / "torch"), train_dataset=_Data()).train()
    model = _model()
    trainer = transformers.Trainer(
        model=model, args=_args(tmp_path / "danlu"), train_dataset=_Data(),
        optimizer_cls_and_kwargs=(danlu.AdamW, {"lr": 1e-2, "eps": 1e-8}),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not [w for w in caught if "decayed twice" in str(w.message)]
    opt = unwrap_optimizer(trainer.optimizer)
    assert [g["weight_decay_rate"] for g in opt.param_groups] == [0.01, 0.0]
    assert all("weight_decay" not in g for g in opt.param_groups)
    names = [n for n, _ in model.named_parameters()]
    assert any(_no_decay(n) for n in names) and not all(_no_decay(n) for n in names)
    initial = dict(_model().named_parameters())
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert not torch.equal(p, initial[name]), name  # every tensor trained
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)


def test_a_danlu_optimizer_without_decay_refuses_a_decaying_trainer_group(tmp_path):
    import danlu

    trainer = transformers.Trainer(
        model=_model(), args=_args(tmp_path), train_dataset=_Data(), optimizer_cls_and_kwargs=(danlu.Adam, {"lr": 1e-2}),
    )
    with pytest.raises(ValueError, match=r"^param group 0 has weight_decay=0.01, but Adam has no weight decay of its own"):
        trainer.train()


def _plain_eval_loss(model, tmp_path):
    args = _args(tmp_path / "plain-eval")
    return transformers.Trainer(model=model, args=args, eval_dataset=_Data()).evaluate()["eval_loss"]


def test_ema_trainer_best_model_is_the_evaluated_averaged_weights(tmp_path):
    """load_best_model_at_end: the best checkpoint is chosen by the EMA weights' loss, and the model ends with them."""
    import danlu

    model = _model()
    args = _args(
        tmp_path, max_steps=6, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
        load_best_model_at_end=True, metric_for_best_model="eval_loss", learning_rate=5e-2,
    )
    opt, sched = create_optimizer_and_scheduler(model, args, 6, "adamw+ema", ema_momentum=0.5)
    data = _Data()
    trainer = EMATrainer(model=model, args=args, train_dataset=data, eval_dataset=data, optimizers=(opt, sched))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None
    # the model holds the averaged weights of the best checkpoint, bias-corrected as they were evaluated
    twin = transformers.BertForSequenceClassification.from_pretrained(best)
    twin_opt = danlu.create_optimizer(twin, "adamw+ema", lr=5e-2, ema_momentum=0.5)
    twin_opt.load_state_dict(torch.load(f"{best}/optimizer.pt", weights_only=True))
    with twin_opt.ema_weights():
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            assert torch.equal(p, q), name
    assert _plain_eval_loss(model, tmp_path) == pytest.approx(trainer.state.best_metric, rel=1e-6)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(trainer.state.best_metric, rel=1e-6)


def test_ema_trainer_refuses_best_model_without_optimizer_state(tmp_path):
    model = _model()
    args = _args(
        tmp_path, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
        load_best_model_at_end=True, save_only_model=True,
    )
    with pytest.raises(ValueError, match="needs save_only_model=False"):
        EMATrainer(model=model, args=args, train_dataset=_Data(), eval_dataset=_Data())


def test_export_the_averaged_weights_with_save_pretrained(tmp_path):
    model = _model()
    args = _args(tmp_path, max_steps=3)
    opt, sched = create_optimizer_and_scheduler(model, args, 3, "adamw+ema", ema_momentum=0.5)
    trainer = EMATrainer(model=model, args=args, train_dataset=_Data(), optimizers=(opt, sched))
    trainer.train()
    with opt.ema_weights():
        model.save_pretrained(tmp_path / "ema")
        averaged = {n: p.detach().clone() for n, p in model.named_parameters()}
    exported = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "ema")
    for name, p in exported.named_parameters():
        assert torch.equal(p, averaged[name]), name
    assert not all(torch.equal(p, averaged[n]) for n, p in model.named_parameters())  # the model trains on
