"""The active adapter lives inside the base weights while it trains: no weight-sized work per
call, the same training as the path that never writes W, and the hazards of writing in place
(optimizer steps, checkpoint recompute, adapter switches, saving, several models) handled."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batch, merged_reference, randomize_deltas, tiny_model
from test_gradients import BOTH, assert_exact_slices, full_ft_grads
from torch.utils._python_dispatch import TorchDispatchMode

from s2ft import S2FTConfig, S2FTModel, get_s2ft_model
from s2ft.structures import weight_view


def _deltas(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _train(model, steps=3, micro=2, checkpointing=False, seed=4, **adamw):
    """AdamW steps of `micro` accumulated micro-batches; returns the losses."""
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, **adamw)
    ids = batch(n=2 * micro, t=10, seed=seed)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        for part in ids.chunk(micro):
            loss = model(input_ids=part, labels=part).loss / micro
            loss.backward()
            losses.append(loss.item())
        opt.step()
    return losses


def _base_weights(plain) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in plain.named_parameters()}


def _logit_gap(a, b, ids) -> float:
    """Largest logit difference between models `a` and `b` on `ids` (no grad)."""
    with torch.no_grad():
        return (a(input_ids=ids).logits - b(input_ids=ids).logits).abs().max().item()


def _assert_base_weights(model, plain) -> None:
    """Every wrapped weight equals the plain model's, bit for bit."""
    for path, layer in model.named_s2ft_layers():
        assert torch.equal(layer.weight, weight_view(plain.get_submodule(path))), path


@pytest.mark.parametrize("checkpointing", [False, True])
def test_inplace_training_equals_the_path_that_never_writes_weights(checkpointing):
    """Optimizer steps between micro-batches, accumulation and checkpointing with non-zero
    deltas: the in-place path and the thin path train identically (float64)."""
    plain = tiny_model("llama")
    runs = []
    for inplace in (True, False):
        model = get_s2ft_model(copy.deepcopy(plain), BOTH)
        model.set_inplace(inplace)
        randomize_deltas(model)
        runs.append((_train(model, checkpointing=checkpointing), _deltas(model), model))
    (loss_a, delta_a, model_a), (loss_b, delta_b, _) = runs
    assert max(abs(a - b) for a, b in zip(loss_a, loss_b, strict=True)) <= 1e-12
    for n in delta_a:
        assert (delta_a[n] - delta_b[n]).abs().max() <= 1e-12, n
    # after training, the weights hold exactly base + delta in the trained rows/columns
    ids = batch()
    ref = merged_reference(model_a, plain)
    model_a.eval()
    assert _logit_gap(model_a, ref, ids) <= 1e-12
    # and the gradient after training is still the full fine-tuning gradient's slice
    model_a.zero_grad()
    model_a(input_ids=ids, labels=ids).loss.backward()
    full_ft_grads(ref, ids)
    assert_exact_slices(model_a, ref)


def test_optimizers_that_do_not_bump_versions_still_update_the_weights():
    """Fused AdamW (Trainer's default) writes the parameters without bumping `_version`."""
    plain = tiny_model("llama", dtype=torch.float32)
    runs = []
    for inplace, adamw in ((True, {"fused": True}), (False, {"foreach": False})):
        model = get_s2ft_model(copy.deepcopy(plain), BOTH)
        model.set_inplace(inplace)
        runs.append(_train(model, **adamw))
    assert max(abs(a - b) for a, b in zip(*runs, strict=True)) <= 1e-5
    assert runs[0][-1] < runs[0][0]


class _WeightSizedOps(TorchDispatchMode):
    """Records every op that writes a tensor of one of the given shapes: a new one (views of
    the inputs do not count) or one of its inputs in place (except `index_copy_`, which writes
    only the indexed rows/columns)."""

    def __init__(self, shapes):
        super().__init__()
        self.shapes, self.hits = shapes, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
        storages = {a.untyped_storage().data_ptr() for a in inputs}
        out = func(*args, **(kwargs or {}))
        inplace = func._schema.is_mutable and func is not torch.ops.aten.index_copy_.default
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and tuple(t.shape) in self.shapes:
                if inplace or t.untyped_storage().data_ptr() not in storages:
                    self.hits.append(str(func))
        return out


def test_no_weight_sized_tensor_is_made_per_step_and_weights_are_written_only_on_change():
    # 1 of 4 heads and 12 of 48 channels: no delta block has the shape of a weight
    cfg = S2FTConfig(ffn_ratio=0.25, attn_ratio=0.25, attn_modules=("q", "k", "v", "o"), seed=3)
    model = get_s2ft_model(tiny_model("llama", dtype=torch.float32), cfg)
    layers = list(model.s2ft_layers())
    shapes = {tuple(layer.weight.shape) for layer in layers}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = batch(n=2, t=10)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()  # the optimizer hook writes each trained block; the next forward writes it once more
    model(input_ids=ids, labels=ids).loss.backward()  # (fused optimizers do not bump versions)
    generations = [layer._generation for layer in layers]
    with _WeightSizedOps(shapes) as mode:
        for _ in range(2):  # accumulation: no delta changes, so nothing is written
            model(input_ids=ids, labels=ids).loss.backward()
    assert mode.hits == []
    assert [layer._generation for layer in layers] == generations
    with _WeightSizedOps(shapes) as mode:
        opt.step()
        model(input_ids=ids, labels=ids).loss.backward()
    assert [layer._generation for layer in layers] == [g + 2 for g in generations]
    assert mode.hits == []  # writing k rows/columns makes nothing weight-sized


def test_a_forward_sees_deltas_changed_by_hand():
    plain = tiny_model("qwen2")
    model = get_s2ft_model(copy.deepcopy(plain), BOTH)
    ids = batch()
    model(input_ids=ids)
    randomize_deltas(model, seed=7)  # in-place edits, no optimizer: the next forward rewrites W
    ref = merged_reference(model, plain)
    assert _logit_gap(model, ref, ids) <= 1e-12


def test_optimizer_step_between_forward_and_backward_is_refused():
    """dL/dx uses W: a backward after the weights were rewritten must not run silently."""
    for checkpointing in (False, True):
        model = get_s2ft_model(tiny_model("llama"), BOTH)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        ids = batch()
        model(input_ids=ids, labels=ids).loss.backward()
        loss = model(input_ids=ids, labels=ids).loss
        opt.step()
        with pytest.raises(RuntimeError, match="rewritten|changed between a forward"):
            loss.backward()


def test_disable_adapter_and_set_adapter_during_training_give_exact_base_outputs():
    plain = tiny_model("gpt2")  # Conv1D, fused qkv rows, biases
    model = get_s2ft_model(copy.deepcopy(plain), BOTH)
    randomize_deltas(model)
    _train(model, steps=1)
    model.zero_grad(set_to_none=True)
    ids = batch()
    with torch.no_grad():
        base = plain(input_ids=ids).logits
    twin = copy.deepcopy(model)
    # a DPO-style reference pass between a forward and its backward
    loss = model(input_ids=ids, labels=ids).loss
    with model.disable_adapter(), torch.no_grad():
        ref_logits = model(input_ids=ids).logits
    assert (ref_logits - base).abs().max() <= 1e-12
    loss.backward()
    twin(input_ids=ids, labels=ids).loss.backward()
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        if p.requires_grad:
            assert (p.grad - q.grad).abs().max() <= 1e-12, n
    # set_adapter("__base__") restores the exact base weights (bit for bit), and back again
    model.set_adapter("__base__")
    _assert_base_weights(model, plain)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base)
    model.set_adapter("default")
    assert _logit_gap(model, twin, ids) <= 1e-12


def test_saving_mid_training_and_unload_give_exact_weights(tmp_path):
    plain = tiny_model("mistral")
    model = get_s2ft_model(copy.deepcopy(plain), BOTH)
    _train(model, steps=2)
    model.save_pretrained(tmp_path / "mid")
    saved = _deltas(model)
    _train(model, steps=1)  # training goes on after the save
    loaded = S2FTModel.from_pretrained(copy.deepcopy(plain), tmp_path / "mid")
    for n, p in loaded.named_parameters():
        if ".s2ft." in n:
            assert torch.equal(p, saved[n]), n
    ids = batch()
    with torch.no_grad():
        want = merged_reference(loaded, plain)(input_ids=ids).logits
        assert (loaded(input_ids=ids).logits - want).abs().max() <= 1e-12
    base = model.unload()  # the exact base weights come back
    for n, p in base.named_parameters():
        assert torch.equal(p, dict(plain.named_parameters())[n]), n


def test_two_models_in_one_process_train_independently():
    plain = tiny_model("llama")
    solo = []
    for seed in (0, 1):
        m = get_s2ft_model(copy.deepcopy(plain), S2FTConfig(**{**BOTH.to_dict(), "seed": seed}))
        _train(m, steps=2, seed=seed)
        solo.append(_deltas(m))
    a = get_s2ft_model(copy.deepcopy(plain), S2FTConfig(**{**BOTH.to_dict(), "seed": 0}))
    b = get_s2ft_model(copy.deepcopy(plain), S2FTConfig(**{**BOTH.to_dict(), "seed": 1}))
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (a, b)]
    ids = [batch(n=4, t=10, seed=s) for s in (0, 1)]
    for m in (a, b):
        m.train()
    for _ in range(2):  # interleaved: each optimizer step syncs both models
        for m, opt, x in zip((a, b), opts, ids, strict=True):
            opt.zero_grad()
            for part in x.chunk(2):
                (m(input_ids=part, labels=part).loss / 2).backward()
            opt.step()
    for m, want in zip((a, b), solo, strict=True):
        got = _deltas(m)
        for n in want:
            assert (got[n] - want[n]).abs().max() <= 1e-12, n


def test_merge_after_training_is_exact_and_unmerge_restores_base():
    plain = tiny_model("phi3")
    model = get_s2ft_model(copy.deepcopy(plain), BOTH)
    _train(model, steps=2)
    ids = batch()
    ref = merged_reference(model, plain)
    model.merge()
    assert _logit_gap(model, ref, ids) <= 1e-12
    model.unmerge()
    model.set_adapter("__base__")
    _assert_base_weights(model, plain)
