"""The fake Hub in hub_server.py, driven by the real huggingface_hub client (no network, no mocks of the client)."""

from __future__ import annotations

import json
import threading

import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi, constants
from safetensors.torch import load, save_file

from hub_server import FakeHub, allow_hub_http

TOKEN = "hf_fake"


@pytest.fixture(autouse=True)
def _hub_env(monkeypatch, tmp_path):
    allow_hub_http(monkeypatch)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no saved token or cache leaks in or out


@pytest.fixture(params=["xet-pipeline", "create-commit"])
def upload_path(request, monkeypatch):
    """hf_xet is installed, so upload_folder streams through the Xet pipeline; with HF_HUB_DISABLE_XET it falls back to
    a single create_commit. The fake Hub must serve both."""
    if request.param == "create-commit":
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    return request.param


def _write_folder(path, scale: float = 1.0) -> dict[str, bytes]:
    path.mkdir()
    (path / "a.json").write_text(json.dumps({"a": 1, "scale": scale}))
    save_file({"w": torch.arange(12, dtype=torch.float32).reshape(3, 4) * scale}, str(path / "weights.safetensors"))
    (path / "README.md").write_text("---\nlicense: mit\n---\n# x\n")
    return {p.name: p.read_bytes() for p in path.iterdir()}


def test_upload_folder_sends_exact_files(tmp_path, upload_path):
    local = _write_folder(tmp_path / "out")
    with FakeHub() as hub:
        api = HfApi(endpoint=hub.endpoint, token=TOKEN)
        url = api.create_repo("user/x", exist_ok=True)
        assert url.repo_id == "user/x"
        info = api.upload_folder(folder_path=tmp_path / "out", repo_id="user/x", commit_message="m")

        assert hub.repos["user/x"] == local
        assert set(local) == {"a.json", "weights.safetensors", "README.md"}
        assert torch.equal(load(hub.repos["user/x"]["weights.safetensors"])["w"], torch.arange(12.0).reshape(3, 4))
        assert hub.commits["user/x"] == ["m"]
        assert info.oid and info.commit_url == f"{hub.endpoint}/user/x/commit/{info.oid}"
        assert info.repo_url.repo_id == "user/x"
        assert api.repo_info("user/x").sha == info.oid
        assert sorted(api.list_repo_files("user/x")) == sorted(local)
        assert not hub.unhandled, hub.unhandled
        # binary files travel inline in the commit: no LFS batch / Xet token call was ever made
        assert not [p for _, p in hub.requests if "lfs" in p or "xet" in p]

        # second push to the same repo: only the changed files are sent, in a second commit
        _write_folder(tmp_path / "out2", scale=2.0)
        (tmp_path / "out2" / "README.md").write_bytes(local["README.md"])  # unchanged -> skipped by the client
        api.create_repo("user/x", exist_ok=True)
        info2 = api.upload_folder(folder_path=tmp_path / "out2", repo_id="user/x", commit_message="m2")

        assert info2.oid != info.oid
        assert hub.commits["user/x"] == ["m", "m2"]
        assert set(hub.commit_files["user/x"][1]) == {"a.json", "weights.safetensors"}
        assert hub.repos["user/x"] == {p.name: p.read_bytes() for p in (tmp_path / "out2").iterdir()}
        assert hub.repos["user/x"]["weights.safetensors"] != local["weights.safetensors"]

        # third push, nothing changed: the client makes no commit and reports the head instead
        info3 = api.upload_folder(folder_path=tmp_path / "out2", repo_id="user/x", commit_message="m3")
        assert info3.oid == info2.oid
        assert hub.commits["user/x"] == ["m", "m2"]
        assert not hub.unhandled, hub.unhandled


def test_module_level_upload_folder(tmp_path, monkeypatch):
    local = _write_folder(tmp_path / "out")
    with FakeHub() as hub:
        hub.route_default_client(monkeypatch)
        huggingface_hub.create_repo("user/y", token=TOKEN, exist_ok=True)
        huggingface_hub.upload_folder(folder_path=tmp_path / "out", repo_id="user/y", commit_message="m", token=TOKEN)
        assert hub.repos["user/y"] == local
        assert HfApi(token=TOKEN).whoami()["name"] == "user"
        assert not hub.unhandled, hub.unhandled


def test_errors_and_delete_patterns(tmp_path):
    local = _write_folder(tmp_path / "out")
    with FakeHub() as hub:
        hub.create_repo("user/z", {"old/stale.bin": b"\x00\x01", "keep.txt": b"k"})
        api = HfApi(endpoint=hub.endpoint, token=TOKEN)
        api.upload_folder(folder_path=tmp_path / "out", repo_id="user/z", delete_patterns="old/*")
        assert hub.repos["user/z"] == {**local, "keep.txt": b"k"}
        assert hub.commits["user/z"][-1] == "Upload folder using huggingface_hub"

        with pytest.raises(huggingface_hub.errors.RepositoryNotFoundError):
            api.upload_folder(folder_path=tmp_path / "out", repo_id="user/missing")
        with pytest.raises(huggingface_hub.errors.HfHubHTTPError) as e:
            HfApi(endpoint=hub.endpoint, token=False).create_repo("user/anon")
        assert e.value.response.status_code == 401
        assert "user/missing" not in hub.repos and "user/anon" not in hub.repos


def test_server_thread_stops():
    before = set(threading.enumerate())
    with FakeHub() as hub:
        assert hub.endpoint.startswith("http://127.0.0.1:")
    assert not [t for t in threading.enumerate() if t not in before and t.name == "fake-hub"]


def test_transformers_push_to_hub(monkeypatch):
    """The recipe for push_to_hub tests: route the default client, push, inspect hub.repos. A config goes through the
    same PushToHubMixin.push_to_hub as a model (create_repo, README lookup, create_commit) without a modeling import."""
    import transformers as T

    cfg = T.LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    with FakeHub() as hub:
        hub.route_default_client(monkeypatch)
        cfg.push_to_hub("user/tiny", token=TOKEN)
        files = hub.repos["user/tiny"]
        assert set(files) == {"config.json", "README.md"}
        assert json.loads(files["config.json"])["hidden_size"] == 16
        assert ("HEAD", "/user/tiny/resolve/main/README.md") in hub.requests  # model card lookup -> 404 EntryNotFound
        assert not hub.unhandled, hub.unhandled
