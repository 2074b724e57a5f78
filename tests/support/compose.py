"""deploy/docker-compose.yml as docker-compose (Debian's 1.29, from `make system-deps`) resolves it."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run `make system-deps` (Debian packages docker-compose, prometheus)")
    return path


def run(cmd: list[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def compose_config(env_file: Path, file: Path = COMPOSE) -> dict:
    # A clean environment: variables set in the caller's would override the env file.
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root")}
    p = run([tool("docker-compose"), "-f", str(file), "--env-file", str(env_file), "config"], cwd=DEPLOY, env=env)
    assert p.returncode == 0, f"docker-compose config failed:\n{p.stderr}"
    return yaml.safe_load(p.stdout)


def seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)
