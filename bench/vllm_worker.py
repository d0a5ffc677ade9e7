"""Runs inside vLLM's own virtual environment (imports only vLLM and the standard library):
greedy generation with vLLM's offline engine for a job written by `bench/vllm_parity.py`.

    $VLLM_PYTHON bench/vllm_worker.py JOB.json OUT.json

JOB: {"base": dir, "loras": {name: dir}, "max_lora_rank": int, "max_tokens": int,
      "dtype": "float32", "prompts": [[token ids], ...], "requests": [[prompt index, name or null]]}
OUT: {"tokens": [[ids], ...] (one per request), "vllm": version, "load_s", "generate_s"}
"""

from __future__ import annotations

import json
import sys
import time


def main(job_path: str, out_path: str) -> None:
    with open(job_path) as f:
        job = json.load(f)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    t0 = time.perf_counter()
    loras = job.get("loras") or {}
    llm = LLM(
        model=job["base"],
        tokenizer=job["base"],
        dtype=job.get("dtype", "float32"),
        enable_lora=bool(loras),
        max_lora_rank=job.get("max_lora_rank", 16),
        max_loras=job.get("max_loras") or max(1, len(loras)),
        max_model_len=job.get("max_model_len", 256),
        seed=0,
        enforce_eager=True,
        gpu_memory_utilization=job.get("memory_fraction", 0.2),  # on CPU: the share of RAM vLLM reserves
        **({"max_num_seqs": job["max_num_seqs"]} if job.get("max_num_seqs") else {}),
    )
    load_s = time.perf_counter() - t0
    requests = {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(sorted(loras.items()))}
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True, seed=0)
    prompts = [TokensPrompt(prompt_token_ids=job["prompts"][i]) for i, _ in job["requests"]]
    lora = [requests[name] if name else None for _, name in job["requests"]]
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
    generate_s = time.perf_counter() - t0
    import vllm

    result = {
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        "vllm": vllm.__version__,
        "load_s": load_s,
        "generate_s": generate_s,
    }
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
