"""Plain transformers.Trainer trains an S2FTModel: loss goes down, checkpoints hold only the
adapter, resuming from a checkpoint continues exactly, and the adapter saves."""

from __future__ import annotations

import torch
import transformers as T
from conftest import tiny_model

from s2ft import S2FTConfig, S2FTModel, get_s2ft_model


def _data(n=16, t=16):
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(3, 8, (t,), generator=g)  # 5 of the 64 tokens: learnable in a few steps
        rows.append(
            {
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "labels": ids.clone(),
                "extra_column": "dropped by Trainer",
            }
        )
    return rows


def _args(out, **kw):
    return T.TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=4,
        learning_rate=2e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="steps",
        save_steps=4,
        seed=0,
        data_seed=0,
        **kw,
    )


def _model():
    base = tiny_model("llama", dtype=torch.float32)
    with torch.no_grad():  # a std-0.02 random head spans < 1 nat of logits: give it room to fit
        base.lm_head.weight.mul_(20)
    return get_s2ft_model(base, S2FTConfig(ffn_ratio=0.25, attn_ratio=0.5, seed=0))


def test_trainer_reduces_loss_and_saves_adapter(tmp_path):
    model = _model()
    trainer = T.Trainer(model=model, args=_args(tmp_path / "run", max_steps=8), train_dataset=_data())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 8
    assert sum(losses[-2:]) / 2 < 0.9 * sum(losses[:2]) / 2

    ckpt = tmp_path / "run" / "checkpoint-8"
    from safetensors.torch import load_file

    state = load_file(ckpt / "model.safetensors")
    assert state and all(".s2ft.default." in k for k in state)  # adapter-sized, no base weights
    assert set(state) == set(model.state_dict())

    model.save_pretrained(tmp_path / "adapter")
    loaded = S2FTModel.from_pretrained(_model().unload(), tmp_path / "adapter")
    ids = _data()[0]["input_ids"][None]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_trainer_resume_matches_uninterrupted_run(tmp_path):
    full = _model()
    T.Trainer(model=full, args=_args(tmp_path / "a", max_steps=8), train_dataset=_data()).train()

    first = _model()
    T.Trainer(model=first, args=_args(tmp_path / "b", max_steps=8), train_dataset=_data()).train(
        resume_from_checkpoint=None
    )
    resumed = _model()  # fresh deltas: everything must come from checkpoint-4
    T.Trainer(model=resumed, args=_args(tmp_path / "b", max_steps=8), train_dataset=_data()).train(
        resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-4")
    )
    a, r = full.state_dict(), resumed.state_dict()
    for k in a:
        assert torch.allclose(a[k].float(), r[k].float(), atol=1e-6), k
