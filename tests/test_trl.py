"""TRL trains an S2FTModel: SFT on text and chat data (the loss falls), DPO against the model
with its adapter disabled (reward accuracy above chance, no second copy of the base), GRPO with a
KL reference the same way, the s2ft format in checkpoints, and resume equal to one run."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_llama_for, word_tokenizer
from transformers import TrainerCallback

from s2ft import S2FTConfig, S2FTModel, get_s2ft_model
from s2ft.integrations.transformers import S2FTCallback

trl = pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402

from s2ft.integrations.trl import ReferenceModel, S2FTGRPOTrainer, reference_model  # noqa: E402

WORDS = [f"answer{i}" for i in range(1, 6)]
RECORDS = [{"instruction": f"say {w}", "input": "", "output": f"the correct answer is {w}"} for w in WORDS]
CONFIG = S2FTConfig(ffn_ratio=0.25, attn_ratio=0.25, seed=0)


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer(RECORDS)


def _model(tok):
    return get_s2ft_model(tiny_llama_for(tok), CONFIG)


def _args(cls, out, **kw):
    base = dict(
        output_dir=str(out), per_device_train_batch_size=4, learning_rate=5e-3, logging_steps=1, report_to=[],
        use_cpu=True, bf16=False, seed=0, data_seed=0, save_strategy="no",
    )  # fmt: skip
    return cls(**{**base, **kw})


def _losses(trainer, key="loss"):
    return [h[key] for h in trainer.state.log_history if key in h and "train_runtime" not in h]


def _sft_rows(chat: bool, n: int = 40):
    recs = [RECORDS[i % 5] for i in range(n)]
    if chat:
        return [
            {"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]}
            for r in recs
        ]
    return [{"text": f"{r['instruction']} : {r['output']}"} for r in recs]


@pytest.mark.parametrize("chat", [False, True], ids=["text", "messages"])
def test_sft_trainer_trains_and_saves_the_s2ft_format(tok, tmp_path, chat):
    model = _model(tok)
    args = _args(trl.SFTConfig, tmp_path, max_steps=16, max_length=32, save_strategy="steps", save_steps=8)
    trainer = trl.SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(_sft_rows(chat)), processing_class=tok,
        callbacks=[S2FTCallback()],
    )  # fmt: skip
    trainer.train()
    losses = _losses(trainer)
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3
    for folder in (tmp_path / "checkpoint-16", tmp_path):
        again = S2FTModel.from_pretrained(tiny_llama_for(tok), folder)
        ids = tok("say answer3 :", return_tensors="pt").input_ids
        with torch.no_grad():
            torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits)


class _StopAt(TrainerCallback):
    """Interrupt a run after `step` optimizer steps (as a killed job would, after its checkpoint)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def test_sft_resume_equals_an_uninterrupted_run(tok, tmp_path):
    def run(out, steps, resume=None):
        model = _model(tok)
        args = _args(trl.SFTConfig, out, max_steps=6, max_length=32, save_strategy="steps", save_steps=3)
        trainer = trl.SFTTrainer(
            model=model, args=args, train_dataset=Dataset.from_list(_sft_rows(False)), processing_class=tok,
            callbacks=[S2FTCallback(), _StopAt(steps)],
        )  # fmt: skip
        trainer.train(resume_from_checkpoint=resume)
        return model

    whole = run(tmp_path / "whole", 6)
    run(tmp_path / "cut", 3)
    resumed = run(tmp_path / "cut", 6, resume=str(tmp_path / "cut" / "checkpoint-3"))
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=k)
    assert any(v.abs().max() > 0 for k, v in whole.state_dict().items() if k.endswith("delta"))


def _preferences(n=40):
    return [
        {
            "prompt": f"say {WORDS[i % 5]} :",
            "chosen": f" the correct answer is {WORDS[i % 5]}",
            "rejected": f" the correct answer is {WORDS[(i + 2) % 5]}",
        }
        for i in range(n)
    ]


def test_dpo_reference_is_the_model_with_its_adapter_disabled(tok, tmp_path):
    model = _model(tok)
    pristine = copy.deepcopy(model.get_base_model())  # the base before training (adapter at zero)
    ref = reference_model(model)
    assert isinstance(ref, ReferenceModel) and not list(ref.parameters())  # no second copy of the base
    args = _args(trl.DPOConfig, tmp_path, max_steps=24, max_length=32)
    trainer = trl.DPOTrainer(
        model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(_preferences()), processing_class=tok
    )
    trainer.train()
    accuracy = _losses(trainer, "rewards/accuracies")
    assert sum(accuracy[-4:]) / 4 > 0.5
    assert _losses(trainer)[-1] < 0.69  # below log 2: the margin grew
    ids = tok("say answer2 : the correct answer is answer2", return_tensors="pt").input_ids
    with torch.no_grad():
        policy = model(input_ids=ids).logits
        reference = ref(input_ids=ids).logits
        torch.testing.assert_close(reference, pristine(input_ids=ids).logits, rtol=0, atol=1e-5)
    assert not torch.allclose(policy, reference)  # the policy moved; the reference did not


def test_grpo_kl_reference_without_a_second_copy(tok, tmp_path):
    model = _model(tok)
    prompts = Dataset.from_list([{"prompt": f"say {WORDS[i % 5]} :"} for i in range(16)])

    def reward(completions, **_):
        return [float(c.count("answer1")) for c in completions]

    args = _args(
        trl.GRPOConfig, tmp_path, max_steps=5, num_generations=4, max_completion_length=8, learning_rate=5e-2,
        beta=0.04,
    )  # fmt: skip
    trainer = S2FTGRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=prompts, processing_class=tok)
    assert isinstance(trainer.ref_model, ReferenceModel) and trainer.beta == 0.04 and args.beta == 0.04
    assert not list(trainer.ref_model.parameters())
    trainer.train()
    kl = _losses(trainer, "kl")
    assert kl[0] == pytest.approx(0, abs=1e-6) and max(kl) > 0  # the policy left the reference


def test_plain_grpo_trainer_with_beta_zero_needs_nothing(tok, tmp_path):
    model = _model(tok)
    prompts = Dataset.from_list([{"prompt": f"say {WORDS[i % 5]} :"} for i in range(8)])
    args = _args(trl.GRPOConfig, tmp_path, max_steps=2, num_generations=4, max_completion_length=4, beta=0.0)
    trainer = trl.GRPOTrainer(
        model=model, reward_funcs=lambda completions, **_: [float(len(c)) for c in completions], args=args,
        train_dataset=prompts, processing_class=tok,
    )  # fmt: skip
    assert trainer.ref_model is None
    trainer.train()
    assert any(p.grad is not None or p.abs().max() > 0 for p in model.parameters() if p.requires_grad)
