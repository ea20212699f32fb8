#!/usr/bin/env python3
"""
The cllama_tx benchmark.  Run it through C{bash bench/run}, which installs
nginx, wrk and the project's virtualenv first; this script assumes they exist.

What it does, in order:

  1. writes an nginx mock upstream into a temporary directory and starts it
     on a loopback port (core 1): C{POST /v1/chat/completions} answers a fixed
     OpenAI chat.completion with usage, C{POST /stream/v1/chat/completions}
     a fixed SSE stream ending with C{data: [DONE]}, C{POST
     /anthropic/v1/messages} a fixed Anthropic message (or, for
     C{Accept: text/event-stream}, a fixed Anthropic SSE stream);
  2. starts the real proxy from this work tree (C{python -m twisted cllama},
     core 0) with two agents (C{bench}, plain, and C{governed}, with a model
     policy, a budget and rate limits that never refuse during a run) and the
     openai, openrouter and anthropic providers pointed at the mock, waits
     for C{GET /health} and checks JSON and streamed requests, plain,
     governed and translated (chat -> messages);
  3. measures every lane twice, direct (client -> nginx) and through the
     proxy (client -> proxy -> nginx), back to back:
       - latency at one client (wrk -t1 -c1 --latency): p50, p99, added ms;
       - throughput at 32 clients (wrk -t1 -c32): requests/s and ratio;
       - streams: a raw-socket keep-alive client sends sequential
         C{"stream": true} requests and times the first SSE event and the
         whole stream;
       - governed: the latency and throughput lanes with the governed agent;
       - translated: the latency, throughput and stream lanes with model
         C{anthropic/claude-bench} on the chat surface (the proxy translates);
       - responses: the latency and throughput lanes on C{POST /v1/responses},
         native (the openai provider) and translated (an anthropic model);
     the governed and translated lanes run right after the plain proxy lane
     of their kind and are reported against it ("added vs plain");
     a lane with socket errors or non-2xx answers is reported as failed, and
     so is one whose requests the proxy audited with a status other than 200
     (or 499, cut off at a lane's end);
  3b. the reference workload lane (bench/reference.py, --no-reference skips
     it): the exact workload the Go reference and LiteLLM were measured on,
     its own nginx mock and a daemon started as the README says (twistd -n
     cllama), 3 rounds plain and governed, the targets of issue 21 beside
     the figures;
  4. prints the table, writes docs/PERFORMANCE.md (unless --no-doc or the
     proxy never answered) and bench/results/last.json;
  4a. with a 20 ms upstream (bench/slowmock.py, core 1, the xai provider):
     a sustained lane (wrk -c64) and a ramp of concurrent SSE streams
     (bench/streamload.py; --stream-levels, default 250,500,1000) with the
     proxy's RSS before, while and after; the targets (added p50/p99,
     req/s, streams, KiB per stream, idle RSS) met or not met go into the doc;
  5. with --profile, samples the proxy under the 32-client load with py-spy
     and lists the hot spots (--profile-lane plain|governed|translated).

bench/HISTORY.md is kept by hand: the run prints a ready-to-paste row;
C{--doc-only} rewrites docs/PERFORMANCE.md from bench/results/last.json
after it was edited.

Everything it starts is stopped on exit, also on Ctrl-C or SIGTERM.
Exit status: 0 all lanes clean, 1 a lane errored, 2 the proxy did not start
or did not answer correctly.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import litellm_lane  # bench/ is on sys.path: this script's own directory

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
DOC = REPO / "docs" / "PERFORMANCE.md"
VENV_PY = REPO / ".venv" / "bin" / "python"

PROXY_CORE = "0"
LOAD_CORE = "1"

AGENT = "bench"
SECRET = "5e" * 24  # 48 lowercase hex characters, like Clawdapus makes
TOKEN = f"{AGENT}:{SECRET}"
CHAT_MODEL = "openai/gpt-4o-mini"
STREAM_MODEL = "openrouter/x"
CHAT_BODY = json.dumps({"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}]})
STREAM_BODY = json.dumps(
    {"model": STREAM_MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
)
MOCK_ID = "chatcmpl-benchmock"

# The governed lanes: a second agent in the same context root whose metadata
# turns on every governance room (model policy, budget reservations, rate
# limits), with limits far above what a run can reach, so nothing is refused:
# the difference to the plain agent is the cost of governing a request.
GOV_AGENT = "governed"
GOV_SECRET = "a7" * 24
GOV_TOKEN = f"{GOV_AGENT}:{GOV_SECRET}"
GOV_METADATA = {
    "token": GOV_TOKEN,
    "pod": "bench",
    "model_policy": {
        "mode": "clamp",
        "allowed": [
            {"slot": "primary", "ref": CHAT_MODEL},
            {"slot": "fallback", "ref": "openai/gpt-4o"},
        ],
    },
    "budget": {"limit_usd": 1000000, "window": "24h", "behavior": "hard_stop"},
    "rate_limits": {"rpm": 100000000, "tpm": 10000000000},
}

# The translated lanes: an OpenAI chat request for an anthropic-format
# provider; the proxy translates chat -> messages, and the answer back.
ANTHROPIC_MODEL = "anthropic/claude-bench"
ANTHROPIC_MOCK_ID = "msg_benchmock"  # translated back to chatcmpl-benchmock
ANTHROPIC_TEXT = "Hello from the anthropic bench mock."
TRANSLATED_BODY = json.dumps({"model": ANTHROPIC_MODEL, "messages": [{"role": "user", "content": "hi"}]})
TRANSLATED_STREAM_BODY = json.dumps(
    {"model": ANTHROPIC_MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
)

# The Responses lanes: POST /v1/responses, passed through to the openai
# provider (the mock's /v1/responses), and translated for an anthropic one
# (Responses -> messages and back); reported against the chat lane.
RESPONSES_MODEL = "openai/gpt-4.1-mini"
RESPONSES_BODY = json.dumps({"model": RESPONSES_MODEL, "input": "hi"})
RESPONSES_TRANSLATED_MODEL = "anthropic/claude-bench-responses"
RESPONSES_TRANSLATED_BODY = json.dumps({"model": RESPONSES_TRANSLATED_MODEL, "input": "hi"})
RESPONSES_MOCK_ID = "resp_benchmock"

# The team's bar, measured on this kind of machine (one core for the proxy,
# wrk against an nginx mock): added ms per request and requests/s.
BAR = [
    ("reference Go proxy (cllama)", 0.39, 2180),
    ("LiteLLM", 17.0, 64),
    ("floor: naive Klein route + treq", 1.1, 1240),
    ("floor: Klein + raw Agent", 0.9, 1500),
    ("floor: twisted.web Resource + raw Agent", 0.68, 2000),
]
TARGET_ADDED_P50_MS = 1.0

# The slow-upstream lanes (bench/slowmock.py on the load core, reached by the
# proxy as the xai provider): sustained rate with a 20 ms upstream, and
# concurrent SSE streams (64 events 20 ms apart) ramped to 1,000 and more.
SLOW_MODEL = "xai/slow"
SLOW_BODY = json.dumps({"model": SLOW_MODEL, "messages": [{"role": "user", "content": "hi"}]})
SLOW_STREAM_BODY = json.dumps(
    {"model": SLOW_MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
)
SLOW_DELAY_MS = 20
SLOW_CHUNKS = 64
SLOW_GAP_MS = 20
SLOW_PORT = [0]
SLOW_LANES: list = []  # filled in by main() from the options
TARGETS = {"added_p50_ms": 1.0, "added_p99_ms": 3.0, "rps": 1500, "streams": 1000,
           "kib_per_stream": 64, "idle_rss_mib": 80}
PROFILE_RATE = 250  # py-spy samples per second


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes

_children: list[subprocess.Popen] = []


def start(cmd, **kw) -> subprocess.Popen:
    """Start C{cmd} in its own process group, remembered for cleanup."""
    p = subprocess.Popen(cmd, start_new_session=True, **kw)
    _children.append(p)
    return p


def stop(p: subprocess.Popen, grace: float = 5.0) -> None:
    """Stop one child we started (its process group, by id)."""
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
    else:
        # The leader is gone; make sure nothing it left in its group stays.
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if p in _children:
        _children.remove(p)


def stop_all() -> None:
    for p in reversed(list(_children)):
        stop(p)


def _on_signal(signum, frame):
    raise SystemExit(128 + signum)


# ---------------------------------------------------------------- helpers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned(core: str | None, cmd: list[str]) -> list[str]:
    return ["taskset", "-c", core, *cmd] if core is not None else cmd


def tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no file)"


def http(method: str, url: str, body: bytes | None = None, headers=None, timeout=10.0):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process C{pid}."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_stat() -> dict[str, tuple[float, float]]:
    """Per CPU: (busy seconds, steal seconds) since boot, from /proc/stat."""
    tck = os.sysconf("SC_CLK_TCK")
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *vals = line.split()
            v = [int(x) for x in vals] + [0] * 8
            user, nice, system, _idle, _iowait, irq, softirq, steal = v[:8]
            out[name] = ((user + nice + system + irq + softirq) / tck, steal / tck)
    return out


def wait_quiet(max_wait: float, threshold: float = 0.25, window: float = 2.0) -> tuple[float, bool]:
    """
    Wait (at most C{max_wait} s) until the machine is quiet: fewer than
    C{threshold} cores busy over a 2 s window.  Other people's test runs on
    a shared 2-core machine would otherwise be measured as proxy latency.
    """
    deadline = time.monotonic() + max_wait
    while True:
        s0 = cpu_stat()
        time.sleep(window)
        s1 = cpu_stat()
        busy = sum(s1[c][0] - s0[c][0] for c in s1 if c in s0) / window
        if busy < threshold:
            return busy, True
        if time.monotonic() >= deadline:
            return busy, False
        log(f"the machine is busy ({busy:.2f} cores in use by other processes); waiting for it to calm down")


NOISY_OTHERS_PCT = 10.0


def session_pids(sid: int) -> list[int]:
    """The processes of session C{sid} (nginx's master and workers)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:  # field 6 of stat: session id
                out.append(int(d.name))
    return out


def ours_on_load_core(nginx_pids: list[int]) -> float:
    """
    CPU seconds used so far by what runs on the load core: this script (the
    stream client), its waited-for children (wrk) and nginx.
    """
    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system
    for pid in nginx_pids:
        try:
            total += cpu_seconds(pid)
        except (OSError, IndexError, ValueError):
            pass
    return total
LANE_QUIET_WAIT = 20.0  # at most this long before each lane (1 s if quiet) ...


def cmd_output(cmd, **kw) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=20, **kw)
        return (r.stdout + r.stderr).strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"({e})"


# ---------------------------------------------------------------- the mock

def chat_completion() -> str:
    return json.dumps(
        {
            "id": MOCK_ID,
            "object": "chat.completion",
            "created": 1700000000,
            "model": "gpt-4o-mini-2024-07-18",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello from the bench mock."},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16},
            "system_fingerprint": "fp_bench",
        },
        separators=(",", ":"),
    )


def sse_stream() -> str:
    def chunk(delta, finish=None, usage=None, choices=True):
        doc = {
            "id": MOCK_ID,
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": "x",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if choices else [],
        }
        if usage is not None:
            doc["usage"] = usage
        return "data: " + json.dumps(doc, separators=(",", ":")) + "\n\n"

    parts = [chunk({"role": "assistant", "content": ""})]
    parts += [chunk({"content": w}) for w in ("Hello", " from", " the", " bench", " mock.")]
    parts.append(chunk({}, finish="stop"))
    parts.append(
        chunk(None, usage={"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}, choices=False)
    )
    parts.append("data: [DONE]\n\n")
    return "".join(parts)


def _testing():
    """The project's own builders of provider answers (cllama_tx/testing.py)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from cllama_tx import testing

    return testing


def anthropic_message_json() -> str:
    """A fixed Anthropic C{message}, built like the test suite's fakes."""
    t = _testing()
    doc = t.anthropic_message(ANTHROPIC_TEXT, "claude-bench", 9, 7, id=ANTHROPIC_MOCK_ID)
    return json.dumps(doc, separators=(",", ":"))


def anthropic_sse_stream() -> str:
    """A fixed Anthropic Messages SSE stream (message_start ... message_stop)."""
    t = _testing()
    events = t.anthropic_stream_events(
        ["Hello", " from", " the", " anthropic", " bench", " mock."], "claude-bench",
        input_tokens=9, output_tokens=6, id=ANTHROPIC_MOCK_ID,
    )
    return t.sse_encode_anthropic(events).decode("utf-8")


def responses_json() -> str:
    """A fixed Responses API C{response} object, built like the test suite's fakes."""
    doc = _testing().responses_response("Hello from the bench mock.", "gpt-4.1-mini", 9, 7, id=RESPONSES_MOCK_ID)
    return json.dumps(doc, separators=(",", ":"))


def nginx_quote(text: str) -> str:
    """C{text} as a single-quoted nginx string (no variables in it)."""
    if "$" in text:
        raise ValueError("nginx would expand '$' in a return body")
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def nginx_conf(tmp: Path, port: int) -> str:
    user = ""
    if os.geteuid() == 0:
        # As root the workers would switch to 'nobody'; keep them as us.
        user = "user root root;"
    for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp / "nginx" / d).mkdir(parents=True, exist_ok=True)
    n = tmp / "nginx"
    return f"""
{user}
worker_processes 1;
daemon off;
master_process on;
pid {n}/nginx.pid;
error_log {n}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {n}/body;
    proxy_temp_path {n}/proxy;
    fastcgi_temp_path {n}/fastcgi;
    uwsgi_temp_path {n}/uwsgi;
    scgi_temp_path {n}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    server_tokens off;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /v1/chat/completions {{
            default_type application/json;
            return 200 {nginx_quote(chat_completion())};
        }}
        location = /v1/responses {{
            default_type application/json;
            return 200 {nginx_quote(responses_json())};
        }}
        location = /stream/v1/chat/completions {{
            default_type text/event-stream;
            add_header Cache-Control no-cache;
            return 200 {nginx_quote(sse_stream())};
        }}
        # Anthropic Messages, JSON or (when the client asked for an event
        # stream: the proxy forwards the agent's Accept header) SSE.
        location = /anthropic/v1/messages {{
            if ($http_accept ~* "text/event-stream") {{
                rewrite ^ /anthropic-stream last;
            }}
            default_type application/json;
            return 200 {nginx_quote(anthropic_message_json())};
        }}
        location = /anthropic-stream {{
            internal;
            default_type text/event-stream;
            add_header Cache-Control no-cache;
            return 200 {nginx_quote(anthropic_sse_stream())};
        }}
        location / {{
            default_type application/json;
            return 404 '{{"error":{{"message":"not mocked","type":"not_found","code":"not_found"}}}}';
        }}
    }}
}}
"""


def nginx_binary() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def start_nginx(tmp: Path, port: int, core) -> subprocess.Popen:
    conf = tmp / "nginx.conf"
    conf.write_text(nginx_conf(tmp, port))
    prefix = str(tmp / "nginx") + "/"
    test = subprocess.run(
        [nginx_binary(), "-t", "-q", "-p", prefix, "-e", str(tmp / "nginx" / "error.log"), "-c", str(conf)],
        capture_output=True,
        text=True,
    )
    if test.returncode != 0:
        raise RuntimeError(f"nginx rejected its config:\n{test.stderr}")
    p = start(
        pinned(core, [nginx_binary(), "-p", prefix, "-e", str(tmp / "nginx" / "error.log"), "-c", str(conf)]),
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / "nginx" / "stderr.log", "wb"),
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise RuntimeError(f"nginx exited with {p.returncode}:\n{tail(tmp / 'nginx' / 'error.log')}")
        try:
            status, _, body = http("POST", f"http://127.0.0.1:{port}/v1/chat/completions", b"{}", timeout=1)
            if status == 200 and MOCK_ID.encode() in body:
                return p
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError("nginx did not answer within 10 s")


# ---------------------------------------------------------------- the proxy

def proxy_env(tmp: Path, api_port: int, ui_port: int, mock_port: int) -> dict:
    context = tmp / "context" / AGENT
    context.mkdir(parents=True, exist_ok=True)
    (context / "metadata.json").write_text(json.dumps({"token": TOKEN, "pod": "bench"}))
    governed = tmp / "context" / GOV_AGENT
    governed.mkdir(parents=True, exist_ok=True)
    (governed / "metadata.json").write_text(json.dumps(GOV_METADATA))
    (tmp / "auth").mkdir(exist_ok=True)
    env = {
        k: v
        for k, v in os.environ.items()
        # A developer's own provider settings must not leak into the run.
        if not re.match(r"^(OPENAI|ANTHROPIC|OPENROUTER|XAI|GEMINI|GOOGLE|OLLAMA|AI_GATEWAY)_", k)
        and not k.startswith(("CLAW_", "CLLAMA_"))
        and k not in ("LISTEN_ADDR", "UI_ADDR")
    }
    env.update(
        {
            "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "0",
            "LISTEN_ADDR": f"127.0.0.1:{api_port}",
            "UI_ADDR": f"127.0.0.1:{ui_port}",
            "CLAW_CONTEXT_ROOT": str(tmp / "context"),
            "CLAW_AUTH_DIR": str(tmp / "auth"),
            # A fresh ledger per run, not the user's ~/.local/state one: every
            # run starts from the same (empty) database and leaves nothing behind.
            "CLLAMA_STATE_DIR": str(tmp / "state"),
            "OPENAI_API_KEY": "sk-bench-not-real",
            "OPENAI_BASE_URL": f"http://127.0.0.1:{mock_port}/v1",
            "OPENROUTER_API_KEY": "sk-or-bench-not-real",
            "OPENROUTER_BASE_URL": f"http://127.0.0.1:{mock_port}/stream/v1",
            "ANTHROPIC_API_KEY": "sk-ant-bench-not-real",
            "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{mock_port}/anthropic/v1",
        }
    )
    if SLOW_PORT[0]:
        env.update({"XAI_API_KEY": "xai-bench-not-real", "XAI_BASE_URL": f"http://127.0.0.1:{SLOW_PORT[0]}/v1"})
    return env


def proxy_command() -> list[str]:
    # `python -m twisted` is Twisted's `twist` runner: foreground, no pid
    # file.  Its operational log defaults to stdout, which is the audit
    # stream, so it is sent to stderr.
    return [str(VENV_PY), "-m", "twisted", "--log-file=+", "--log-format=text", "cllama"]


class ProxyFailed(Exception):
    pass


def start_proxy(tmp: Path, env: dict, api_port: int, core, wait_s: float) -> subprocess.Popen:
    stderr_path = tmp / "proxy.log"
    p = start(
        pinned(core, proxy_command()),
        cwd=str(REPO),
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=open(tmp / "audit.jsonl", "wb"),
        stderr=open(stderr_path, "wb"),
    )
    deadline = time.monotonic() + wait_s
    last = "no answer"
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise ProxyFailed(
                f"the proxy exited with status {p.returncode} before answering /health; "
                f"its stderr ends with:\n{tail(stderr_path)}"
            )
        try:
            status, _, body = http("GET", f"http://127.0.0.1:{api_port}/health", timeout=1)
            if status == 200:
                return p
            last = f"status {status}: {body[:200]!r}"
        except OSError as e:
            last = str(e)
        time.sleep(0.1)
    raise ProxyFailed(
        f"GET /health did not answer 200 within {wait_s:.0f} s (last: {last}); "
        f"the proxy's stderr ends with:\n{tail(stderr_path)}"
    )


def verify_proxy(api_port: int, tmp: Path) -> None:
    """One JSON and one streamed request must come back from the mock."""
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    url = f"http://127.0.0.1:{api_port}/v1/chat/completions"
    try:
        status, _, body = http("POST", url, CHAT_BODY.encode(), headers)
    except OSError as e:
        raise ProxyFailed(f"POST /v1/chat/completions failed: {e}\n{tail(tmp / 'proxy.log')}") from None
    if status != 200 or MOCK_ID.encode() not in body:
        raise ProxyFailed(
            f"POST /v1/chat/completions ({CHAT_MODEL}) answered {status}: {body[:500]!r}\n"
            f"the proxy's stderr ends with:\n{tail(tmp / 'proxy.log')}"
        )
    r = stream_once(api_port, "/v1/chat/completions")
    if r["status"] != 200 or b"data: [DONE]" not in r["body"] or MOCK_ID.encode() not in r["body"]:
        raise ProxyFailed(
            f"streamed POST /v1/chat/completions ({STREAM_MODEL}) answered {r['status']}: "
            f"{r['body'][:500]!r}\nthe proxy's stderr ends with:\n{tail(tmp / 'proxy.log')}"
        )
    # The governed agent: same body, its own token; must be a plain 200.
    gov_headers = {"Authorization": f"Bearer {GOV_TOKEN}", "Content-Type": "application/json"}
    try:
        status, hdrs, body = http("POST", url, CHAT_BODY.encode(), gov_headers)
    except OSError as e:
        raise ProxyFailed(f"POST /v1/chat/completions as {GOV_AGENT!r} failed: {e}\n{tail(tmp / 'proxy.log')}") from None
    if status != 200 or MOCK_ID.encode() not in body:
        raise ProxyFailed(
            f"POST /v1/chat/completions as the governed agent ({GOV_AGENT}, {CHAT_MODEL}) answered "
            f"{status}: {body[:500]!r}\nthe proxy's stderr ends with:\n{tail(tmp / 'proxy.log')}"
        )
    # Translated: an OpenAI chat body for an anthropic model; the answer must
    # be a chat.completion made from the mock's Anthropic message.
    try:
        status, hdrs, body = http("POST", url, TRANSLATED_BODY.encode(), headers)
    except OSError as e:
        raise ProxyFailed(f"POST /v1/chat/completions ({ANTHROPIC_MODEL}) failed: {e}\n{tail(tmp / 'proxy.log')}") from None
    try:
        doc = json.loads(body)
        text = doc["choices"][0]["message"]["content"]
        kind = doc.get("object")
    except (ValueError, KeyError, IndexError, TypeError):
        text = kind = None
    if status != 200 or kind != "chat.completion" or text != ANTHROPIC_TEXT:
        raise ProxyFailed(
            f"translated POST /v1/chat/completions ({ANTHROPIC_MODEL}) answered {status}: {body[:500]!r}\n"
            f"the proxy's stderr ends with:\n{tail(tmp / 'proxy.log')}"
        )
    r = stream_once(api_port, "/v1/chat/completions", TRANSLATED_STREAM_BODY)
    if (r["status"] != 200 or b"data: [DONE]" not in r["body"] or b"chat.completion.chunk" not in r["body"]
            or b" anthropic" not in r["body"]):
        raise ProxyFailed(
            f"translated streamed POST /v1/chat/completions ({ANTHROPIC_MODEL}) answered {r['status']}: "
            f"{r['body'][:500]!r}\nthe proxy's stderr ends with:\n{tail(tmp / 'proxy.log')}"
        )


def verify_responses(api_port: int, tmp: Path) -> None:
    """The Responses surface, native and translated, must answer a response object."""
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    url = f"http://127.0.0.1:{api_port}/v1/responses"
    for body, expect in ((RESPONSES_BODY, RESPONSES_MOCK_ID.encode()), (RESPONSES_TRANSLATED_BODY, ANTHROPIC_TEXT.encode())):
        try:
            status, _, answer = http("POST", url, body.encode(), headers)
        except OSError as e:
            raise ProxyFailed(f"POST /v1/responses failed: {e}\n{tail(tmp / 'proxy.log')}") from None
        if status != 200 or expect not in answer or b'"object":"response"' not in answer.replace(b" ", b""):
            raise ProxyFailed(f"POST /v1/responses ({body}) answered {status}: {answer[:500]!r}\n"
                              f"the proxy's stderr ends with:\n{tail(tmp / 'proxy.log')}")


# ---------------------------------------------------------------- wrk lanes

WRK_LUA = """
wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {token}"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {{"requests":%.0f,"duration_us":%.0f,"bytes":%.0f,' ..
    '"connect":%.0f,"read":%.0f,"write":%.0f,"status":%.0f,"timeout":%.0f,' ..
    '"p50_us":%.0f,"p90_us":%.0f,"p99_us":%.0f,"max_us":%.0f,"mean_us":%.1f}}\\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
"""


def lua_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_lua(tmp: Path, name: str = "chat", body: str = CHAT_BODY, token: str = TOKEN) -> Path:
    path = tmp / f"{name}.lua"
    path.write_text(WRK_LUA.format(body=lua_string(body), token=token))
    return path


def run_wrk(url: str, lua: Path, connections: int, duration: float, core, pid=None, latency=True) -> dict:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--timeout", "5s", "-s", str(lua)]
    if latency:
        cmd.append("--latency")
    cmd.append(url)
    cpu0 = cpu_seconds(pid) if pid else None
    p = start(pinned(core, cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = p.communicate(timeout=duration + 30)
    finally:
        stop(p)
    cpu1 = cpu_seconds(pid) if pid else None
    m = re.search(r"^BENCHJSON (\{.*\})$", out, re.M)
    if p.returncode != 0 or m is None:
        return {"ok": False, "error": f"wrk failed (status {p.returncode}): {out.strip()[-500:]}", "raw": out}
    r = json.loads(m.group(1))
    r["raw"] = out
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6) if r["duration_us"] else 0.0
    errors = {k: r[k] for k in ("connect", "read", "write", "status", "timeout") if r[k]}
    r["errors"] = errors
    r["ok"] = not errors and r["requests"] > 0
    if not r["ok"]:
        r["error"] = (
            "no request completed" if not r["requests"] else
            "errors: " + ", ".join(f"{k}={v}" for k, v in errors.items())
            + (" (status = non-2xx/3xx answers)" if "status" in errors else "")
        )
    if pid:
        r["cpu_s"] = cpu1 - cpu0
        r["cpu_us_per_req"] = (cpu1 - cpu0) * 1e6 / r["requests"] if r["requests"] else None
    return r


# ---------------------------------------------------------------- stream client

def _request_bytes(port: int, path: str, body: str, token: str = TOKEN) -> bytes:
    b = body.encode()
    return (
        f"POST {path} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {token}\r\n"
        "Content-Type: application/json\r\n"
        "Accept: text/event-stream\r\n"
        f"Content-Length: {len(b)}\r\n\r\n"
    ).encode() + b


class StreamConn:
    """One keep-alive HTTP/1.1 connection that times streamed answers."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.port = port
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def _recv(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("connection closed by the server")
        return data

    def request(self, path: str, body: str) -> dict:
        req = _request_bytes(self.port, path, body)
        perf = time.perf_counter
        t0 = perf()
        self.sock.sendall(req)
        first_byte = first_event = None
        # headers
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._recv()
            if first_byte is None:
                first_byte = perf()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            headers[k.strip().lower()] = v.strip()
        chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        length = int(headers[b"content-length"]) if b"content-length" in headers else None
        close = headers.get(b"connection", b"").lower() == b"close"
        body_out = bytearray()

        def got(data: bytes) -> None:
            nonlocal first_event
            body_out.extend(data)
            if first_event is None and b"data:" in body_out:
                first_event = perf()

        if chunked:
            while True:
                while b"\r\n" not in self.buf:
                    self.buf += self._recv()
                size_line, self.buf = self.buf.split(b"\r\n", 1)
                size = int(size_line.split(b";")[0], 16)
                while len(self.buf) < size + 2:
                    self.buf += self._recv()
                got(self.buf[:size])
                self.buf = self.buf[size + 2:]
                if size == 0:
                    break
        elif length is not None:
            while len(self.buf) < length:
                if first_event is None and b"data:" in self.buf:
                    first_event = perf()
                self.buf += self._recv()
            got(self.buf[:length])
            self.buf = self.buf[length:]
        else:
            close = True
            try:
                while True:
                    self.buf += self._recv()
            except ConnectionError:
                pass
            got(self.buf)
            self.buf = b""
        done = perf()
        return {
            "status": status,
            "body": bytes(body_out),
            "first_byte": first_byte - t0,
            "first_event": (first_event or done) - t0,
            "done": done - t0,
            "close": close,
        }


def stream_once(port: int, path: str, body: str = STREAM_BODY) -> dict:
    c = StreamConn(port)
    try:
        return c.request(path, body)
    finally:
        c.close()


def run_stream_lane(port: int, path: str, duration: float, max_requests: int = 1000000,
                    body: str = STREAM_BODY) -> dict:
    firsts, events, dones = [], [], []
    errors: collections.Counter = collections.Counter()
    conn = None
    deadline = time.monotonic() + duration
    n = 0
    while time.monotonic() < deadline and n < max_requests:
        n += 1
        try:
            if conn is None:
                conn = StreamConn(port)
            r = conn.request(path, body)
        except (OSError, ValueError, IndexError) as e:
            errors[type(e).__name__] += 1
            if conn is not None:
                conn.close()
                conn = None
            continue
        if r["status"] != 200 or b"data: [DONE]" not in r["body"]:
            errors[f"status {r['status']}" if r["status"] != 200 else "no [DONE]"] += 1
        else:
            firsts.append(r["first_byte"])
            events.append(r["first_event"])
            dones.append(r["done"])
        if r["close"]:
            conn.close()
            conn = None
    if conn is not None:
        conn.close()

    def pct(xs, q):
        if not xs:
            return None
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] * 1000

    ok = not errors and bool(events)
    out = {
        "ok": ok,
        "requests": len(events),
        "errors": dict(errors),
        "first_byte_p50_ms": pct(firsts, 50),
        "first_event_p50_ms": pct(events, 50),
        "first_event_p99_ms": pct(events, 99),
        "done_p50_ms": pct(dones, 50),
        "done_p99_ms": pct(dones, 99),
    }
    if not ok:
        out["error"] = (
            "errors: " + ", ".join(f"{k}={v}" for k, v in errors.items()) if errors else "no request completed"
        )
    return out


# ---------------------------------------------------------------- profile

def profile_proxy(pid: int, url: str, lua: Path, duration: float, core, tmp: Path) -> dict:
    """Sample the proxy with py-spy under the 32-client load."""
    pyspy = REPO / ".venv" / "bin" / "py-spy"
    if not pyspy.exists():
        return {"error": "py-spy is not installed (bash bench/run --profile installs it)"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {}
    for fmt, dest in (("raw", tmp / "profile.txt"), ("flamegraph", RESULTS / "profile.svg")):
        cmd = [str(pyspy), "record", "--pid", str(pid), "--nonblocking", "--rate", str(PROFILE_RATE),
               "--duration", str(max(1, round(duration))), "--format", fmt, "--output", str(dest)]
        if fmt == "raw":
            cmd.append("--nolineno")
        spy = start(pinned(core, cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(0.5)
        load = run_wrk(url, lua, 32, duration, core, pid=pid, latency=False)
        try:
            spy_out, _ = spy.communicate(timeout=duration + 30)
        finally:
            stop(spy)
        if spy.returncode != 0 or not dest.exists():
            return {"error": f"py-spy failed (status {spy.returncode}): {spy_out.strip()[-800:]}"}
        out[f"load_{fmt}"] = {k: load.get(k) for k in ("ok", "rps", "error", "cpu_us_per_req")}
    shutil.copy(tmp / "profile.txt", RESULTS / "profile.txt")
    out.update(summarise_profile(tmp / "profile.txt"))
    out["svg"] = str(RESULTS / "profile.svg")
    return out


def _short(frame: str) -> str:
    # py-spy frames: "function (path/to/file.py)"
    m = re.match(r"^(.*) \((.*)\)$", frame)
    if not m:
        return frame
    func, path = m.groups()
    for marker in ("site-packages/", str(REPO) + "/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{func} ({path})"


# Frames on (nearly) every stack: the runner, the reactor loop, its dispatch.
PLUMBING = re.compile(
    r"<frozen runpy>|twisted/__main__|Twist\.|Runner\.|ReactorBase\.(run|mainLoop)|doPoll|"
    r"callWithLogger|callWithContext|_doReadOrWrite|<module>"
)


def summarise_profile(path: Path, top: int = 20) -> dict:
    self_c: collections.Counter = collections.Counter()
    by_file: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    ours_self: collections.Counter = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if f]
        # the first frame is the thread/process label
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += n
        self_c[_short(frames[-1])] += n
        leaf = _short(frames[-1])
        by_file[leaf[leaf.rfind("(") + 1:-1] if leaf.endswith(")") else leaf] += n
        for f in set(_short(f) for f in frames):
            if not PLUMBING.search(f):
                incl[f] += n
        # attribute the sample to the innermost frame of our own code
        for f in reversed(frames):
            if "cllama_tx" in f:
                ours_self[_short(f)] += n
                break
        else:
            ours_self["(outside cllama_tx: reactor, twisted.web, wire)"] += n
    def share(c):
        return [(f, n, 100.0 * n / total) for f, n in c.most_common(top)] if total else []
    return {
        "samples": total,
        "self": share(self_c),
        "by_file": share(by_file),
        "inclusive": share(incl),
        "own_code": share(ours_self),
    }


# ---------------------------------------------------------------- report

def machine_facts() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    facts = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "kernel": platform.release(),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else [],
        "python": cmd_output([str(VENV_PY), "-c", "import sys; print(sys.version.split()[0])"]),
        "twisted": cmd_output([str(VENV_PY), "-c", "import twisted; print(twisted.__version__)"]),
        "nginx": cmd_output([nginx_binary(), "-v"]).replace("nginx version: ", "").replace("nginx/", ""),
        "wrk": (re.findall(r"wrk \S*?(\d[\w.+~-]*)", cmd_output(["wrk", "-v"])) or ["?"])[0],
        "commit": cmd_output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
        # The proxy's own code differs from the commit (bench/ and docs/ do not count).
        "dirty": bool(cmd_output(["git", "-C", str(REPO), "status", "--porcelain", "--", "cllama_tx", "twisted", "setup.py"])),
    }
    return facts


def fmt(x, digits=3):
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def noisy_status(lanes) -> str:
    """C{ok}, or C{ok, noisy (...)} naming the worst share other processes took."""
    worst = None
    for lane in lanes:
        if lane is None or not lane.get("noisy"):
            continue
        for core in ("core0", "core1"):
            if core in lane and (worst is None or lane[core]["others_pct"] > worst[0]):
                worst = (lane[core]["others_pct"], core[-1])
    if worst is None:
        return "ok"
    return f"ok, noisy (other processes took {worst[0]:.0f}% of core {worst[1]})"


def build_rows(res: dict) -> list[list[str]]:
    rows = []

    def status(*lanes):
        bad = [line.get("error", "failed") for line in lanes if line is not None and not line.get("ok")]
        missing = any(line is None for line in lanes)
        if bad:
            return "FAILED: " + "; ".join(bad)
        if missing:
            return "proxy not run"
        return noisy_status(lanes)

    ld, lp = res.get("latency_direct"), res.get("latency_proxy")
    for q in ("p50", "p99"):
        d = ld[f"{q}_us"] / 1000 if ld and ld.get("ok") else None
        p = lp[f"{q}_us"] / 1000 if lp and lp.get("ok") else None
        rows.append([
            "latency, 1 client (wrk -c1)", f"{q} ms", fmt(d), fmt(p),
            f"+{fmt(p - d)} ms" if d is not None and p is not None else "–",
            status(ld, lp),
        ])
    td, tp = res.get("throughput_direct"), res.get("throughput_proxy")
    d = td["rps"] if td and td.get("ok") else None
    p = tp["rps"] if tp and tp.get("ok") else None
    rows.append([
        "throughput, 32 clients (wrk -c32)", "req/s", fmt(d, 0), fmt(p, 0),
        f"{p / d:.3f}× of direct" if d and p is not None else "–", status(td, tp),
    ])
    if tp and tp.get("ok") and tp.get("cpu_us_per_req") is not None:
        rows.append([
            "proxy CPU per request at 32 clients", "µs", "–", fmt(tp["cpu_us_per_req"], 0),
            f"core 0 busy {100 * tp['cpu_s'] / (tp['duration_us'] / 1e6):.0f}%", "ok",
        ])
    sd, sp = res.get("stream_direct"), res.get("stream_proxy")
    for key, label in (("first_event_p50_ms", "first SSE event p50 ms"),
                       ("first_event_p99_ms", "first SSE event p99 ms"),
                       ("done_p50_ms", "whole stream p50 ms")):
        d = sd[key] if sd and sd.get("ok") else None
        p = sp[key] if sp and sp.get("ok") else None
        rows.append([
            "streams, 1 client, sequential", label, fmt(d), fmt(p),
            f"+{fmt(p - d)} ms" if d is not None and p is not None else "–", status(sd, sp),
        ])
    if res.get("litellm"):
        cells = litellm_lane.column(res)
        for row in rows:
            row.insert(5, cells.get(row[1], "–"))
    return rows


def main_header(res: dict) -> tuple[str, ...]:
    """The main table's columns: a LiteLLM one when this run measured (or tried) it."""
    base = ("lane", "metric", "direct", "proxy", "added / ratio", "status")
    return base[:5] + ("LiteLLM (same run)",) + base[5:] if res.get("litellm") else base


def build_extra_rows(res: dict) -> list[list[str]]:
    """
    The governed and translated lanes against the plain proxy lanes of the
    same run: "added" is this lane minus the plain proxy lane.
    """
    rows = []

    def ok(lane):
        return lane is not None and lane.get("ok")

    def status(lane, plain):
        if lane is None:
            return "not run"
        if not lane.get("ok"):
            return "FAILED: " + lane.get("error", "failed")
        if plain is None or not plain.get("ok"):
            return "plain proxy lane failed: no comparison"
        return noisy_status((lane, plain))

    for kind, label in (("governed", f"governed (agent `{GOV_AGENT}`: policy, budget, rate limits)"),
                        ("translated", f"translated chat → messages (`{ANTHROPIC_MODEL}`)"),
                        ("responses", f"Responses API, native (`POST /v1/responses`, `{RESPONSES_MODEL}`)"),
                        ("responses_translated", f"Responses API → messages (`{RESPONSES_TRANSLATED_MODEL}`)"),
                        ("control", "control: the plain lane again, last (noise band)")):
        lp, lx = res.get("latency_proxy"), res.get(f"latency_{kind}")
        if lx is None and res.get(f"throughput_{kind}") is None:
            continue
        for q in ("p50", "p99"):
            p = lp[f"{q}_us"] / 1000 if ok(lp) else None
            x = lx[f"{q}_us"] / 1000 if ok(lx) else None
            rows.append([
                f"{label}, 1 client", f"{q} ms", fmt(p), fmt(x),
                f"{x - p:+.3f} ms" if p is not None and x is not None else "–", status(lx, lp),
            ])
        tp, tx = res.get("throughput_proxy"), res.get(f"throughput_{kind}")
        p = tp["rps"] if ok(tp) else None
        x = tx["rps"] if ok(tx) else None
        rows.append([
            f"{label}, 32 clients", "req/s", fmt(p, 0), fmt(x, 0),
            f"{x / p:.3f}× of plain ({100 * (x / p - 1):+.1f}%)" if p and x is not None else "–", status(tx, tp),
        ])
        pc = tp.get("cpu_us_per_req") if ok(tp) else None
        xc = tx.get("cpu_us_per_req") if ok(tx) else None
        if pc is not None and xc is not None:
            rows.append([f"{label}, 32 clients", "proxy CPU µs/request", fmt(pc, 0), fmt(xc, 0),
                         f"{xc - pc:+.0f} µs", "ok"])
    sp, sx = res.get("stream_proxy"), res.get("stream_translated")
    if sx is not None:
        for key, label in (("first_event_p50_ms", "first SSE event p50 ms"),
                           ("first_event_p99_ms", "first SSE event p99 ms"),
                           ("done_p50_ms", "whole stream p50 ms"),
                           ("done_p99_ms", "whole stream p99 ms")):
            p = sp[key] if ok(sp) else None
            x = sx[key] if ok(sx) else None
            rows.append([
                "translated stream (Anthropic SSE → chat chunks), 1 client, sequential", label, fmt(p), fmt(x),
                f"{x - p:+.3f} ms" if p is not None and x is not None else "–", status(sx, sp),
            ])
    return rows


EXTRA_HEADER = ("lane", "metric", "plain proxy", "this lane", "added vs plain (same run)", "status")


def history_row(res: dict, facts: dict) -> str:
    """A ready-to-paste row for bench/HISTORY.md (kept by hand)."""
    def get(name, key, scale=1.0):
        r = res.get(name)
        return r[key] * scale if r and r.get("ok") and r.get(key) is not None else None

    ld, lp = get("latency_direct", "p50_us", 1e-3), get("latency_proxy", "p50_us", 1e-3)
    lg, lt = get("latency_governed", "p50_us", 1e-3), get("latency_translated", "p50_us", 1e-3)
    tp, tg, tt = get("throughput_proxy", "rps"), get("throughput_governed", "rps"), get("throughput_translated", "rps")
    sd, sp = get("stream_direct", "first_event_p50_ms"), get("stream_proxy", "first_event_p50_ms")

    def diff(a, b):
        return f"{a - b:+.3f}" if a is not None and b is not None else "–"

    def rps(x):
        return f"{x:,.0f}" if x is not None else "–"

    return (f"| {facts['date'].replace(' UTC', '')} | WHAT CHANGED (commit {facts['commit']}) | "
            f"{diff(lp, ld).lstrip('+')} | {rps(tp)} | {diff(sp, sd).lstrip('+')} | "
            f"{diff(lg, lp)} / {rps(tg)} | {diff(lt, lp)} / {rps(tt)} |")


def table(rows, header=("lane", "metric", "direct", "proxy", "added / ratio", "status")) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def counts_line(res: dict) -> str:
    parts = []
    for name in LANES:
        r = res.get(name)
        if r is not None:
            parts.append(f"{name.replace('_', ' ')}: {r.get('requests', 0):.0f}")
    return "; ".join(parts)


def noise_line(res: dict) -> str:
    parts = []
    for name in LANES:
        r = res.get(name)
        if r and "core0" in r and not name.endswith("_direct"):
            c = r["core0"]
            text = (f"{name.replace('_', ' ')}: proxy {c['proxy_pct']:.0f}%, others {c['others_pct']:.0f}%, "
                    f"steal {c['steal_pct']:.0f}%")
            if "core1" in r:
                text += f" (core 1: others {r['core1']['others_pct']:.0f}%)"
            if r.get("attempts", 1) > 1:
                text += ", measured twice (the first try was noisy)"
            parts.append(text)
    busy = res.get("busy_at_start")
    start = f"cores busy with other work just before the run: {busy:.2f}. " if busy is not None else ""
    return start + ("Core 0 during the proxy lanes: " + "; ".join(parts) + "." if parts else "")


def audit_line(res: dict) -> str:
    a = res.get("audit")
    if not a:
        return ""
    types = ", ".join(f"{k} {v}" for k, v in sorted(a["types"].items(), key=lambda kv: -kv[1]))
    codes = ", ".join(f"{k}: {v}" for k, v in sorted(a["status_codes"].items()))
    out = (
        f"The proxy's own audit stream over the whole run (warm-up and profile included): {types}; "
        f"status codes {codes}. A 499 is a request still in flight when wrk stopped at the end "
        "of a lane (wrk does not count those)."
    )
    by_lane = a.get("by_lane") or {}
    if by_lane:
        parts = []
        for who in sorted(by_lane):
            codes = ", ".join(f"{k}: {v}" for k, v in sorted(by_lane[who].items()))
            inter = (a.get("interventions") or {}).get(who)
            inter = "; interventions " + ", ".join(f"{k} {v}" for k, v in sorted(inter.items())) if inter else ""
            parts.append(f"{who}: {codes}{inter}")
        out += " By requests: " + "; ".join(parts) + "."
    return out


def audit_lane(doc: dict) -> str:
    """Which kind of bench request an audit line belongs to."""
    agent, model = doc.get("claw_id"), doc.get("model")
    if agent == GOV_AGENT:
        return "governed"
    if agent == AGENT and isinstance(model, str) and model.startswith("xai/"):
        return "slow"
    if agent == AGENT and model == ANTHROPIC_MODEL:
        return "translated"
    if agent == AGENT and model in (RESPONSES_MODEL, RESPONSES_TRANSLATED_MODEL):
        return "responses"
    if agent == AGENT:
        return "plain"
    return f"other ({agent})"


AUDIT_LANES = {
    "plain": ("latency_proxy", "throughput_proxy", "stream_proxy", "latency_control", "throughput_control"),
    "governed": ("latency_governed", "throughput_governed"),
    "translated": ("latency_translated", "throughput_translated", "stream_translated"),
    "responses": ("latency_responses", "latency_responses_translated", "throughput_responses",
                  "throughput_responses_translated"),
    "slow": SLOW_LANES,
}


def check_audit(res: dict) -> None:
    """
    Every answer the proxy audited must be a 200 (or a 499: a request wrk cut
    off at the end of a lane).  wrk only counts 4xx/5xx as errors and the
    stream client checks its own answers, so this is the second, independent
    check; a lane whose requests got anything else is marked FAILED.
    """
    by_lane = (res.get("audit") or {}).get("by_lane") or {}
    for who, lanes in AUDIT_LANES.items():
        bad = {k: v for k, v in (by_lane.get(who) or {}).items() if k not in ("200", "499")}
        if not bad:
            continue
        why = f"the proxy audited {who} answers with status " + ", ".join(f"{k} ×{v}" for k, v in sorted(bad.items()))
        for name in lanes:
            r = res.get(name)
            if r is not None and r.get("ok"):
                r["ok"] = False
                r["error"] = why
        log(f"FAILED: {why}")


def verdict(res: dict) -> tuple[str, float | None]:
    ld, lp = res.get("latency_direct"), res.get("latency_proxy")
    if not (ld and lp and ld.get("ok") and lp.get("ok")):
        return "not measured (a latency lane failed or the proxy did not run)", None
    added = (lp["p50_us"] - ld["p50_us"]) / 1000
    if added < TARGET_ADDED_P50_MS:
        return f"**met**: the proxy adds {added:.3f} ms at p50 (target: under {TARGET_ADDED_P50_MS:g} ms).", added
    return (
        f"**missed**: the proxy adds {added:.3f} ms at p50; the target is under "
        f"{TARGET_ADDED_P50_MS:g} ms.", added
    )


def bar_table(res: dict, added) -> str:
    rows = [[name, f"{ms:g}", f"{rps:,}"] for name, ms, rps in BAR]
    tp = res.get("throughput_proxy")
    rps = f"{tp['rps']:,.0f}" if tp and tp.get("ok") else "–"
    rows.append(["**cllama_tx, this run**", fmt(added), rps])
    litellm_row = litellm_lane.bar_row(res)
    if litellm_row:
        rows.append(litellm_row)
    return table(rows, ("proxy", "added ms (p50, 1 client)", "req/s (32 clients)"))


def profile_md(prof: dict) -> str:
    if not prof:
        return ""
    if "error" in prof:
        return f"\n## Profile\n\nThe profile was requested but failed: {prof['error']}\n"
    lines = [
        "\n## Profile (`--profile`)\n",
        f"py-spy sampled the proxy at {PROFILE_RATE} Hz (`--nonblocking`, idle samples excluded) under the "
        f"32-client load of {prof.get('lane', 'plain')} requests (`--profile-lane`): {prof['samples']} samples. Flame graph: `bench/results/profile.svg` "
        "(not committed).\n",
        "Where the busy time goes, by the innermost frame of cllama_tx code on the stack:\n",
        table([[f"`{f}`", str(n), f"{s:.1f}%"] for f, n, s in prof["own_code"][:12]],
              ("innermost cllama_tx frame", "samples", "share")),
        "\nSelf time by file:\n",
        table([[f"`{f}`", str(n), f"{s:.1f}%"] for f, n, s in prof["by_file"][:12]],
              ("file", "samples", "share")),
        "\nSelf time (the frame actually running):\n",
        table([[f"`{f}`", str(n), f"{s:.1f}%"] for f, n, s in prof["self"][:15]],
              ("function (file)", "samples", "share")),
        "\nInclusive time (on the stack):\n",
        table([[f"`{f}`", str(n), f"{s:.1f}%"] for f, n, s in prof["inclusive"][:20]],
              ("function (file)", "samples", "share")),
        "",
    ]
    return "\n".join(lines)


def extra_md(rows, res: dict) -> str:
    if not rows:
        return ""
    return (
        "## Governance and translation (same run)\n\n"
        "The governed and translated lanes against the plain proxy lanes above, same proxy "
        "process, measured right after them: *added* is the cost of governing (model policy, "
        "budget reservation and settlement, rate limits) or of translating one request, "
        "beyond plain proxying. The control rows repeat the plain lane after the others: "
        "differences of that size are noise.\n\n"
        + table(rows, EXTRA_HEADER)
    )


def analysis_md() -> str:
    """Where the time goes, and what was done about it: kept by hand in bench/ANALYSIS.md."""
    path = REPO / "bench" / "ANALYSIS.md"
    return "\n" + path.read_text() if path.exists() else ""


def history_md() -> str:
    """Earlier runs worth comparing against, kept by hand in bench/HISTORY.md."""
    path = REPO / "bench" / "HISTORY.md"
    return "\n" + path.read_text() if path.exists() else ""


def capacity_md() -> str:
    """
    The capacity lanes' section (bench/capacity.py, run first by `bash bench/run`;
    '' if never run), then their analysis, kept by hand in bench/CAPACITY.md.
    """
    try:
        import capacity  # bench/capacity.py

        tables = capacity.report(json.loads((RESULTS / "capacity.json").read_text()))
    except (OSError, ValueError, KeyError):
        return ""
    path = HERE / "CAPACITY.md"
    return tables + ("\n" + path.read_text() if path.exists() else "")


def add_slow_lanes(res: dict) -> None:
    """Make the slow-upstream lanes of C{res} known to LANES (also for --doc-only)."""
    levels = res.get("stream_levels") or []
    for name in ["sustained_direct", "sustained_proxy"] + [f"streams{n}_{side}" for n in levels
                                                           for side in ("direct", "proxy")]:
        if name not in LANES and (name in res or "sustained" in name):
            LANES.append(name)


def _reference_md(res: dict) -> str:
    if not res.get("reference"):
        return ""
    import reference

    return reference.doc_md(res["reference"])


def write_doc(res: dict, facts: dict) -> str:
    add_slow_lanes(res)
    rows = build_rows(res)
    extra_rows = build_extra_rows(res)
    duration = res.get("duration", 10.0)
    warmup = res.get("warmup", 3.0)
    command = res.get("command") or " ".join(["bash bench/run", *sys.argv[1:]])
    v, added = verdict(res)
    failed = [k for k in LANES if res.get(k) is not None and not res[k].get("ok")]
    cores = (
        "the proxy pinned to core 0 (`taskset -c 0`); nginx, wrk and the stream client on core 1"
        if res.get("pinned") else
        "no core pinning (fewer than 2 usable cores)"
    )
    doc = f"""# Performance

Measured by `{command}` (see `bench/bench.py`); this file is
overwritten by each run of `bash bench/run`.
Numbers from a shared, noisy 2-core machine: compare runs on the same machine, and
read the direct column as the noise floor of the run.

## Last run

- Date: {facts['date']}; commit {facts['commit']}{' (with uncommitted changes)' if facts['dirty'] else ''}
- Machine: {facts['nproc']} cores ({facts['cpu']}), Linux {facts['kernel']}, load average at start {' '.join(facts['loadavg'])}
- Python {facts['python']}, Twisted {facts['twisted']}, nginx {facts['nginx']}, wrk {facts['wrk']}
- Result: {v}
{"- **Lanes that failed: " + ", ".join(failed) + "** (their figures are left out, not reported as fast)" if failed else ""}

{table(rows, main_header(res))}

{litellm_lane.summary(res)}

{_reference_md(res)}

Requests measured per lane: {counts_line(res)}.

Noise: {noise_line(res)} Before the run, and again before each lane (at most
{LANE_QUIET_WAIT:g} s a lane), the script waits for other processes to leave the cores idle. A proxy lane
where other processes still took more than {NOISY_OTHERS_PCT:g}% of core 0 (the proxy's) or of core 1
(wrk, nginx and the stream client; other processes there starve the load) is measured once more,
and marked noisy if it still was: its figures are pessimistic. Waiting and re-measuring share
one budget (`--quiet-wait`, {res.get("quiet_wait", 60):g} s).

{extra_md(extra_rows, res)}

{slow_md(res)}

{capacity_md()}

{audit_line(res)}

## The bar

Figures measured by the team on this kind of machine, same method (one core for the
proxy, wrk against an nginx mock). Target for cllama_tx: added p50 under
{TARGET_ADDED_P50_MS:g} ms.

{bar_table(res, added)}
{analysis_md()}
{history_md()}
## Method

- Mock upstream: nginx ({facts['nginx']}), one worker, config written to a temporary directory
  and run as the current user (`-p`, `-c`, `daemon off`), answering
  `POST /v1/chat/completions` with a fixed `chat.completion` JSON body (with `usage`) and
  `POST /stream/v1/chat/completions` with a fixed `text/event-stream` body (7 `data:` chunks,
  a usage chunk, `data: [DONE]`), and `POST /anthropic/v1/messages` with a fixed Anthropic
  `message` (with `usage`; built by `cllama_tx.testing.anthropic_message`), or, when the
  request's `Accept` asks for `text/event-stream`, a fixed Anthropic SSE stream
  (`message_start` … `message_stop`, 6 text deltas; `anthropic_stream_events`).
  Keep-alive without a request limit.
- Proxy: this work tree, `.venv/bin/python -m twisted --log-file=+ cllama` with
  `PYTHONPATH` at the repository, `OPENAI_BASE_URL` pointing at the mock's `/v1`,
  `OPENROUTER_BASE_URL` at its `/stream/v1` and `ANTHROPIC_BASE_URL` at its
  `/anthropic/v1`; the ledger in a fresh temporary `CLLAMA_STATE_DIR`; audit stream
  (stdout) to a file, operational log (stderr) to a file. Two agents in one context root:
  `{AGENT}` (token only: no policy, no budget, no rate limits; the plain lanes) and
  `{GOV_AGENT}` (the governed lanes), whose `metadata.json` adds
  `model_policy` `{json.dumps(GOV_METADATA["model_policy"], separators=(", ", ": "))}`,
  `budget` `{json.dumps(GOV_METADATA["budget"], separators=(", ", ": "))}` and
  `rate_limits` `{json.dumps(GOV_METADATA["rate_limits"], separators=(", ", ": "))}`:
  every governance room runs (policy decision, rate-limit check and settle, budget worst-case
  reservation and settle against both candidates' prices) but none can refuse during a run.
- Cores: {cores}.
- Each lane runs direct (client → nginx) and then through the proxy (client → proxy →
  nginx), {duration:g} s each, after a {warmup:g} s warm-up of the proxy (and 1 s of each
  governed and translated kind) that is not counted. The governed and translated lanes run
  right after the plain proxy lane of the same kind, in the same run against the same proxy
  process; their "added" is the lane minus the plain proxy lane.
  - latency: `wrk -t1 -c1 --latency` POSTing `{CHAT_BODY}` with the agent's bearer token;
    added = proxy minus direct.
  - throughput: `wrk -t1 -c32`; the direct figure is the mock's own ceiling (wrk and nginx
    sharing core 1). Proxy CPU per request comes from `/proc/<pid>/stat` over the lane.
  - streams: a raw-socket keep-alive client sends sequential `"stream": true` requests
    (model `{STREAM_MODEL}`) and times the first `data:` byte and the end of the stream.
  - governed: the same wrk lanes (same body, model `{CHAT_MODEL}`, the policy's primary, so
    no intervention) with the `{GOV_AGENT}` agent's token.
  - control: the plain wrk lane once more after the governed and translated ones; its
    "added vs plain" is the drift between two identical lanes of the run, i.e. how large a
    governed or translated difference must be to mean something.
  - translated: the same wrk lanes POSTing `{TRANSLATED_BODY}` to `/v1/chat/completions`
    with the `{AGENT}` token: the proxy translates chat → messages (adding `max_tokens`
    4096), sends it to the Anthropic location with `x-api-key`, and translates the Anthropic
    `message` back to a `chat.completion`; the translated stream lane does the same with
    `"stream": true` (Anthropic SSE → chat chunks and `data: [DONE]`), timed by the stream
    client against the plain stream lane (which relays OpenAI-format chunks). The model
    `claude-bench` has no price, so these requests skip the cost computation the plain ones
    do (under 1 % of the proxy's samples in a profile).
  - responses: the same wrk lanes POSTing `{RESPONSES_BODY}` to `/v1/responses` (passed
    through to the mock's `/v1/responses`, a fixed `response` object, metered from its
    `usage`) and `{RESPONSES_TRANSLATED_BODY}` (Responses → messages, the Anthropic
    `message` back to a `response`), against the plain chat lane of the same run.
- A lane with socket errors, timeouts or non-2xx answers is marked FAILED and its figures
  are not shown; so is a lane whose requests the proxy's own audit stream shows answered
  with anything but 200 (or 499, a request cut off at the end of a lane).
{profile_md(res.get("profile") or {})}"""
    return re.sub(r"\n{3,}", "\n\n", doc)


LANES = ["latency_direct", "latency_proxy", "latency_governed", "latency_translated", "latency_control",
         "latency_responses", "latency_responses_translated",
         "throughput_direct", "throughput_proxy", "throughput_governed", "throughput_translated",
         "throughput_control", "throughput_responses", "throughput_responses_translated",
         "stream_direct", "stream_proxy", "stream_translated"]


# ---------------------------------------------------------------- slow upstream

def rss_kib(pid: int) -> int | None:
    """VmRSS of process C{pid} in KiB (from /proc/<pid>/status)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def slow_lanes(args, res, lane, tmp, slow_port, api_port, proxy, load_core) -> None:
    """Sustained rate (wrk -c64, 20 ms upstream) and the concurrent-stream ramp."""
    import streamload  # bench/streamload.py

    slow_lua = write_lua(tmp, "slow", SLOW_BODY, TOKEN)
    direct = f"http://127.0.0.1:{slow_port}/v1/chat/completions"
    through = f"http://127.0.0.1:{api_port}/v1/chat/completions"
    d = args.sustained_duration
    if proxy:
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        try:
            status, _, body = http("POST", through, SLOW_BODY.encode(), headers)
        except OSError as e:
            status, body = None, str(e).encode()
        if status != 200 or MOCK_ID.encode() not in body:
            log(f"slow lanes: the proxy answered {status} for {SLOW_MODEL}: {body[:300]!r}; skipping the proxy side")
            proxy = None
        else:
            run_wrk(through, slow_lua, 64, min(2.0, max(1.0, args.warmup)), load_core, latency=False)
    lane("sustained_direct", lambda: run_wrk(direct, slow_lua, 64, d, load_core))
    if proxy:
        lane("sustained_proxy", lambda: run_wrk(through, slow_lua, 64, d, load_core, pid=proxy.pid))

    levels = res.get("stream_levels") or []
    hold = args.stream_hold
    if proxy:
        time.sleep(1.0)
        res["rss_idle_kib"] = rss_kib(proxy.pid)
    for n in levels:
        lane(f"streams{n}_direct", lambda n=n: streamload.run(
            slow_port, "/v1/chat/completions", SLOW_STREAM_BODY, TOKEN, n, hold, expect=SLOW_CHUNKS + 1))
        if proxy:
            def one(n=n):
                time.sleep(1.0)  # let the last step's connections close
                before = rss_kib(proxy.pid)
                r = streamload.run(api_port, "/v1/chat/completions", SLOW_STREAM_BODY, TOKEN, n, hold,
                                   expect=SLOW_CHUNKS + 1, sample=lambda: rss_kib(proxy.pid))
                time.sleep(1.0)
                r["rss_before_kib"], r["rss_while_kib"], r["rss_after_kib"] = before, r.pop("sample"), rss_kib(proxy.pid)
                if before and r["rss_while_kib"] and r.get("active_at_sample"):
                    r["kib_per_stream"] = (r["rss_while_kib"] - before) / r["active_at_sample"]
                return r
            lane(f"streams{n}_proxy", one)
    if proxy:
        time.sleep(1.0)
        res["rss_end_kib"] = rss_kib(proxy.pid)


def _ms(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}"


def slow_md(res: dict) -> str:
    """The slow-upstream tables and the targets, as Markdown ('' if not run)."""
    sd, sp = res.get("sustained_direct"), res.get("sustained_proxy")
    levels = res.get("stream_levels") or []
    if not sd and not any(res.get(f"streams{n}_direct") for n in levels):
        return ""
    out = ["## Slow upstream: sustained rate and concurrent streams\n",
           f"Upstream: `bench/slowmock.py` (asyncio, core 1, as the `xai` provider, model `{SLOW_MODEL}`): "
           f"JSON answers {SLOW_DELAY_MS} ms after the request; streams of {SLOW_CHUNKS} SSE events "
           f"{SLOW_GAP_MS} ms apart plus `data: [DONE]` (about {SLOW_CHUNKS * SLOW_GAP_MS / 1000:.2f} s a stream); "
           "each stream keeps the phase it started with (a 1 ms ticker serves one slot of the gap at a time), "
           "so the events of a thousand streams are spread over the gap, as real providers' are.\n"]
    rows = []

    def ok(r):
        return r is not None and r.get("ok")

    if sd:
        rd = f"{sd['rps']:.0f}" if ok(sd) else "FAILED"
        rp = f"{sp['rps']:.0f}" if ok(sp) else ("FAILED" if sp else "-")
        rows.append(["sustained (wrk -c64)", "req/s", rd, rp,
                     f"{sp['rps'] / sd['rps']:.2f}x" if ok(sd) and ok(sp) and sd["rps"] else "-"])
        for q in ("p50", "p99"):
            a = sd.get(f"{q}_us") if ok(sd) else None
            b = sp.get(f"{q}_us") if ok(sp) else None
            rows.append(["sustained (wrk -c64)", f"latency {q} ms", _ms(a / 1e3 if a else None),
                         _ms(b / 1e3 if b else None), f"+{(b - a) / 1e3:.2f} ms" if a and b else "-"])
    for n in levels:
        d, p = res.get(f"streams{n}_direct"), res.get(f"streams{n}_proxy")
        label = f"{n} concurrent streams"
        def held(r, n=n):
            if r is None:
                return "-"
            return (f"{r.get('active_at_sample', 0)}/{n} open, {r.get('completed', 0)} done, "
                    f"ramp {r.get('ramp_s', 0):.1f} s"
                    + ("" if r.get("ok") else " FAILED"))
        rows.append([label, "held mid-hold / streams completed", held(d), held(p), "yes" if p and p.get("held") else "no"])
        for key, name in (("ttfb", "time to first event"), ("gap", "inter-event gap")):
            for q in ("p50", "p99"):
                a = d.get(f"{key}_{q}_ms") if d else None
                b = p.get(f"{key}_{q}_ms") if p else None
                rows.append([label, f"{name} {q} ms", _ms(a), _ms(b), f"{b - a:+.2f} ms" if a is not None and b is not None else "-"])
        if p and p.get("rss_while_kib"):
            rows.append([label, "proxy RSS before / while / after MiB", "",
                         f"{p['rss_before_kib'] / 1024:.1f} / {p['rss_while_kib'] / 1024:.1f} / {p['rss_after_kib'] / 1024:.1f}",
                         f"{p['kib_per_stream']:.1f} KiB/stream" if p.get("kib_per_stream") is not None else "-"])
    out.append(table(rows, ("lane", "metric", "direct", "proxy", "added / ratio")))
    out.append("")
    out.append(f"Each step opens N keep-alive connections in batches of 50 (the ramp), then holds "
               f"{res.get('stream_hold', 4):g} s, each connection sending streaming requests back to back; "
               "\"open\" counts connections with a stream in flight mid-hold, \"done\" every stream that "
               "ended with `data: [DONE]` (including those during the ramp). ")
    out.append("Time to first event is from sending the request to the first complete SSE event; the "
               "gaps are between consecutive events of one stream (several events in one read count as "
               "0 ms gaps). Memory per stream = (RSS mid-hold − RSS before the step) / streams open "
               "mid-hold. Direct figures include the mock's and the client's own delays (both on core 1).")
    out.append("")
    out.append("## Targets\n")
    out.append(targets_md(res))
    return "\n".join(out) + "\n"


def targets(res: dict) -> list[list[str]]:
    t = TARGETS
    rows = []
    ld, lp = res.get("latency_direct"), res.get("latency_proxy")
    sd, sp = res.get("sustained_direct"), res.get("sustained_proxy")

    def okr(r):
        return r is not None and r.get("ok")

    def row(what, target, value, met):
        rows.append([what, target, value, "-" if met is None else ("met" if met else "**not met**")])

    for q, key in (("p50", "added_p50_ms"), ("p99", "added_p99_ms")):
        if okr(ld) and okr(lp):
            a = (lp[f"{q}_us"] - ld[f"{q}_us"]) / 1e3
            row(f"added {q}, 1 client (nginx upstream)", f"≤ {t[key]:g} ms", f"{a:.2f} ms", a <= t[key])
        if okr(sd) and okr(sp):
            a = (sp[f"{q}_us"] - sd[f"{q}_us"]) / 1e3
            row(f"added {q}, 64 clients (20 ms upstream)", f"≤ {t[key]:g} ms", f"{a:.2f} ms", a <= t[key])
    tp = res.get("throughput_proxy")
    if okr(tp):
        row("req/s, 32 clients (nginx upstream)", f"≥ {t['rps']:,}", f"{tp['rps']:.0f}", tp["rps"] >= t["rps"])
    if okr(sp):
        row("req/s, 64 clients (20 ms upstream)", f"≥ {t['rps']:,}", f"{sp['rps']:.0f}"
            + (f" (mock ceiling {sd['rps']:.0f})" if okr(sd) else ""), sp["rps"] >= t["rps"])
    held = [n for n in res.get("stream_levels") or [] if (res.get(f"streams{n}_proxy") or {}).get("held")]
    tried = [n for n in res.get("stream_levels") or [] if res.get(f"streams{n}_proxy")]
    if tried:
        best = max(held) if held else 0
        row("concurrent streams held through the proxy", f"≥ {t['streams']:,}",
            f"{best:,} (tried {', '.join(map(str, tried))})", best >= t["streams"])
        top = res.get(f"streams{max(tried)}_proxy") or {}
        k = top.get("kib_per_stream")
        if k is not None:
            row(f"memory per open stream (at {max(tried):,})", f"≤ {t['kib_per_stream']} KiB", f"{k:.1f} KiB",
                k <= t["kib_per_stream"])
    idle = res.get("rss_idle_kib") or res.get("rss_start_kib")
    if idle:
        row("idle RSS (proxy after warm-up, before the stream ramp)" if res.get("rss_idle_kib") else
            "idle RSS (proxy at start)", f"≤ {t['idle_rss_mib']} MiB", f"{idle / 1024:.1f} MiB",
            idle / 1024 <= t["idle_rss_mib"])
    if res.get("rss_end_kib"):
        row("RSS after the ramp (for reference)", "", f"{res['rss_end_kib'] / 1024:.1f} MiB", None)
    return rows


def targets_md(res: dict) -> str:
    rows = targets(res)
    if not rows:
        return "(no figures)"
    missed = [r[0] for r in rows if "not met" in r[3]]
    return (table(rows, ("target", "bar", "this run", "status")) + "\n\n"
            + ("Missed: " + "; ".join(missed) + "." if missed else "All targets met."))


# ---------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bash bench/run", description="Benchmark cllama_tx against an nginx mock upstream.")
    ap.add_argument("--duration", type=float, default=float(os.environ.get("BENCH_DURATION", "10")),
                    help="seconds per lane and side [env BENCH_DURATION, default 10]")
    ap.add_argument("--warmup", type=float, default=float(os.environ.get("BENCH_WARMUP", "3")),
                    help="seconds of unmeasured load on the proxy before the lanes [env BENCH_WARMUP, default 3]")
    ap.add_argument("--profile", action="store_true",
                    help="afterwards, sample the proxy under 32-client load with py-spy and list the hot spots")
    ap.add_argument("--profile-lane", choices=("plain", "governed", "translated"), default="plain",
                    help="which requests --profile loads the proxy with [default plain]")
    ap.add_argument("--plain-only", action="store_true",
                    help="skip the governed and translated lanes (the run before they existed)")
    ap.add_argument("--doc-only", action="store_true",
                    help="measure nothing: rewrite docs/PERFORMANCE.md from bench/results/last.json "
                         "(e.g. after adding a row to bench/HISTORY.md by hand)")
    ap.add_argument("--no-doc", action="store_true", help="do not overwrite docs/PERFORMANCE.md")
    ap.add_argument("--direct-only", action="store_true", help="measure the mock alone (checks the harness)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, audit stream)")
    ap.add_argument("--quiet-wait", type=float, default=float(os.environ.get("BENCH_QUIET_WAIT", "60")),
                    help="seconds per run to spend waiting for other processes to leave the cores idle "
                         "(before the run, and up to 20 s before each lane) and re-measuring noisy lanes "
                         "[env BENCH_QUIET_WAIT, default 60; 0 = do not wait]")
    ap.add_argument("--sustained-duration", type=float,
                    default=float(os.environ.get("BENCH_SUSTAINED_DURATION", "10")),
                    help="seconds per side of the sustained lane (wrk -c64, 20 ms upstream) "
                         "[env BENCH_SUSTAINED_DURATION, default 10]")
    ap.add_argument("--stream-levels", default=os.environ.get("BENCH_STREAM_LEVELS", "250,500,1000"),
                    help="concurrent streaming clients per step of the ramp, comma-separated "
                         "[env BENCH_STREAM_LEVELS, default 250,500,1000]")
    ap.add_argument("--stream-hold", type=float, default=float(os.environ.get("BENCH_STREAM_HOLD", "4")),
                    help="seconds each step holds its streams open after the ramp "
                         "[env BENCH_STREAM_HOLD, default 4]")
    ap.add_argument("--no-litellm", action="store_true", default=os.environ.get("BENCH_LITELLM") == "0",
                    help="skip the LiteLLM column (LiteLLM's proxy, installed once into bench/.litellm-venv, "
                         "measured by the latency and throughput lanes) [env BENCH_LITELLM=0]")
    ap.add_argument("--no-reference", action="store_true",
                    help="skip the reference workload lane (bench/reference.py: the Go reference's own "
                         "workload, 3 rounds, plain and governed)")
    ap.add_argument("--no-slow", action="store_true",
                    help="skip the slow-upstream lanes (sustained rate and concurrent streams)")
    ap.add_argument("--start-timeout", type=float, default=30.0, help="seconds to wait for /health [default 30]")
    args = ap.parse_args(argv)

    if args.doc_only:
        try:
            last = json.loads((RESULTS / "last.json").read_text())
        except (OSError, ValueError) as e:
            log(f"--doc-only needs bench/results/last.json from an earlier run: {e}")
            return 2
        if last.get("proxy_error") or last["results"].get("command") is None:
            log("bench/results/last.json is not from a complete run with the proxy; measure first")
            return 2
        DOC.write_text(write_doc(last["results"], last["facts"]))
        print(f"Wrote {DOC.relative_to(REPO)} from bench/results/last.json ({last['facts']['date']})")
        return 0

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    atexit.register(stop_all)

    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            log(f"{tool} is missing: run this through `bash bench/run`, which installs it")
            return 3
    if not Path(nginx_binary()).exists():
        log("nginx is missing: run this through `bash bench/run`, which installs it")
        return 3

    usable = sorted(os.sched_getaffinity(0))
    pin = len(usable) >= 2 and 0 in usable and 1 in usable
    proxy_core = PROXY_CORE if pin else None
    load_core = LOAD_CORE if pin else None
    if pin:
        os.sched_setaffinity(0, {1})  # this script (the stream client) stays off the proxy's core
    else:
        log("fewer than 2 usable cores: running without core pinning")

    levels = [int(x) for x in str(args.stream_levels).split(",") if x.strip()]
    if not args.no_slow:
        SLOW_LANES[:] = ["sustained_proxy"] + [f"streams{n}_proxy" for n in levels]
        LANES.extend(["sustained_direct", "sustained_proxy"]
                     + [f"streams{n}_{side}" for n in levels for side in ("direct", "proxy")])
    res: dict = {"pinned": pin, "stream_levels": levels, "stream_hold": args.stream_hold,
                 "sustained_duration": args.sustained_duration, "duration": args.duration, "warmup": args.warmup, "quiet_wait": args.quiet_wait,
                 "command": " ".join(["bash bench/run", *(argv if argv is not None else sys.argv[1:])])}
    # Waiting for quiet cores (before the run and before each lane) and
    # re-measuring noisy lanes share one budget: --quiet-wait seconds per run.
    budget_left = [args.quiet_wait]
    if args.quiet_wait > 0:
        w0 = time.monotonic()
        busy, quiet = wait_quiet(args.quiet_wait)
        budget_left[0] -= max(0.0, time.monotonic() - w0 - 2.0)  # the first 2 s sample is free
        res["busy_at_start"] = busy
        if not quiet:
            log(f"the machine is still busy ({busy:.2f} cores in use by others): measuring anyway, "
                "figures will be marked noisy")
    tmp = Path(tempfile.mkdtemp(prefix="cllama-bench-"))
    facts = machine_facts()
    proxy_error = None
    proxy = None
    try:
        mock_port, api_port, ui_port = free_port(), free_port(), free_port()
        log(f"temporary directory {tmp}")
        nginx = start_nginx(tmp, mock_port, load_core)
        nginx_pids = session_pids(nginx.pid)
        slow_port = None
        slow = None
        if not args.no_slow:
            slow_port = SLOW_PORT[0] = free_port()
            slow = start(pinned(load_core, [str(VENV_PY), str(HERE / "slowmock.py"), str(slow_port),
                                            "--delay-ms", str(SLOW_DELAY_MS), "--chunks", str(SLOW_CHUNKS),
                                            "--gap-ms", str(SLOW_GAP_MS)]),
                         stdin=subprocess.DEVNULL, stdout=open(tmp / "slowmock.log", "wb"),
                         stderr=subprocess.STDOUT)
            nginx_pids = nginx_pids + [slow.pid]
            t_end = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", slow_port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > t_end or slow.poll() is not None:
                        raise RuntimeError(f"the slow mock did not start:\n{tail(tmp / 'slowmock.log')}") from None
                    time.sleep(0.1)
            log(f"slow mock (bench/slowmock.py) on 127.0.0.1:{slow_port}")
        log(f"nginx mock on 127.0.0.1:{mock_port}")
        lua = write_lua(tmp)
        gov_lua = write_lua(tmp, "governed", CHAT_BODY, GOV_TOKEN)
        tr_lua = write_lua(tmp, "translated", TRANSLATED_BODY, TOKEN)
        rs_lua = write_lua(tmp, "responses", RESPONSES_BODY, TOKEN)
        rt_lua = write_lua(tmp, "responses_translated", RESPONSES_TRANSLATED_BODY, TOKEN)
        responses = f"http://127.0.0.1:{api_port}/v1/responses"
        direct = f"http://127.0.0.1:{mock_port}/v1/chat/completions"
        through = f"http://127.0.0.1:{api_port}/v1/chat/completions"

        if not args.direct_only:
            try:
                proxy = start_proxy(tmp, proxy_env(tmp, api_port, ui_port, mock_port), api_port,
                                    proxy_core, args.start_timeout)
                log(f"proxy pid {proxy.pid} on 127.0.0.1:{api_port}: /health answered 200")
                res["rss_start_kib"] = rss_kib(proxy.pid)
                verify_proxy(api_port, tmp)
                verify_responses(api_port, tmp)
                log("proxy verified: JSON and streamed requests came back from the mock, plain, "
                    "governed and translated")
                if args.warmup > 0:
                    run_wrk(through, lua, 4, args.warmup, load_core, latency=False)
                    run_stream_lane(api_port, "/v1/chat/completions", min(1.0, args.warmup))
                    if not args.plain_only:
                        short = min(1.0, args.warmup)
                        run_wrk(through, gov_lua, 4, short, load_core, latency=False)
                        run_wrk(through, tr_lua, 4, short, load_core, latency=False)
                        run_wrk(responses, rs_lua, 4, short, load_core, latency=False)
                        run_wrk(responses, rt_lua, 4, short, load_core, latency=False)
                        run_stream_lane(api_port, "/v1/chat/completions", short, body=TRANSLATED_STREAM_BODY)
            except ProxyFailed as e:
                proxy_error = str(e)
                log(f"PROXY FAILED: {proxy_error}")
                if proxy is not None:
                    stop(proxy)
                    proxy = None

        def measure(name, fn, pid=None):
            # pid: the process under test (default: cllama_tx while it runs).
            if pid is None and proxy is not None and proxy.poll() is None:
                pid = proxy.pid
            t0, s0 = time.monotonic(), cpu_stat()
            p0 = cpu_seconds(pid) if pid else 0.0
            o0 = ours_on_load_core(nginx_pids)
            r = fn()
            wall, s1 = time.monotonic() - t0, cpu_stat()
            try:
                p1 = cpu_seconds(pid) if pid else p0
            except OSError:  # it exited during the lane
                p1 = p0
            o1 = ours_on_load_core(nginx_pids)
            if pin and "cpu0" in s0 and "cpu0" in s1:
                busy0 = s1["cpu0"][0] - s0["cpu0"][0]
                r["core0"] = {
                    "proxy_pct": 100 * (p1 - p0) / wall,
                    "others_pct": 100 * max(0.0, busy0 - (p1 - p0)) / wall,
                    "steal_pct": 100 * (s1["cpu0"][1] - s0["cpu0"][1]) / wall,
                }
                noisy = [f"core 0: other processes {r['core0']['others_pct']:.0f}%, "
                         f"steal {r['core0']['steal_pct']:.0f}%"]
                others = r["core0"]["others_pct"] > NOISY_OTHERS_PCT or r["core0"]["steal_pct"] > 5
                if "cpu1" in s0 and "cpu1" in s1:
                    # Core 1 is the load generator's (wrk, nginx, the stream
                    # client): others there slow the load and, at 32 clients,
                    # lower the proxy's batching, so they count too.
                    busy1 = s1["cpu1"][0] - s0["cpu1"][0]
                    r["core1"] = {
                        "ours_pct": 100 * (o1 - o0) / wall,
                        "others_pct": 100 * max(0.0, busy1 - (o1 - o0)) / wall,
                        "steal_pct": 100 * (s1["cpu1"][1] - s0["cpu1"][1]) / wall,
                    }
                    noisy.append(f"core 1: other processes {r['core1']['others_pct']:.0f}%, "
                                 f"steal {r['core1']['steal_pct']:.0f}%")
                    others = others or r["core1"]["others_pct"] > NOISY_OTHERS_PCT or r["core1"]["steal_pct"] > 5
                # What others do matters only while the proxy is measured.
                r["noisy"] = not name.endswith("_direct") and others
                if r["noisy"]:
                    log(f"lane {name}: the cores were shared: " + "; ".join(noisy))
            return r

        def lane(name, fn, pid=None):
            waited = None
            attempts = 0
            while True:
                attempts += 1
                if args.quiet_wait > 0 and budget_left[0] > 0:
                    # Other people's work may start mid-run: before each lane,
                    # wait (a little) for the cores to be idle again, so that
                    # lanes compared with each other saw the same quiet machine.
                    w0 = time.monotonic()
                    busy, quiet = wait_quiet(min(budget_left[0], LANE_QUIET_WAIT), window=1.0)
                    waited = {"busy": busy, "quiet": quiet, "waited_s": time.monotonic() - w0}
                    budget_left[0] -= max(0.0, waited["waited_s"] - 1.0)  # the 1 s sample is free
                log(f"lane {name} ({args.duration:g} s)" + (" again: the last try was noisy" if attempts > 1 else ""))
                r = measure(name, fn, pid)
                # A noisy proxy lane is measured once more while the budget
                # for waiting lasts; the second figures are kept either way.
                if not (r.get("noisy") and r.get("ok") and attempts == 1 and budget_left[0] >= args.duration):
                    break
                budget_left[0] -= args.duration
            r["attempts"] = attempts
            if waited is not None:
                r["quiet_before"] = waited
            res[name] = r
            if "raw" in r:
                RESULTS.mkdir(parents=True, exist_ok=True)
                (RESULTS / f"wrk-{name}.txt").write_text(r["raw"])
            if not r.get("ok"):
                log(f"lane {name} FAILED: {r.get('error')}")
            return r

        # Each group: direct, the plain proxy, then the governed and the
        # translated variants right after it, so "added by governance" and
        # "added by translation" compare lanes of the same run minutes apart.
        extra = proxy is not None and not args.plain_only
        lane("latency_direct", lambda: run_wrk(direct, lua, 1, args.duration, load_core))
        if proxy:
            lane("latency_proxy", lambda: run_wrk(through, lua, 1, args.duration, load_core, pid=proxy.pid))
        if extra:
            lane("latency_governed", lambda: run_wrk(through, gov_lua, 1, args.duration, load_core, pid=proxy.pid))
            lane("latency_translated", lambda: run_wrk(through, tr_lua, 1, args.duration, load_core, pid=proxy.pid))
            lane("latency_responses", lambda: run_wrk(responses, rs_lua, 1, args.duration, load_core, pid=proxy.pid))
            lane("latency_responses_translated",
                 lambda: run_wrk(responses, rt_lua, 1, args.duration, load_core, pid=proxy.pid))
            # The plain lane again: how far two identical lanes drift apart
            # (the noise band of the "added vs plain" figures).
            lane("latency_control", lambda: run_wrk(through, lua, 1, args.duration, load_core, pid=proxy.pid))
        lane("throughput_direct", lambda: run_wrk(direct, lua, 32, args.duration, load_core))
        if proxy:
            lane("throughput_proxy", lambda: run_wrk(through, lua, 32, args.duration, load_core, pid=proxy.pid))
        if extra:
            lane("throughput_governed",
                 lambda: run_wrk(through, gov_lua, 32, args.duration, load_core, pid=proxy.pid))
            lane("throughput_translated",
                 lambda: run_wrk(through, tr_lua, 32, args.duration, load_core, pid=proxy.pid))
            lane("throughput_responses",
                 lambda: run_wrk(responses, rs_lua, 32, args.duration, load_core, pid=proxy.pid))
            lane("throughput_responses_translated",
                 lambda: run_wrk(responses, rt_lua, 32, args.duration, load_core, pid=proxy.pid))
            lane("throughput_control", lambda: run_wrk(through, lua, 32, args.duration, load_core, pid=proxy.pid))
        lane("stream_direct", lambda: run_stream_lane(mock_port, "/stream/v1/chat/completions", args.duration))
        if proxy:
            lane("stream_proxy", lambda: run_stream_lane(api_port, "/v1/chat/completions", args.duration))
        if extra:
            lane("stream_translated", lambda: run_stream_lane(api_port, "/v1/chat/completions", args.duration,
                                                              body=TRANSLATED_STREAM_BODY))

        if slow_port:
            slow_lanes(args, res, lane, tmp, slow_port, api_port, proxy, load_core)

        if proxy and proxy.poll() is not None:
            proxy_error = f"the proxy exited with status {proxy.returncode} during the run:\n{tail(tmp / 'proxy.log')}"
        if proxy and args.profile:
            prof_lua = {"plain": lua, "governed": gov_lua, "translated": tr_lua}[args.profile_lane]
            log(f"profiling the proxy ({args.profile_lane} requests) with py-spy "
                f"({args.duration:g} s raw + {args.duration:g} s flame graph)")
            res["profile"] = profile_proxy(proxy.pid, through, prof_lua, args.duration, load_core, tmp)
            res["profile"]["lane"] = args.profile_lane
        if proxy:
            # The proxy's own view: audit lines by type, and anything it logged as an error.
            kinds: collections.Counter = collections.Counter()
            statuses: collections.Counter = collections.Counter()
            by_lane: dict = collections.defaultdict(collections.Counter)
            interventions: dict = collections.defaultdict(collections.Counter)
            stop(proxy)  # flushes the audit stream
            with open(tmp / "audit.jsonl", errors="replace") as f:
                for line in f:
                    try:
                        doc = json.loads(line)
                    except ValueError:
                        kinds["(not JSON)"] += 1
                        continue
                    kinds[doc.get("type")] += 1
                    who = audit_lane(doc)
                    if doc.get("status_code") is not None:
                        statuses[doc["status_code"]] += 1
                        by_lane[who][str(doc["status_code"])] += 1
                    if doc.get("type") == "intervention":
                        name = doc.get("intervention")
                        if isinstance(name, dict):
                            name = name.get("name") or name.get("type") or json.dumps(name, sort_keys=True)[:80]
                        interventions[who][str(name)] += 1
            res["audit"] = {
                "types": dict(kinds),
                "status_codes": {str(k): v for k, v in statuses.items()},
                "by_lane": {k: dict(v) for k, v in by_lane.items()},
                "interventions": {k: dict(v) for k, v in interventions.items()},
            }
            check_audit(res)
            res["proxy_log_tail"] = tail(tmp / "proxy.log", 15)
        if not args.no_reference and not args.direct_only and not proxy_error:
            # The reference workload (issue 21), with its own mock and daemon
            # (twistd -n cllama), once the lanes above are done.
            import reference

            # The slow mock's 1 ms ticker shares the load core with wrk and the
            # reference's nginx: held stopped meanwhile (it took a core's share).
            if slow is not None:
                slow.send_signal(signal.SIGSTOP)
            try:
                res["reference"] = reference.lane(args.duration, quiet_wait=min(5.0, args.quiet_wait))
            finally:
                if slow is not None:
                    slow.send_signal(signal.SIGCONT)
        if not args.no_litellm and not args.direct_only:
            # Last, with cllama_tx stopped: LiteLLM's proxy gets core 0 to
            # itself, behind the same nginx mock, measured by the same lanes.
            res.update(litellm_lane.run(sys.modules[__name__], tmp, mock_port, proxy_core, load_core,
                                        args.duration, args.warmup, lane=lane, log=log))
    except RuntimeError as e:
        log(f"harness error: {e}")
        stop_all()
        return 2
    finally:
        stop_all()
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    rows = build_rows(res)
    print()
    print(table(rows, main_header(res)))
    if res.get("litellm"):
        print(litellm_lane.summary(res))
    extra_rows = build_extra_rows(res)
    if extra_rows:
        print()
        print(table(extra_rows, EXTRA_HEADER))
    print()
    v, added = verdict(res)
    print("Result: " + v.replace("**", ""))
    if res.get("reference"):
        import reference

        print()
        print(reference.doc_md(res["reference"]).replace("**", ""))
    if slow_md(res):
        print()
        print(slow_md(res).replace("**", ""))
    print("Requests per lane: " + counts_line(res))
    print("Noise: " + noise_line(res))
    if "audit" in res:
        print(f"Proxy audit lines by type: {res['audit']['types']}; status codes: {res['audit']['status_codes']}")
        print(f"  by requests: {res['audit'].get('by_lane')}; interventions: {res['audit'].get('interventions')}")
    prof = res.get("profile")
    if prof:
        if "error" in prof:
            print(f"\nProfile failed: {prof['error']}")
        else:
            print(f"\nProfile ({prof.get('lane', 'plain')} requests): {prof['samples']} samples; "
                  f"flame graph {prof['svg']}; load: {prof.get('load_raw')}")
            print("innermost cllama_tx frame:")
            for f, _, s in prof["own_code"][:12]:
                print(f"  {s:5.1f}%  {f}")
            print("self time by file:")
            for f, _, s in prof["by_file"][:12]:
                print(f"  {s:5.1f}%  {f}")
            print("self time:")
            for f, _, s in prof["self"][:15]:
                print(f"  {s:5.1f}%  {f}")
            print("inclusive:")
            for f, _, s in prof["inclusive"][:20]:
                print(f"  {s:5.1f}%  {f}")

    RESULTS.mkdir(parents=True, exist_ok=True)
    slim = {k: ({kk: vv for kk, vv in v.items() if kk != "raw"} if isinstance(v, dict) else v) for k, v in res.items()}
    (RESULTS / "last.json").write_text(json.dumps({"facts": facts, "results": slim, "proxy_error": proxy_error}, indent=2, default=str))

    if proxy_error:
        print(f"\nPROXY FAILED: {proxy_error}")
        print("docs/PERFORMANCE.md was left as it was.")
        return 2
    if args.direct_only:
        print("\n--direct-only: docs/PERFORMANCE.md was left as it was.")
    elif not args.no_doc:
        DOC.parent.mkdir(parents=True, exist_ok=True)
        DOC.write_text(write_doc(res, facts))
        print(f"\nWrote {DOC.relative_to(REPO)}")
    if not args.direct_only and res.get("latency_proxy"):
        print("\nbench/HISTORY.md is kept by hand. To record this run there, append this row to its table")
        print("(replace WHAT CHANGED; then `bash bench/run --doc-only` puts it into docs/PERFORMANCE.md):")
        print(history_row(res, facts))
    failed = [k for k in LANES if res.get(k) is not None and not res[k].get("ok")]
    if failed:
        print(f"FAILED lanes: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
