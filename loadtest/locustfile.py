"""Load test for leanserve (or any OpenAI-compatible server): users streaming chat or text completions.

  locust -f loadtest/locustfile.py --headless -u 8 -r 2 -t 60s --stop-timeout 60 \\
      --host http://127.0.0.1:8000 --samples-file loadtest/results/samples.jsonl
  python -m loadtest.report loadtest/results/samples.jsonl --out loadtest/results

Locust times a request until its response headers, which for a stream says nothing about generation.
So each stream is read here, event by event, and fires custom locust events (request_type "SSE"):
  TTFT   time from sending the request to the first generated token
  ITL    each gap between consecutive token events
  TPOT   per request: (e2e - TTFT) / (output tokens - 1)
  E2E    time until [DONE]; response_length = output tokens (engine-reported usage)
Every request (successful or not) is also written as one JSON line to --samples-file, from which
loadtest/report.py computes exact percentiles and goodput under TTFT/TPOT SLOs.

Options (each also an environment variable, shown in `locust -f loadtest/locustfile.py --help`):
  --endpoint chat|completions   --model NAME (default: the first of /v1/models)
  --prompts gsm8k|synthetic      --prompts-file PATH    --prompt-words DIST (synthetic)
  --max-tokens DIST              --temperature T        --ignore-eos
  --top-h H                      --trim JSON            --api-key KEY     --seed N
DIST is "128" (fixed), "32-256" (uniform integers) or "64,128,512" (uniform choice).
"""
from __future__ import annotations

import itertools
import json
import logging
import random
import threading
import time
from pathlib import Path

import requests
from locust import HttpUser, constant, events, task

log = logging.getLogger("leanserve.loadtest")

GSM8K = Path(__file__).resolve().parent.parent / "data" / "gsm8k" / "test500.jsonl"
PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly box jolly "
         "numbers rivers mountains engines tokens stream latency memory cache request answer").split()


def parse_dist(spec: str):
    """'128' → always 128; '32-256' → uniform integer in [32, 256]; '64,128' → uniform choice."""
    spec = str(spec).strip()
    try:
        if "," in spec:
            values = [int(v) for v in spec.split(",") if v.strip()]
            if not values or min(values) < 1:
                raise ValueError
            return lambda rng: rng.choice(values)
        if "-" in spec:
            lo, hi = (int(v) for v in spec.split("-", 1))
            if not 1 <= lo <= hi:
                raise ValueError
            return lambda rng: rng.randint(lo, hi)
        value = int(spec)
        if value < 1:
            raise ValueError
        return lambda rng: value
    except ValueError:
        raise ValueError(f"bad distribution {spec!r}: use N, A-B or A,B,C (positive integers)") from None


def load_prompts(opts) -> list[str]:
    if opts.prompts == "synthetic":
        return []
    path = Path(opts.prompts_file) if opts.prompts_file else GSM8K
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} not found: pass --prompts-file, or --prompts synthetic")
    prompts = [json.loads(line)["question"] for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"no prompts in {path}")
    return prompts


@events.init_command_line_parser.add_listener
def _add_arguments(parser):
    g = parser.add_argument_group("leanserve load test")
    g.add_argument("--endpoint", choices=sorted(PATHS), default="chat", env_var="LOADTEST_ENDPOINT",
                   help="chat (/v1/chat/completions) or completions (/v1/completions)")
    g.add_argument("--model", default="", env_var="LOADTEST_MODEL", help="model name (default: first of /v1/models)")
    g.add_argument("--prompts", choices=["gsm8k", "synthetic"], default="gsm8k", env_var="LOADTEST_PROMPTS",
                   help="questions from data/gsm8k/test500.jsonl, or random words")
    g.add_argument("--prompts-file", default="", env_var="LOADTEST_PROMPTS_FILE",
                   help="JSONL with a 'question' field per line (default: the gsm8k test500 file)")
    g.add_argument("--prompt-words", default="64-256", env_var="LOADTEST_PROMPT_WORDS",
                   help="synthetic prompt length in words: N, A-B or A,B,C")
    g.add_argument("--max-tokens", default="128", env_var="LOADTEST_MAX_TOKENS", help="N, A-B or A,B,C")
    g.add_argument("--temperature", type=float, default=0.7, env_var="LOADTEST_TEMPERATURE")
    g.add_argument("--ignore-eos", action="store_true", default=False, env_var="LOADTEST_IGNORE_EOS",
                   help="vLLM extension: always generate max_tokens tokens")
    g.add_argument("--top-h", type=float, default=None, env_var="LOADTEST_TOP_H", help="leanserve Top-H, in (0, 1]")
    g.add_argument("--trim", default="", env_var="LOADTEST_TRIM", help="leanserve thought trimming, as JSON")
    g.add_argument("--api-key", default="", env_var="LOADTEST_API_KEY", help="sent as Authorization: Bearer")
    g.add_argument("--samples-file", default="", env_var="LOADTEST_SAMPLES_FILE",
                   help="write one JSON line per request here (for loadtest/report.py)")
    g.add_argument("--seed", type=int, default=0, env_var="LOADTEST_SEED")


class _Run:
    """Per-process state shared by all users: options, prompts, the samples file."""

    def __init__(self):
        self.lock = threading.Lock()
        self.samples = None
        self.prompts: list[str] = []
        self.model = ""
        self.max_tokens = self.prompt_words = None
        self.extra: dict = {}


RUN = _Run()
_USER_IDS = itertools.count()


@events.test_start.add_listener
def _on_test_start(environment, **_kw):
    try:
        _configure(environment)
    except (OSError, ValueError) as e:  # bad options: stop with the reason, not with users crashing later
        logging.getLogger("loadtest").error("%s", e)
        environment.process_exit_code = 2
        environment.runner.quit()


def _configure(environment):
    opts = environment.parsed_options
    RUN.prompts = load_prompts(opts)
    RUN.max_tokens = parse_dist(opts.max_tokens)
    RUN.prompt_words = parse_dist(opts.prompt_words)
    RUN.extra = {}
    if opts.ignore_eos:
        RUN.extra["ignore_eos"] = True
    if opts.top_h is not None:
        if not 0 < opts.top_h <= 1:
            raise ValueError("--top-h must be in (0, 1]")
        RUN.extra["top_h"] = opts.top_h
    if opts.trim:
        RUN.extra["trim"] = json.loads(opts.trim)
    RUN.model = opts.model or _first_model(environment.host, opts.api_key)
    if opts.samples_file:
        Path(opts.samples_file).parent.mkdir(parents=True, exist_ok=True)
        RUN.samples = open(opts.samples_file, "w")
    log.info("load test: %s on %s, model %s, prompts %s, max_tokens %s, extra %s", opts.endpoint,
             environment.host, RUN.model, opts.prompts, opts.max_tokens, RUN.extra)


@events.quitting.add_listener
def _on_quitting(environment, **_kw):
    with RUN.lock:
        if RUN.samples is not None:
            RUN.samples.close()
            RUN.samples = None


def _headers(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _first_model(host: str, api_key: str) -> str:
    r = requests.get(host.rstrip("/") + "/v1/models", headers=_headers(api_key), timeout=30)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def _record(sample: dict) -> None:
    with RUN.lock:
        if RUN.samples is not None:
            RUN.samples.write(json.dumps(sample) + "\n")
            RUN.samples.flush()


def _token_text(obj: dict, endpoint: str) -> str:
    choices = obj.get("choices") or []
    if not choices:
        return ""
    if endpoint == "chat":
        delta = choices[0].get("delta") or {}
        return (delta.get("content") or "") + (delta.get("reasoning_content") or delta.get("reasoning") or "")
    return choices[0].get("text") or ""


class StreamingUser(HttpUser):
    """A closed-loop client: sends the next streaming request as soon as the last one ended."""
    wait_time = constant(0)

    def on_start(self):
        self.rng = random.Random(f"{self.environment.parsed_options.seed}-{next(_USER_IDS)}")

    def _body(self, endpoint: str) -> dict:
        if RUN.prompts:
            text = self.rng.choice(RUN.prompts)
        else:
            text = " ".join(self.rng.choice(WORDS) for _ in range(RUN.prompt_words(self.rng)))
        body = {"model": RUN.model, "max_tokens": RUN.max_tokens(self.rng), "stream": True,
                "stream_options": {"include_usage": True},
                "temperature": self.environment.parsed_options.temperature, **RUN.extra}
        if endpoint == "chat":
            body["messages"] = [{"role": "user", "content": text}]
        else:
            body["prompt"] = text
        return body

    @task
    def stream(self):
        opts = self.environment.parsed_options
        endpoint = opts.endpoint
        body = self._body(endpoint)
        sample = {"endpoint": endpoint, "start": time.time(), "max_tokens": body["max_tokens"], "status": None,
                  "error": None, "ttft": None, "e2e": None, "itl": [], "output_tokens": 0, "prompt_tokens": None,
                  "finish_reason": None}
        t0 = time.perf_counter()
        with self.client.post(PATHS[endpoint], json=body, headers=_headers(opts.api_key), stream=True,
                              catch_response=True, name=PATHS[endpoint]) as resp:
            sample["status"] = resp.status_code
            if resp.status_code != 200:
                detail = resp.error if resp.status_code == 0 else resp.text[:300]
                sample["error"] = f"HTTP {resp.status_code}: {detail}"
                resp.failure(sample["error"])
            else:
                try:
                    self._read_stream(resp, sample, t0, endpoint)
                except Exception as e:  # a broken stream (GreenletExit at shutdown is not an Exception)
                    sample["error"] = sample["error"] or f"{type(e).__name__}: {e}"
                if sample["error"]:
                    sample["status"] = "stream_error"
                    resp.failure(sample["error"])
                else:
                    resp.success()
        sample["end"] = time.time()
        _record(sample)
        if sample["error"] is None:
            self._fire(sample)

    def _read_stream(self, resp, sample: dict, t0: float, endpoint: str) -> None:
        last = None
        events_seen = 0
        done = False
        # chunk_size=None: hand over each chunk as it arrives, so token times are not batched.
        for line in resp.iter_lines(chunk_size=None):
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                break
            obj = json.loads(data)
            if "error" in obj:
                sample["error"] = f"stream error: {json.dumps(obj['error'])[:300]}"
                return
            now = time.perf_counter()
            if _token_text(obj, endpoint):
                events_seen += 1
                if last is None:
                    sample["ttft"] = now - t0
                else:
                    sample["itl"].append(now - last)
                last = now
            for choice in obj.get("choices") or []:
                if choice.get("finish_reason"):
                    sample["finish_reason"] = choice["finish_reason"]
            usage = obj.get("usage")
            if usage:
                sample["output_tokens"] = usage.get("completion_tokens") or 0
                sample["prompt_tokens"] = usage.get("prompt_tokens")
        sample["e2e"] = time.perf_counter() - t0
        if not done:
            sample["error"] = "stream ended without [DONE]"
        elif not sample["output_tokens"]:
            sample["output_tokens"] = events_seen  # server sent no usage: count token events
        if sample["ttft"] is None and not sample["error"]:
            sample["ttft"] = sample["e2e"]  # nothing generated (e.g. max_tokens hit at once)

    def _fire(self, s: dict) -> None:
        fire = self.environment.events.request.fire
        common = {"request_type": "SSE", "exception": None, "context": {}}
        fire(name="TTFT", response_time=s["ttft"] * 1000, response_length=0, **common)
        for gap in s["itl"]:
            fire(name="ITL", response_time=gap * 1000, response_length=0, **common)
        if s["output_tokens"] > 1:
            tpot = (s["e2e"] - s["ttft"]) / (s["output_tokens"] - 1)
            fire(name="TPOT", response_time=tpot * 1000, response_length=0, **common)
        fire(name="E2E", response_time=s["e2e"] * 1000, response_length=s["output_tokens"], **common)
