"""`s2ft serve` as a real process on a loopback port, driven by the official `openai` client
and httpx: completions equal offline generation per adapter, concurrent requests across
adapters are batched, streaming, every bad request gets its status, admin load/unload."""

from __future__ import annotations

import concurrent.futures as cf
import json
import re
import subprocess
import sys
import time

import httpx
import pytest
import torch
import transformers as T
from conftest import free_port, tiny_llama_for, word_tokenizer

from s2ft import S2FTConfig, S2FTModel, get_s2ft_model
from s2ft.data import builtin_dataset

openai = pytest.importorskip("openai")
KEY = "test-key"
PROMPTS = ["Which is the correct answer", "the correct answer is", "Please choose the correct answer to the question"]


@pytest.fixture(scope="module", params=["mixed", "switch"])
def server(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("serve")
    records = builtin_dataset("arc_easy")[0][:20]
    tok = word_tokenizer(records)
    base = tiny_llama_for(tok)
    base.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    for i, name in enumerate(["alpha", "beta", "spare"]):
        m = get_s2ft_model(T.AutoModelForCausalLM.from_pretrained(root / "model"), S2FTConfig(ffn_ratio=0.5, seed=i))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():  # large deltas: each adapter generates visibly different text
            for p in m.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 2.0)
        m.save_pretrained(root / ("adapters" if name != "spare" else "elsewhere") / name)
    port = free_port()
    cmd = [sys.executable, "-m", "s2ft.cli", "serve", "--model", str(root / "model")]
    cmd += ["--adapters-dir", str(root / "adapters"), "--port", str(port), "--api-key", KEY, "--max-tokens", "24"]
    cmd += ["--max-prompt-tokens", "40", "--max-body-bytes", "4000", "--batch-window-ms", "200"]
    cmd += ["--schedule", request.param]
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError((root / "server.log").read_text()[-3000:])
        time.sleep(0.2)
    yield {"url": url, "root": root, "tok": tok, "proc": proc, "schedule": request.param}
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def _offline(server, adapter: str | None, prompt: str, max_tokens: int) -> str:
    base = T.AutoModelForCausalLM.from_pretrained(server["root"] / "model").eval()
    model = base if adapter is None else S2FTModel.from_pretrained(base, server["root"] / "adapters" / adapter)
    tok = server["tok"]
    ids = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def _client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0)


def test_models_and_completions_equal_offline_generation(server):
    client = _client(server)
    assert sorted(m.id for m in client.models.list().data) == ["alpha", "base", "beta"]
    texts = {}
    for name in ("alpha", "beta", "base"):
        r = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=12, temperature=0)
        texts[name] = r.choices[0].text
        assert texts[name] == _offline(server, None if name == "base" else name, PROMPTS[0], 12)
        assert r.usage.prompt_tokens == len(server["tok"](PROMPTS[0])["input_ids"])
    assert len(set(texts.values())) == 3  # the adapters really change the output


def test_concurrent_clients_are_batched(server):
    before = _metric(server, "s2ft_batches_total")
    jobs = [(["alpha", "beta", "base"][i % 3], PROMPTS[i % len(PROMPTS)]) for i in range(16)]

    def one(job):
        name, prompt = job
        r = _client(server).completions.create(model=name, prompt=prompt, max_tokens=8, temperature=0)
        return r.choices[0].text

    with cf.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, jobs))
    for (name, prompt), text in zip(jobs, got, strict=True):
        assert text == _offline(server, None if name == "base" else name, prompt, 8)
    batches = _metric(server, "s2ft_batches_total") - before
    assert batches < 16, "16 concurrent requests ran one by one"
    one_model = _metric(server, 's2ft_batch_adapters_bucket{le="1.0"}')
    if server["schedule"] == "mixed":  # some batches mixed several adapters
        assert one_model < _metric(server, "s2ft_batch_adapters_count")
    else:  # one adapter per batch, merged in place
        assert one_model == _metric(server, "s2ft_batch_adapters_count")


def _metric(server, name: str) -> float:
    text = httpx.get(server["url"] + "/metrics").text
    m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def test_streaming_and_chat(server):
    client = _client(server)
    whole = client.completions.create(model="beta", prompt=PROMPTS[1], max_tokens=10, temperature=0).choices[0].text
    parts = [
        c.choices[0].text
        for c in client.completions.create(model="beta", prompt=PROMPTS[1], max_tokens=10, temperature=0, stream=True)
    ]
    assert "".join(parts) == whole and len([p for p in parts if p]) > 1
    chat = client.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": PROMPTS[2]}], max_tokens=6, temperature=0
    )
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].finish_reason in ("stop", "length")
    stream = client.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": PROMPTS[2]}], max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream) == chat.choices[0].message.content
    # seeded sampling is reproducible, and a stop string ends the text before it
    a = client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=10, temperature=1.0, seed=3)
    b = client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=10, temperature=1.0, seed=3)
    assert a.choices[0].text == b.choices[0].text
    full = client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=10, temperature=0).choices[0].text
    word = full.split()[2]
    cut = client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=10, temperature=0, stop=[word])
    assert cut.choices[0].text == full[: full.index(word)] and cut.choices[0].finish_reason == "stop"


def test_bad_requests_get_their_status_and_the_server_keeps_serving(server):
    url = server["url"]
    post = lambda path, **kw: httpx.post(url + path, timeout=30, **kw)  # noqa: E731
    ok = {"model": "alpha", "prompt": PROMPTS[0], "max_tokens": 4}
    r = post("/v1/completions", json={**ok, "model": "gamma"})
    assert r.status_code == 404 and "alpha" in r.json()["error"]["message"]
    r = post("/v1/completions", content=b'{"model": "alpha", "prompt": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    r = post("/v1/completions", json={**ok, "temperature": "hot"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "temperature"
    r = post("/v1/completions", json={k: v for k, v in ok.items() if k != "prompt"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "prompt"
    r = post("/v1/completions", json={**ok, "max_tokens": 1000})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = post("/v1/completions", json={**ok, "prompt": " ".join(["answer"] * 100)})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = post("/v1/completions", json={**ok, "prompt": "x" * 5000})
    assert r.status_code == 413
    r = post("/v1/completions", json={**ok, "n": 2})
    assert r.status_code == 422 and r.json()["error"]["param"] == "n"
    r = post("/v1/chat/completions", json={"model": "alpha", "messages": []})
    assert r.status_code == 422
    r = post("/admin/adapters", json={"action": "load", "name": "spare"})
    assert r.status_code == 401
    auth = {"authorization": f"Bearer {KEY}"}
    for name in ("../elsewhere/spare", "/etc", "a/b", ".."):
        r = post("/admin/adapters", json={"action": "load", "name": name}, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["param"] == "name", name
    r = post("/admin/adapters", json={"action": "load", "name": "nothere"}, headers=auth)
    assert r.status_code == 404
    assert httpx.get(url + "/health").status_code == 200
    assert post("/v1/completions", json=ok).status_code == 200
    assert server["proc"].poll() is None


def test_admin_load_and_unload(server):
    url, auth = server["url"], {"authorization": f"Bearer {KEY}"}
    spare = server["root"] / "elsewhere" / "spare"
    target = server["root"] / "adapters" / "spare"
    spare.rename(target)
    try:
        r = httpx.post(url + "/admin/adapters", json={"action": "load", "name": "spare"}, headers=auth, timeout=60)
        assert r.status_code == 200 and "spare" in r.json()["models"]
        got = _client(server).completions.create(model="spare", prompt=PROMPTS[0], max_tokens=6, temperature=0)
        assert got.choices[0].text == _offline(server, "spare", PROMPTS[0], 6)
        r = httpx.post(url + "/admin/adapters", json={"action": "unload", "name": "spare"}, headers=auth, timeout=60)
        assert r.status_code == 200 and "spare" not in r.json()["models"]
        r = httpx.post(url + "/v1/completions", json={"model": "spare", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 404
    finally:
        target.rename(spare)
    assert json.loads(httpx.get(url + "/v1/models").text)["data"][0]["id"] == "base"
