"""torch.compile: an S2FTModel traces without graph breaks, forward and backward, and a compiled
model trains exactly like the eager one (the optimizer hook writes the new deltas into the
weights; compiled graphs never look at tensor versions)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from conftest import batch, tiny_model

from s2ft import S2FTConfig, get_s2ft_model

CFG = S2FTConfig(ffn_ratio=0.25, attn_ratio=0.5, attn_modules=("q", "k", "v", "o"), seed=3)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_forward_and_backward_trace_without_graph_breaks():
    model = get_s2ft_model(tiny_model("llama", dtype=torch.float32), CFG).train()
    ids = batch()

    def step(ids):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach()

    forward = torch._dynamo.explain(lambda ids: model(input_ids=ids, labels=ids).loss)(ids)
    assert forward.graph_break_count == 0, [r.reason for r in forward.break_reasons]
    torch._dynamo.reset()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        both = torch._dynamo.explain(step)(ids)
    assert both.graph_break_count == 0, [r.reason for r in both.break_reasons]
    assert both.graph_count == 1


def test_compiled_model_trains_like_eager():
    plain = tiny_model("llama", dtype=torch.float32)
    eager = get_s2ft_model(copy.deepcopy(plain), CFG).train()
    compiled_base = get_s2ft_model(copy.deepcopy(plain), CFG).train()
    compiled = torch.compile(compiled_base, fullgraph=True, backend="inductor")
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (eager, compiled_base)]
    ids = batch(n=2, t=12)
    for _ in range(3):
        grads = []
        for run, m, opt in zip((eager, compiled), (eager, compiled_base), opts, strict=True):
            opt.zero_grad()
            loss = run(input_ids=ids, labels=ids).loss
            loss.backward()
            grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
            opt.step()  # the optimizer hook writes the new deltas into the weights
        g_eager, g_comp = grads
        assert g_eager and set(g_comp) == set(g_eager)
        for n, g in g_eager.items():
            assert (g_comp[n] - g).abs().max() <= 1e-5 * (1 + g.abs().max()), n
    with torch.no_grad():
        a = eager(input_ids=ids).logits
        b = compiled_base(input_ids=ids).logits
    assert (a - b).abs().max() <= 1e-4
