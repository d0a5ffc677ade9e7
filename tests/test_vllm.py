"""A real vLLM serves exported S²FT adapters with the tokens of the merged model in transformers.

vLLM pins its own torch, so it lives in its own virtual environment, outside the project's
dependencies; set `S2FT_VLLM_PYTHON` to that environment's python (docs/SERVING.md, "vLLM"
shows the install) to run this test. The work is `bench/vllm_parity.py --models tiny`: a random
LLaMA with SmolLM2's tokenizer, two adapters trained a few steps (FFN channels and attention
heads on q, k, v, o), exported with per-module ranks and with `--pad-to`, 8 prompts x {base,
adapter a, adapter b} in one mixed batch, 32 greedy tokens each, through vLLM's offline engine
and through its OpenAI server answered by the `openai` client.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = os.environ.get("S2FT_VLLM_PYTHON")

pytestmark = pytest.mark.skipif(
    not (VLLM_PYTHON and Path(VLLM_PYTHON).exists()),
    reason="needs vLLM in its own virtual environment: set S2FT_VLLM_PYTHON (docs/SERVING.md, 'vLLM')",
)


def test_vllm_offline_and_server_give_the_merged_models_tokens(tmp_path):
    pytest.importorskip("openai")
    sys.path.insert(0, str(ROOT / "bench"))
    import vllm_parity

    out = tmp_path / "parity.json"
    code = vllm_parity.main(["--vllm-python", VLLM_PYTHON, "--models", "tiny", "--out", str(out)])
    result = json.loads(out.read_text())
    (model,) = result["models"]
    # the adapters change every prompt's tokens, so equal tokens mean the adapter was applied
    assert model["adapter_changes_tokens"] == {"a": "8/8 prompts", "b": "8/8 prompts"}
    modes = {(c["export"], c["mode"]): c for c in model["checks"]}
    assert {("rank_pattern", "offline"), ("rank_pattern", "server"), ("pad_to", "offline")} <= set(modes)
    for key, check in modes.items():
        if check["mode"] == vllm_parity.SLOTS_FULL:  # vLLM's CPU slot -1 bug may hit base requests only
            assert all(m["adapter"] is None for m in check["mismatches"]), key
            continue
        assert check["requests"] == 24 and check["equal"] == 24, (key, check["mismatches"][:2])
    assert code == 0
