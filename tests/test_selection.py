"""Selection strategies × order on tiny models: deterministic, equal to an independent
computation of the scores; layer allocation counts; LoRA budget matching; indices persist."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import V, batch, tiny_model

from s2ft import S2FTConfig, S2FTModel, get_s2ft_model
from s2ft.budget import match_lora
from s2ft.selection import STRATEGIES

STRATS = sorted(STRATEGIES)
FFN = ("up", "gate", "down")


def calib(n_batches=2):
    out = []
    for i in range(n_batches):
        ids = batch(n=3, t=10, seed=20 + i)
        mask = torch.ones_like(ids)
        mask[0, 7:] = 0  # some padding, which the statistics must ignore
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def selected(model, path, axis="col_idx"):
    return getattr(model.get_base_model().get_submodule(path).s2ft["default"], axis)


def channels(model, layer=0):
    return selected(model, f"model.layers.{layer}.mlp.down_proj")


def top(scores, k, order="large"):
    return torch.sort(torch.argsort(scores, descending=order == "large", stable=True)[:k]).values


@pytest.mark.parametrize("strategy", STRATS)
@pytest.mark.parametrize("order", ["large", "small"])
def test_strategy_is_deterministic(strategy, order):
    cfg = S2FTConfig(ffn_ratio=0.25, attn_ratio=0.5, strategy=strategy, order=order, seed=3)
    runs = [get_s2ft_model(tiny_model("llama"), cfg, calibration=calib()).state_dict() for _ in range(2)]
    idx = [k for k in runs[0] if k.endswith("_idx")]
    assert idx and all(torch.equal(runs[0][k], runs[1][k]) for k in idx)
    if strategy != "random":  # large and small pick different units
        other = "small" if order == "large" else "large"
        flipped = get_s2ft_model(
            tiny_model("llama"), S2FTConfig(**{**cfg.to_dict(), "order": other}), calibration=calib()
        ).state_dict()
        assert any(not torch.equal(runs[0][k], flipped[k]) for k in idx)


def _inputs(model, paths, batches):
    """Each module's inputs over the calibration tokens (padding dropped), by forward hooks."""
    seen = {p: [] for p in paths}
    hooks = [
        model.get_submodule(p).register_forward_hook(lambda m, a, o, p=p: seen[p].append(a[0].detach())) for p in paths
    ]
    with torch.no_grad():
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    for h in hooks:
        h.remove()
    masks = [b["attention_mask"].reshape(-1).bool() for b in batches]
    return {
        p: torch.cat([x.reshape(-1, x.shape[-1])[m] for x, m in zip(xs, masks, strict=True)]) for p, xs in seen.items()
    }


@pytest.mark.parametrize("order", ["large", "small"])
def test_scores_match_independent_computation(order):
    plain = tiny_model("llama")
    mlp = "model.layers.1.mlp"
    up, gate, down = (plain.get_submodule(f"{mlp}.{n}_proj").weight for n in ("up", "gate", "down"))
    k = 12
    batches = calib()
    xs = _inputs(plain, [f"{mlp}.up_proj", f"{mlp}.down_proj"], batches)
    x_in, h = xs[f"{mlp}.up_proj"], xs[f"{mlp}.down_proj"]  # (N, hidden), (N, ffn)

    expected = {
        "weight": (up.pow(2).sum(1) + gate.pow(2).sum(1) + down.pow(2).sum(0)).sqrt(),
        "activation": h.norm(dim=0),
        "salience": up.abs() @ x_in.norm(dim=0) + gate.abs() @ x_in.norm(dim=0) + down.abs().sum(0) * h.norm(dim=0),
    }
    # gradient: full fine-tuning gradients per calibration batch, squared norms summed over batches
    ref = copy.deepcopy(plain)
    for p in ref.parameters():
        p.requires_grad_(True)
    sq = torch.zeros(48, dtype=torch.float64)
    for b in batches:
        ref.zero_grad()
        ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss.backward()
        g = {n: ref.get_submodule(f"{mlp}.{n}_proj").weight.grad for n in ("up", "gate", "down")}
        sq += g["up"].pow(2).sum(1) + g["gate"].pow(2).sum(1) + g["down"].pow(2).sum(0)
    expected["gradient"] = sq.sqrt()

    for strategy, scores in expected.items():
        model = get_s2ft_model(
            copy.deepcopy(plain), S2FTConfig(ffn_ratio=0.25, strategy=strategy, order=order), calibration=batches
        )
        assert torch.equal(channels(model, 1), top(scores, k, order)), strategy
        assert all(p.grad is None for n, p in model.get_base_model().named_parameters() if ".s2ft." not in n)


def test_head_scores_under_gqa():
    """Weight scores of query heads with q, k, v, o trained: q rows + o columns of the head, plus
    its KV group's k/v rows divided by the group size (9 heads / 3 KV heads)."""
    plain = tiny_model("smollm2_shape")
    attn = "model.layers.0.self_attn"
    w = {n: plain.get_submodule(f"{attn}.{n}_proj").weight for n in ("q", "k", "v", "o")}
    d, group = 8, 3
    per_head = w["q"].pow(2).sum(1).view(9, d).sum(1) + w["o"].pow(2).sum(0).view(9, d).sum(1)
    kv = (w["k"].pow(2).sum(1) + w["v"].pow(2).sum(1)).view(3, d).sum(1)
    scores = (per_head + kv.repeat_interleave(group) / group).sqrt()
    model = get_s2ft_model(
        copy.deepcopy(plain),
        S2FTConfig(ffn_ratio=0.1, attn_ratio=0.34, strategy="weight", attn_modules=("q", "k", "v", "o")),
    )
    heads = selected(model, f"{attn}.o_proj").view(-1, d)[:, 0] // d
    assert torch.equal(heads, top(scores, 3))


def test_phi3_fused_and_gpt2_conv1d_weight_scores():
    for family, up_path, down_path in (
        ("phi3", "mlp.gate_up_proj", "mlp.down_proj"),
        ("gpt2", "mlp.c_fc", "mlp.c_proj"),
    ):
        plain = tiny_model(family)
        prefix = "model.layers.0" if family == "phi3" else "transformer.h.0"
        upm, downm = plain.get_submodule(f"{prefix}.{up_path}"), plain.get_submodule(f"{prefix}.{down_path}")
        if family == "phi3":  # gate rows 0..47, up rows 48..95 in one matrix
            rows = upm.weight.pow(2).sum(1)
            scores = rows[:48] + rows[48:] + downm.weight.pow(2).sum(0)
        else:  # Conv1D stores (in, out)
            scores = upm.weight.pow(2).sum(0) + downm.weight.pow(2).sum(1)
        model = get_s2ft_model(copy.deepcopy(plain), S2FTConfig(ffn_ratio=0.1, strategy="weight"))
        n = scores.numel()
        k = round(0.1 * n)
        got = selected(model, f"{prefix}.{down_path}")
        assert torch.equal(got, top(scores.sqrt(), k)), family


def test_data_strategy_without_calibration_fails_clearly():
    with pytest.raises(ValueError, match="strategy='salience' needs calibration data"):
        get_s2ft_model(tiny_model("llama"), S2FTConfig(strategy="salience"))
    with pytest.raises(ValueError, match="calibration data is empty"):
        get_s2ft_model(tiny_model("llama"), S2FTConfig(strategy="gradient"), calibration=[])


def _four_layers():
    torch.manual_seed(0)
    import transformers as T

    cfg = T.LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return T.AutoModelForCausalLM.from_config(cfg).double()


@pytest.mark.parametrize(
    "allocation,counts",
    [
        ("uniform", [12, 12, 12, 12]),
        ("increasing", [5, 10, 14, 19]),  # 48 * (1, 2, 3, 4) / 10, largest remainder
        ("decreasing", [19, 14, 10, 5]),
        ([0, 1, 0, 1], [0, 24, 0, 24]),
        ([1, 0, 0, 0], [48, 0, 0, 0]),
    ],
)
def test_layer_allocation_counts(allocation, counts):
    model = get_s2ft_model(_four_layers(), S2FTConfig(ffn_ratio=0.25, layer_allocation=allocation))
    got = []
    for i in range(4):
        try:
            got.append(len(channels(model, i)))
        except AttributeError:
            got.append(0)
    assert got == counts
    assert model.get_nb_trainable_parameters()[0] == sum(counts) * 3 * 32


def test_random_one_puts_the_budget_in_one_seeded_layer():
    layers = []
    for seed in range(6):
        model = get_s2ft_model(_four_layers(), S2FTConfig(ffn_ratio=0.2, layer_allocation="random_one", seed=seed))
        trained = {int(p.split(".")[2]) for p, _ in model.named_s2ft_layers()}
        assert len(trained) == 1
        layers.append(trained.pop())
        assert len(channels(model, layers[-1])) == 4 * round(0.2 * 48)
    assert len(set(layers)) > 1


def test_allocation_list_must_match_layers():
    with pytest.raises(ValueError, match="lists 3 weights but the model has 4 layers"):
        get_s2ft_model(_four_layers(), S2FTConfig(layer_allocation=[1, 1, 1]))
    with pytest.raises(ValueError, match="S2FTConfig.layer_allocation weights"):
        S2FTConfig(layer_allocation=[0, 0])


@pytest.mark.parametrize(
    "family,roles",
    [("llama", ["q", "k", "v", "up", "down"]), ("phi3", ["q", "v", "up"]), ("gpt2", ["q", "k", "v", "o"])],
)
@pytest.mark.parametrize("rank", [1, 4, 8])
def test_budget_matches_lora_within_one_channel_per_matrix(family, roles, rank):
    import peft

    base = tiny_model(family)
    cfg, report = match_lora(base, S2FTConfig(ffn_ratio=0.1), rank, roles)
    names = {
        "llama": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "up": "up_proj", "down": "down_proj"},
        "gpt2": {"q": "c_attn"},
        "phi3": {"q": "qkv_proj", "up": "gate_up_proj"},
    }[family]
    if family == "llama":  # the LoRA count is the real PEFT count
        lora = peft.get_peft_model(
            copy.deepcopy(base), peft.LoraConfig(r=rank, target_modules=sorted(set(names.values())))
        )
        assert report["lora_parameters"] == sum(p.numel() for p in lora.parameters() if p.requires_grad)
    model = get_s2ft_model(base, cfg)
    trained = model.get_nb_trainable_parameters()[0]
    assert trained == report["s2ft_parameters"]
    # each of the 2 layers is within half a channel (one row/column per trained matrix) of LoRA's count
    n_layers = 2
    assert abs(trained - report["lora_parameters"]) <= n_layers * report["parameters_per_unit"] / 2


def test_indices_are_saved_and_reloaded(tmp_path):
    cfg = S2FTConfig(ffn_ratio=0.25, attn_ratio=0.5, strategy="salience", order="small")
    model = get_s2ft_model(tiny_model("llama"), cfg, calibration=calib())
    model.save_pretrained(tmp_path / "a")
    loaded = S2FTModel.from_pretrained(tiny_model("llama"), tmp_path / "a")  # no calibration needed to load
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if k.endswith("_idx"))
    assert loaded.s2ft_config["default"] == cfg
