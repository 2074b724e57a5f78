"""Credentials never show: API keys are held as hashes and can come from a file or the environment;
engine URLs lose their user:password in /ready, /metrics and the logs."""
import logging
import subprocess
import sys

import httpx

from server.config import Settings, hash_key
from tests.support.fake_upstream import MODEL

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def test_keys_from_a_file_are_hashed(tmp_path, upstream, make_gateway):
    f = tmp_path / "keys"
    f.write_text("# one per line\nk-file\n" + hash_key("k-prehashed") + "\n")
    s = Settings(engines=[upstream.url], api_key_file=str(f))
    assert s.api_keys == [hash_key("k-file"), hash_key("k-prehashed")] and "k-file" not in repr(s)
    gw = make_gateway([upstream.url], api_key_file=str(f))
    url = gw.url + "/v1/chat/completions"
    assert httpx.post(url, json=CHAT, headers={"authorization": "Bearer k-file"}).status_code == 200
    assert httpx.post(url, json=CHAT, headers={"authorization": "Bearer k-prehashed"}).status_code == 200
    assert httpx.post(url, json=CHAT, headers={"authorization": "Bearer " + hash_key("k-file")}).status_code == 401


def test_api_key_flag_warns_about_the_process_list():
    out = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--api-key", "k", "--port", "0"],
                         capture_output=True, text=True, timeout=60)
    assert "process list" in out.stderr


def test_engine_credentials_are_redacted(upstream, make_gateway, caplog):
    secret_url = upstream.url.replace("http://", "http://user:s3cret@")
    caplog.set_level(logging.INFO)
    gw = make_gateway([secret_url])
    assert httpx.post(gw.url + "/v1/chat/completions", json=CHAT).status_code == 200  # the credentials work
    shown = httpx.get(gw.url + "/ready").text + httpx.get(gw.url + "/metrics").text + caplog.text
    assert "s3cret" not in shown and "user:" not in shown
    assert upstream.url in httpx.get(gw.url + "/ready").text


def test_redact_url():
    from server.redact import redact_url
    assert redact_url("https://u:p@h.example:8443/v1?token=x") == "https://h.example:8443/v1"
    assert redact_url("http://[::1]:8100") == "http://[::1]:8100"
    assert redact_url("http://u@[::1]:81/") == "http://[::1]:81/"


def test_request_id_is_echoed_or_generated(upstream, make_gateway):
    gw = make_gateway([upstream.url])
    url = gw.url + "/v1/chat/completions"
    for body in (CHAT, {**CHAT, "stream": True}, {"model": MODEL}):  # JSON, SSE, a 400
        r = httpx.post(url, json=body, headers={"x-request-id": "abc-123"})
        assert r.headers["x-request-id"] == "abc-123", r.status_code
    generated = httpx.post(url, json=CHAT, headers={"x-request-id": "bad id\twith spaces"}).headers["x-request-id"]
    assert len(generated) == 32 and generated != httpx.post(url, json=CHAT).headers["x-request-id"]
