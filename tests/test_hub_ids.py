"""Hugging Face Hub ids as --model-path: a tiny random model placed in a local cache laid
out as huggingface_hub lays one out (models--org--name/refs, snapshots/<commit>) is
found by id offline, --revision picks the snapshot, and an unknown id fails fast with
its name. There is no network to the Hub here, so downloading is seen only failing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import constants as hf_constants

from radixserve.model_loader.hub import ModelNotFoundError, is_hub_id, resolve_model_path
from radixserve.server_args import ServerArgs
from tests.conftest import start_server
from tests.model_factory import make_tiny_checkpoint

REPO = "tiny-org/tiny-llama"
MAIN = "a" * 40
V1 = "b" * 40


def _place(cache: Path, repo_id: str, commit: str, source: Path, refs: tuple[str, ...]) -> Path:
    """Copy `source` into the cache as snapshot `commit` of `repo_id`, under `refs`."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(source, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hub")
    cache = root / "cache"
    main_src = make_tiny_checkpoint("llama", root / "main", seed=0)
    v1_src = make_tiny_checkpoint("llama", root / "v1", seed=1)
    # The two snapshots also differ in context length, which the server reports.
    cfg = (v1_src / "config.json").read_text()
    (v1_src / "config.json").write_text(cfg.replace('"max_position_embeddings": 1024',
                                                    '"max_position_embeddings": 512'))
    _place(cache, REPO, MAIN, main_src, ("main",))
    _place(cache, REPO, V1, v1_src, ("v1",))
    # A repo of which only config.json was ever fetched: no model to serve.
    partial = root / "partial"
    partial.mkdir()
    shutil.copy(main_src / "config.json", partial / "config.json")
    _place(cache, "tiny-org/config-only", MAIN, partial, ("main",))
    return cache


def test_what_counts_as_an_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert is_hub_id("Qwen/Qwen2.5-0.5B-Instruct")
    local = tmp_path / "org" / "name"
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not is_hub_id("org/name")  # exists on disk
    for path in ("model.gguf", "org/model.gguf", "/abs/path", "./rel/x", "a/b/c", "gpt2",
                 "../up/x"):
        assert not is_hub_id(path), path
    assert resolve_model_path("/no/such/folder") == "/no/such/folder"


def test_cache_lookup_and_revisions(hub_cache: Path) -> None:
    snap = hub_cache / f"models--{REPO.replace('/', '--')}" / "snapshots"
    assert resolve_model_path(REPO, download_dir=str(hub_cache)) == str(snap / MAIN)
    assert resolve_model_path(REPO, revision="v1", download_dir=str(hub_cache)) == str(snap / V1)
    assert resolve_model_path(REPO, revision=V1, download_dir=str(hub_cache)) == str(snap / V1)


def test_offline_misses_name_the_id(hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # What HF_HUB_OFFLINE=1 sets when huggingface_hub is imported.
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    for repo, revision in (("nobody/nothing", None), (REPO, "v2"),
                           ("tiny-org/config-only", None)):
        with pytest.raises(ModelNotFoundError, match=repo) as err:
            resolve_model_path(repo, revision=revision, download_dir=str(hub_cache))
        assert "HF_HUB_OFFLINE" in str(err.value)
    # Dummy weights and tokenizers need no weight files: config-only is enough.
    assert resolve_model_path("tiny-org/config-only", download_dir=str(hub_cache),
                              weights=False).endswith(MAIN)


def test_online_miss_names_the_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(ModelNotFoundError, match="nobody/nothing"):
        resolve_model_path("nobody/nothing", download_dir=str(tmp_path))


def test_server_args_keep_the_id_as_served_name(hub_cache: Path) -> None:
    sa = ServerArgs(model_path=REPO, tokenizer_path=REPO, revision="v1",
                    download_dir=str(hub_cache))
    assert sa.model_path.endswith(V1) and sa.tokenizer_path.endswith(V1)
    assert sa.served_model_name == REPO
    named = ServerArgs(model_path=REPO, served_model_name="mine", download_dir=str(hub_cache))
    assert named.served_model_name == "mine" and named.model_path.endswith(MAIN)


def test_cli_unknown_id_is_one_line_error(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)}
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "radixserve.launch_server", "--model-path",
                          "nobody/nothing"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 2
    assert "nobody/nothing" in out.stderr and "Traceback" not in out.stderr
    assert "error:" in out.stderr.strip().splitlines()[-1]
    assert time.monotonic() - start < 60


def test_server_serves_an_id_offline(hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    live = start_server("--model-path", REPO, "--revision", "v1", "--max-total-tokens", "2048",
                        log_name="hub")
    try:
        with httpx2.Client(base_url=live.url, timeout=120) as c:
            info = c.get("/get_model_info").json()
            assert info["context_length"] == 512  # the v1 snapshot's
            assert c.get("/v1/models").json()["data"][0]["id"] == REPO
            out = c.post("/generate", json={"text": "Hello", "sampling_params": {
                "max_new_tokens": 4, "temperature": 0, "ignore_eos": True}}).json()
            assert out["meta_info"]["completion_tokens"] == 4
    finally:
        live.proc.terminate()
        live.proc.wait(timeout=30)
