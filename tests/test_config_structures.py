"""S2FTConfig validation, structure maps (built-in, unsupported, custom) and seeded selection."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T
from conftest import batch, tiny_model
from test_gradients import check_exact_gradients

from s2ft import S2FTConfig, UnsupportedModelError, get_s2ft_model
from s2ft.selection import unit_count


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"ffn_ratio": 1.5}, "ffn_ratio"),
        ({"ffn_ratio": -0.1}, "ffn_ratio"),
        ({"ffn_ratio": "0.1"}, "ffn_ratio"),
        ({"attn_ratio": 2}, "attn_ratio"),
        ({"ffn_ratio": 0.0, "attn_ratio": 0.0}, "ffn_ratio and S2FTConfig.attn_ratio"),
        ({"ffn_modules": ("up", "fc9")}, "ffn_modules"),
        ({"attn_modules": ("q", "q")}, "attn_modules"),
        ({"attn_ratio": 0.1, "attn_modules": ()}, "attn_modules"),
        ({"strategy": "magic"}, "strategy"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"layer_allocation": "zigzag"}, "layer_allocation"),
        ({"train_bias": "yes"}, "train_bias"),
        ({"delta_dtype": "int8"}, "delta_dtype"),
        ({"structure_map": {"layers": "model.layers"}}, "structure_map"),
        ({"structure_map": {"layers": "h", "ffn": {"up": "fc1"}}}, "missing role"),
    ],
)
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"S2FTConfig.{field}" if "role" not in field else field):
        S2FTConfig(**kwargs)


def test_config_round_trip_and_unknown_keys():
    cfg = S2FTConfig(ffn_ratio=0.1, attn_ratio=0.2, ffn_modules="down,up", attn_modules=["o", "v"], seed=4)
    assert cfg.ffn_modules == ("up", "down") and cfg.attn_modules == ("v", "o")
    assert S2FTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"no field\(s\) \['ffn_rate'\]"):
        S2FTConfig.from_dict({"ffn_rate": 0.1})


def test_unit_counts():
    assert unit_count(0.0, 100) == 0
    assert unit_count(0.001, 100) == 1  # any positive ratio trains at least one unit
    assert unit_count(0.03, 1536) == 46
    assert unit_count(1.0, 9) == 9


def test_selection_is_seeded_and_ratio_exact():
    cfg = S2FTConfig(ffn_ratio=0.25, attn_ratio=0.5, attn_modules=("o",), seed=11)
    a = get_s2ft_model(tiny_model("llama"), cfg).state_dict()
    b = get_s2ft_model(tiny_model("llama", seed=5), cfg).state_dict()  # other weights, same shape
    c = get_s2ft_model(tiny_model("llama"), S2FTConfig(**{**cfg.to_dict(), "seed": 12})).state_dict()
    idx = [k for k in a if k.endswith("_idx")]
    assert all(torch.equal(a[k], b[k]) for k in idx)
    assert any(not torch.equal(a[k], c[k]) for k in idx)
    for layer in range(2):
        down = a[f"model.model.layers.{layer}.mlp.down_proj.s2ft.default.col_idx"]
        assert len(down) == 12  # 0.25 * 48 channels
        o = a[f"model.model.layers.{layer}.self_attn.o_proj.s2ft.default.col_idx"]
        assert len(o) == 2 * 8  # 0.5 * 4 heads, head_dim 8


def test_adding_attention_does_not_move_ffn_channels():
    ffn_only = get_s2ft_model(tiny_model("llama"), S2FTConfig(ffn_ratio=0.25, seed=1)).state_dict()
    both = get_s2ft_model(tiny_model("llama"), S2FTConfig(ffn_ratio=0.25, attn_ratio=0.5, seed=1)).state_dict()
    for k, v in ffn_only.items():
        if k.endswith("_idx"):
            assert torch.equal(both[k], v)


def test_ffn_modules_pick_matrices():
    m = get_s2ft_model(tiny_model("llama"), S2FTConfig(ffn_ratio=0.25, ffn_modules=("down",)))
    assert sorted({p.split(".")[-1] for p, _ in m.named_s2ft_layers()}) == ["down_proj"]
    # GPT-2 has no gate: the default (up, gate, down) trains c_fc and c_proj
    g = get_s2ft_model(tiny_model("gpt2"), S2FTConfig(ffn_ratio=0.25))
    assert sorted(p for p, _ in g.named_s2ft_layers() if ".0." in p) == [
        "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj",
    ]
    with pytest.raises(ValueError, match="selects nothing"):
        get_s2ft_model(tiny_model("gpt2"), S2FTConfig(ffn_ratio=0.25, ffn_modules=("gate",)))


def _neox():
    torch.manual_seed(0)
    cfg = T.GPTNeoXConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    return T.AutoModelForCausalLM.from_config(cfg).double().eval()


def test_unsupported_model_says_how_to_pass_a_map():
    with pytest.raises(UnsupportedModelError, match="model_type='gpt_neox'.*structure_map="):
        get_s2ft_model(_neox(), S2FTConfig(ffn_ratio=0.25))


def test_custom_structure_map_trains_exactly(tmp_path):
    smap = {"layers": "gpt_neox.layers", "ffn": {"up": "mlp.dense_h_to_4h", "down": "mlp.dense_4h_to_h"}}
    plain = _neox()
    model = get_s2ft_model(copy.deepcopy(plain), S2FTConfig(ffn_ratio=0.25, structure_map=smap))
    ids = batch()
    check_exact_gradients(model, plain, ids)
    model.save_pretrained(tmp_path / "a")  # the map travels with the adapter
    from s2ft import S2FTModel

    loaded = S2FTModel.from_pretrained(copy.deepcopy(plain), tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_custom_map_errors_name_the_problem():
    bad_path = {"layers": "gpt_neox.layers", "ffn": {"up": "mlp.nope", "down": "mlp.dense_4h_to_h"}}
    with pytest.raises(ValueError, match="ffn.up -> no module at 'gpt_neox.layers.0.mlp.nope'"):
        get_s2ft_model(_neox(), S2FTConfig(ffn_ratio=0.25, structure_map=bad_path))
    wrong_heads = {**copy.deepcopy(__import__("s2ft").ARCHITECTURES["llama"]), "num_heads": 8}
    with pytest.raises(ValueError, match="num_heads=8"):
        get_s2ft_model(tiny_model("llama"), S2FTConfig(attn_ratio=0.5, structure_map=wrong_heads))
    with pytest.raises(ValueError, match='no module at "layers"'):
        get_s2ft_model(
            tiny_model("llama"), S2FTConfig(structure_map={"layers": "x.y", "ffn": {"up": "a", "down": "b"}})
        )
