"""Model paths resolve as in transformers (local folder, cached id, download), and a bad one fails at once, in one line.

Offline cases run in-process (the suite sets HF_HUB_OFFLINE=1); the download runs in a child process against a
fake hub: a local HTTP server speaking the three endpoints `snapshot_download` uses, pointed at by `HF_ENDPOINT`.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from hf_moe_offload.errors import ModelNotFoundError, OffloadError
from hf_moe_offload.integration.plan import resolve_model_path

SHA = "0123456789abcdef0123456789abcdef01234567"


def _fails_at_once(path, **kwargs) -> str:
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as e:
        AutoModelForCausalLM.from_pretrained(path, offload_config={"host_budget": "50%"}, **kwargs)
    assert time.perf_counter() - start < 2.0
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, FileNotFoundError) and isinstance(e.value, OffloadError)
    return msg


def test_a_typo_in_a_local_path_names_the_close_folder(tmp_path, monkeypatch):
    (tmp_path / "models" / "moe-tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    msg = _fails_at_once("models/moe-tinyy")
    assert "'models/moe-tinyy' is not a folder" in msg and "did you mean 'models/moe-tiny'?" in msg, msg
    msg = _fails_at_once(str(tmp_path / "nowhere" / "model"))
    assert "does not exist either" in msg and "config.json" in msg, msg


def test_an_uncached_id_offline_says_how_to_get_it(tmp_path):
    msg = _fails_at_once("tiny-org/absent", cache_dir=str(tmp_path))
    assert "not in the Hugging Face cache" in msg and "HF_HUB_OFFLINE=1" in msg, msg
    assert "hf download tiny-org/absent" in msg and str(tmp_path) in msg, msg


def test_a_partial_snapshot_without_weights_is_not_taken_for_the_model(tmp_path):
    """transformers may have cached config.json alone; the offloaded load needs the safetensors files too."""
    repo = tmp_path / "models--tiny-org--partial"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SHA)
    (repo / "snapshots" / SHA).mkdir(parents=True)
    (repo / "snapshots" / SHA / "config.json").write_text("{}")
    msg = _fails_at_once("tiny-org/partial", cache_dir=str(tmp_path), local_files_only=True)
    assert "local_files_only=True" in msg and "safetensors" in msg, msg


def test_a_string_that_is_no_model_id(tmp_path):
    msg = _fails_at_once("not a model id!")
    assert "neither a local folder nor a valid model id" in msg, msg


def test_a_local_folder_is_used_as_it_is(mixtral_dir):
    assert resolve_model_path(mixtral_dir, {}) == mixtral_dir


def test_uninstall_restores_every_auto_class_exactly():
    """transformers copies `from_pretrained` into each Auto class; each copy is wrapped, and put back by uninstall."""
    import hf_moe_offload
    from hf_moe_offload.integration.auto_classes import _ORIGINAL_ATTR, _auto_classes

    classes = _auto_classes()
    assert AutoModelForCausalLM in classes and len(classes) > 20
    originals = {cls: cls.__dict__[_ORIGINAL_ATTR] for cls in classes}
    hf_moe_offload.uninstall()
    try:
        assert all(cls.__dict__["from_pretrained"] is originals[cls] for cls in classes)
        assert not any(_ORIGINAL_ATTR in cls.__dict__ for cls in classes)
    finally:
        hf_moe_offload.install()
    assert all(cls.__dict__[_ORIGINAL_ATTR] is originals[cls] for cls in classes)


# --- download through huggingface_hub, from a fake hub ---------------------------------------------------------


class _Hub(http.server.BaseHTTPRequestHandler):
    """`/api/models/{id}/revision/{rev}`, `/api/models/{id}/tree/{sha}`, `/{id}/resolve/{sha}/{file}` of one repo."""

    repo_id = "tiny-org/tiny-mixtral"
    folder: Path
    log: list[str]

    def log_message(self, *args):  # quiet
        pass

    def _send(self, code: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
        self.send_response(code)
        for k, v in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _route(self, head: bool):
        self.log.append(f"{self.command} {self.path}")
        path = self.path.split("?")[0]
        files = sorted(p.name for p in self.folder.iterdir())
        if path.startswith(f"/api/models/{self.repo_id}/revision/"):
            info = {"id": self.repo_id, "sha": SHA, "siblings": [{"rfilename": f} for f in files]}
            return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, head)
        if path.startswith(f"/api/models/{self.repo_id}/tree/"):
            tree = [
                {"type": "file", "path": f, "size": (self.folder / f).stat().st_size, "oid": _oid(self.folder / f)}
                for f in files
            ]
            return self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, head)
        prefix = f"/{self.repo_id}/resolve/"
        if path.startswith(prefix):
            name = path[len(prefix) :].split("/", 1)[1]
            if name in files:
                body = (self.folder / name).read_bytes()
                headers = {"X-Repo-Commit": SHA, "ETag": f'"{_oid(self.folder / name)}"'}
                return self._send(200, body, headers, head)
        return self._send(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}, head)

    def do_GET(self):
        self._route(head=False)

    def do_HEAD(self):
        self._route(head=True)


def _oid(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


_CHILD = r"""
import json, sys, time
import torch
import hf_moe_offload
from transformers import AutoModelForCausalLM
from hf_moe_offload.errors import ModelNotFoundError

out = {}
for name in ("models/moe-tinyy", "tiny-org/absent"):
    start = time.perf_counter()
    try:
        AutoModelForCausalLM.from_pretrained(name, offload_config={})
    except ModelNotFoundError as e:
        out[name] = [str(e), time.perf_counter() - start]
model = AutoModelForCausalLM.from_pretrained("tiny-org/tiny-mixtral", offload_config={"host_budget": "30%"})
out["folder"] = model.offload_engine.folder
out["name_or_path"] = model.name_or_path
out["tokens"] = model.generate(torch.tensor([[5, 9, 17]]), max_new_tokens=4, do_sample=False)[0].tolist()
print(json.dumps(out))
"""


@pytest.mark.slow
def test_an_id_is_downloaded_through_huggingface_hub(tmp_path, mixtral_dir):
    """Online: a wrong path and an unknown id fail at once (no retry); an id is downloaded into the cache and loads."""
    _Hub.folder, _Hub.log = Path(mixtral_dir), []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    (tmp_path / "models" / "moe-tiny").mkdir(parents=True)
    env = {
        **os.environ,
        "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}",
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_DISABLE_XET": "1",
    }
    try:
        run = subprocess.run([sys.executable, "-c", _CHILD], cwd=tmp_path, env=env, capture_output=True, text=True)
    finally:
        server.shutdown()
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.splitlines()[-1])
    typo, typo_s = out["models/moe-tinyy"]
    assert "did you mean 'models/moe-tiny'?" in typo and typo_s < 2.0
    absent, absent_s = out["tiny-org/absent"]
    assert "could not be downloaded from http://127.0.0.1" in absent and absent_s < 5.0, absent
    assert sum("tiny-org/absent" in line for line in _Hub.log) == 1, _Hub.log  # one attempt, no retries
    assert not any("moe-tinyy" in line for line in _Hub.log), _Hub.log  # a local path never reaches the network
    snapshot = tmp_path / "hf" / "hub" / "models--tiny-org--tiny-mixtral" / "snapshots" / SHA
    assert os.path.realpath(out["folder"]) == os.path.realpath(snapshot)
    assert out["name_or_path"] == "tiny-org/tiny-mixtral" and len(out["tokens"]) == 7
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(p.name for p in Path(mixtral_dir).iterdir())
