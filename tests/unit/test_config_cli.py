import subprocess
import sys

from server.cli import _settings_from, build_parser
from server.config import Settings, hash_key


def test_env_vars(monkeypatch):
    monkeypatch.setenv("LEANSERVE_ENGINES", "http://a:1/, http://b:2")
    monkeypatch.setenv("LEANSERVE_API_KEYS", "k1,k2")
    monkeypatch.setenv("LEANSERVE_MAX_CONCURRENCY", "7")
    monkeypatch.setenv("LEANSERVE_PROTECT_OPS_ENDPOINTS", "true")
    s = Settings()
    assert s.engines == ["http://a:1", "http://b:2"] and s.api_keys == [hash_key("k1"), hash_key("k2")]
    assert "k1" not in repr(s)  # only hashes are held
    assert s.max_concurrency == 7 and s.protect_ops_endpoints is True


def test_flags_override_env(monkeypatch):
    monkeypatch.setenv("LEANSERVE_PORT", "9001")
    monkeypatch.setenv("LEANSERVE_MAX_QUEUE", "3")
    args = build_parser().parse_args(["serve", "--port", "9002", "--engine", "http://x", "--engine", "http://y",
                                      "--no-protect-ops-endpoints"])
    s = _settings_from(args)
    assert s.port == 9002 and s.max_queue == 3 and s.engines == ["http://x", "http://y"]
    assert s.protect_ops_endpoints is False


def test_help_documents_every_option():
    out = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--help"], capture_output=True, text=True,
                         timeout=60).stdout
    for name in Settings.model_fields:
        assert f"LEANSERVE_{name.upper()}" in out, name
