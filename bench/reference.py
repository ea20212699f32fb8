#!/usr/bin/env python3
"""
The reference workload: the lanes the Go reference proxy (cllama) and LiteLLM
were measured on, exactly, so a run here compares with that table.

    .venv/bin/python bench/reference.py [--rounds 3] [--duration 10]
        [--variant NAME[@TREE][:ENV=VALUE,...]]... [--governed] [--profile VARIANT]

Workload: C{POST /v1/chat/completions} with L{BODY} (model
C{openai/gpt-4o-mini}, a system and a user message, temperature 0) answered
by nginx with a fixed 606-byte C{chat.completion} (usage with
C{prompt_tokens_details} and C{completion_tokens_details}); for streams
(C{"stream": true}, C{Accept: text/event-stream}) a fixed 3,432-byte,
12-event SSE body that nginx sends in one write.  The daemon is started as
the README says (C{twistd -n cllama}), ledger on, no governance (agent
C{bench}); C{--governed} adds the governed agent's lanes (policy, budget
reservation, rate limit).

Layout: the proxy on core 0, nginx, wrk and the stream client on core 1.
Each round measures, back to back: 1 client (C{wrk -c1}: p50, p99) direct
and through every variant, then 32 clients (C{wrk -c32}: requests/s, the
proxy's CPU per request from C{/proc}), then the SSE first byte with a new
connection per request.  "Added" is proxy minus direct of the same round;
the figures are medians over the rounds.  Idle RSS is read once the daemon
answered its first requests and sat idle for 2 s.

Variants (default: one, C{current}, this work tree as it is) are several
daemons measured side by side in one run: another work tree (C{@TREE}, a
C{git worktree} of an older commit, say) and/or other settings
(C{:CLLAMA_X=0}).  Only figures of one run compare.

bench/bench.py runs this as its "reference workload" lane (one variant);
this script prints the table and the targets of issue 21 (goals 1 and 2).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import bench  # noqa: E402  (bench/ is this script's directory)

REPO = HERE.parent
MODEL = "openai/gpt-4o-mini"
BODY = json.dumps(
    {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Say hello."},
        ],
        "temperature": 0,
    },
    separators=(",", ":"),
)
STREAM_BODY = json.dumps({**json.loads(BODY), "stream": True}, separators=(",", ":"))
ANSWER_SIZE = 606
STREAM_SIZE = 3432
STREAM_EVENTS = 12
ANSWER_ID = "chatcmpl-ref"

TARGETS = {
    "added_p50_ms": 0.30,  # at most
    "rps_32": 2500,  # at least
    "governed_ratio": 1.10,  # governed CPU per request within +10 % of plain
    "sse_added_ms": 0.8,  # at most
}


def _padded(doc: dict, field: list, size: int) -> str:
    """C{doc} as compact JSON of exactly C{size} bytes, padding the string at C{field}."""
    target = doc
    for key in field[:-1]:
        target = target[key]
    base = json.dumps(doc, separators=(",", ":"))
    target[field[-1]] += "x" * (size - len(base))
    text = json.dumps(doc, separators=(",", ":"))
    assert len(text) == size, (len(text), size)
    return text


def chat_completion() -> str:
    """A 606-byte chat.completion as OpenAI sends it (usage details included)."""
    doc = {
        "id": ANSWER_ID,
        "object": "chat.completion",
        "created": 1764000000,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Hello! How can I assist you today?",
                    "refusal": None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 19,
            "completion_tokens": 10,
            "total_tokens": 29,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
        "service_tier": "default",
        "system_fingerprint": "fp_",
    }
    return _padded(doc, ["system_fingerprint"], ANSWER_SIZE)


def sse_stream() -> str:
    """Twelve events, 3,432 bytes: role, eight words, finish, usage, [DONE]."""
    words = ["Hello", "!", " How", " can", " I", " assist", " you", " today?"]

    def chunk(delta, finish=None, usage=None, choices=True, pad=0) -> str:
        doc = {
            "id": ANSWER_ID,
            "object": "chat.completion.chunk",
            "created": 1764000000,
            "model": "gpt-4o-mini-2024-07-18",
            "service_tier": "default",
            "system_fingerprint": "fp_",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}] if choices else [],
            "usage": usage,
            "obfuscation": "o" * pad,
        }
        return "data: " + json.dumps(doc, separators=(",", ":")) + "\n\n"

    def events(pad: int) -> list[str]:
        out = [chunk({"role": "assistant", "content": "", "refusal": None}, pad=pad)]
        out += [chunk({"content": w}, pad=pad) for w in words]
        out.append(chunk({}, finish="stop", pad=pad))
        usage = {
            "prompt_tokens": 19, "completion_tokens": 10, "total_tokens": 29,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
        }
        out.append(chunk(None, usage=usage, choices=False, pad=pad))
        out.append("data: [DONE]\n\n")
        return out

    base = events(0)
    missing = STREAM_SIZE - len("".join(base))
    padded = STREAM_EVENTS - 1  # [DONE] has no padding
    per, extra = divmod(missing, padded)
    out = [chunk_pad for chunk_pad in events(per)]
    # Spread the remainder over the first events.
    if extra:
        first = json.loads(out[0][len("data: "):])
        first["obfuscation"] += "o" * extra
        out[0] = "data: " + json.dumps(first, separators=(",", ":")) + "\n\n"
    text = "".join(out)
    assert len(out) == STREAM_EVENTS and len(text) == STREAM_SIZE, (len(out), len(text))
    return text


def nginx_conf(tmp: Path, port: int) -> str:
    user = "user root root;" if os.geteuid() == 0 else ""
    n = tmp / "nginx"
    for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (n / d).mkdir(parents=True, exist_ok=True)
    q = bench.nginx_quote
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
            if ($http_accept ~* "text/event-stream") {{
                rewrite ^ /stream last;
            }}
            default_type application/json;
            return 200 {q(chat_completion())};
        }}
        location = /stream {{
            internal;
            default_type text/event-stream;
            add_header Cache-Control no-cache;
            return 200 {q(sse_stream())};
        }}
        location / {{
            default_type application/json;
            return 404 '{{"error":{{"message":"not mocked","type":"not_found","code":"not_found"}}}}';
        }}
    }}
}}
"""


def start_nginx(tmp: Path, port: int, core) -> subprocess.Popen:
    conf = tmp / "nginx.conf"
    conf.write_text(nginx_conf(tmp, port))
    prefix = str(tmp / "nginx") + "/"
    error_log = str(tmp / "nginx" / "error.log")
    p = bench.start(
        bench.pinned(core, [bench.nginx_binary(), "-p", prefix, "-e", error_log, "-c", str(conf)]),
        stdout=subprocess.DEVNULL, stderr=open(tmp / "nginx" / "stderr.log", "wb"),
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise RuntimeError(f"nginx exited: {bench.tail(Path(error_log))}")
        try:
            status, _, body = bench.http("POST", f"http://127.0.0.1:{port}/v1/chat/completions", b"{}", timeout=1)
            if status == 200 and len(body) == ANSWER_SIZE:
                return p
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError("nginx did not answer within 10 s")


class Variant:
    """One daemon under test: a name, a work tree, extra environment."""

    def __init__(self, spec: str) -> None:
        name, _, settings = spec.partition(":")
        name, _, tree = name.partition("@")
        self.name = name or "current"
        self.tree = Path(tree).resolve() if tree else REPO
        self.env = dict(kv.split("=", 1) for kv in settings.split(",") if kv)
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.idle_rss_kib: int | None = None

    def start(self, tmp: Path, mock_port: int, core, timeout: float) -> None:
        own = tmp / self.name
        own.mkdir()
        self.port, ui_port = bench.free_port(), bench.free_port()
        env = bench.proxy_env(own, self.port, ui_port, mock_port)
        env["PYTHONPATH"] = str(self.tree)
        env.update(self.env)
        twistd = str(REPO / ".venv" / "bin" / "twistd")
        self.proc = bench.start(
            bench.pinned(core, [twistd, "--pidfile=", "-n", "cllama"]),
            cwd=str(self.tree), env=env, stdin=subprocess.DEVNULL,
            stdout=open(own / "audit.jsonl", "wb"), stderr=open(own / "proxy.log", "wb"),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: the daemon exited: {bench.tail(own / 'proxy.log')}")
            try:
                if bench.http("GET", f"http://127.0.0.1:{self.port}/health", timeout=1)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        else:
            raise RuntimeError(f"{self.name}: /health did not answer: {bench.tail(own / 'proxy.log')}")
        self.verify(own)
        time.sleep(2.0)
        self.idle_rss_kib = bench.rss_kib(self.proc.pid)

    def verify(self, own: Path) -> None:
        headers = {"Authorization": f"Bearer {bench.TOKEN}", "Content-Type": "application/json"}
        url = f"http://127.0.0.1:{self.port}/v1/chat/completions"
        status, _, body = bench.http("POST", url, BODY.encode(), headers)
        if status != 200 or json.loads(body).get("id") != ANSWER_ID:
            raise RuntimeError(f"{self.name}: answered {status}: {body[:300]!r}\n{bench.tail(own / 'proxy.log')}")
        r = sse_once(self.port)
        if r["status"] != 200 or b"data: [DONE]" not in r["body"] or ANSWER_ID.encode() not in r["body"]:
            raise RuntimeError(f"{self.name}: stream answered {r['status']}: {r['body'][:300]!r}")


def sse_once(port: int) -> dict:
    """One streamed request on a new connection, timed from before the connect."""
    t0 = time.perf_counter()
    conn = bench.StreamConn(port)
    try:
        r = conn.request("/v1/chat/completions", STREAM_BODY)
    finally:
        conn.close()
    r["from_connect"] = time.perf_counter() - t0
    return r


def sse_lane(port: int, duration: float) -> dict:
    """Sequential streams, each on a new connection: the first SSE event's time from connect."""
    firsts: list[float] = []
    errors = 0
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        try:
            conn = bench.StreamConn(port)
            try:
                t_connected = time.perf_counter()
                r = conn.request("/v1/chat/completions", STREAM_BODY)
            finally:
                conn.close()
        except (OSError, ValueError, IndexError):
            errors += 1
            continue
        if r["status"] != 200 or b"data: [DONE]" not in r["body"]:
            errors += 1
            continue
        firsts.append((t_connected - t0) + r["first_event"])
    firsts.sort()
    pct = lambda q: firsts[min(len(firsts) - 1, int(round(q / 100 * (len(firsts) - 1))))] * 1000  # noqa: E731
    return {"ok": not errors and bool(firsts), "requests": len(firsts), "errors": errors,
            "first_event_p50_ms": pct(50) if firsts else None, "first_event_p99_ms": pct(99) if firsts else None}


def lua(tmp: Path, name: str, token: str) -> Path:
    path = tmp / f"{name}.lua"
    path.write_text(bench.WRK_LUA.format(body=bench.lua_string(BODY), token=token))
    return path


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def measure(variants: list[Variant], mock_port: int, rounds: int, duration: float, core, governed: bool,
            tmp: Path, quiet_wait: float) -> dict:
    plain, gov = lua(tmp, "plain", bench.TOKEN), lua(tmp, "governed", bench.GOV_TOKEN)
    direct = f"http://127.0.0.1:{mock_port}/v1/chat/completions"
    raw: dict = {"direct": {"c1": [], "c32": [], "sse": []}}
    kinds = [("plain", plain)] + ([("governed", gov)] if governed else [])
    for v in variants:
        for kind, _ in kinds:
            raw[f"{v.name}/{kind}"] = {"c1": [], "c32": [], "sse": []}

    def wait():
        if quiet_wait > 0:
            bench.wait_quiet(quiet_wait, window=1.0)

    for r in range(rounds):
        bench.log(f"round {r + 1} of {rounds}")
        for clients, key in ((1, "c1"), (32, "c32")):
            wait()
            raw["direct"][key].append(bench.run_wrk(direct, plain, clients, duration, core))
            for v in variants:
                for kind, script in kinds:
                    wait()
                    url = f"http://127.0.0.1:{v.port}/v1/chat/completions"
                    raw[f"{v.name}/{kind}"][key].append(
                        bench.run_wrk(url, script, clients, duration, core, pid=v.proc.pid))
        wait()
        raw["direct"]["sse"].append(sse_lane(mock_port, duration))
        for v in variants:
            wait()
            raw[f"{v.name}/plain"]["sse"].append(sse_lane(v.port, duration))
    return raw


def summarise(raw: dict, variants: list[Variant]) -> dict:
    out: dict = {}
    direct = raw["direct"]
    for name, lanes in raw.items():
        if name == "direct":
            continue
        c1, c32, sse = lanes["c1"], lanes["c32"], lanes["sse"]
        failed = [x.get("error") for x in c1 + c32 + sse if not x.get("ok")]
        # Lanes of one round pair up (a governed kind has no stream lane).
        added = [p["p50_us"] / 1000 - d["p50_us"] / 1000 for p, d in zip(c1, direct["c1"][: len(c1)], strict=True)]
        sse_added = [p["first_event_p50_ms"] - d["first_event_p50_ms"]
                     for p, d in zip(sse, direct["sse"][: len(sse)], strict=True) if p.get("ok") and d.get("ok")]
        out[name] = {
            "failed": failed,
            "added_p50_ms": median(added),
            "p50_ms": median([p["p50_us"] / 1000 for p in c1]),
            "p99_ms": median([p["p99_us"] / 1000 for p in c1]),
            "rps_32": median([p["rps"] for p in c32]),
            "cpu_us_32": median([p.get("cpu_us_per_req") for p in c32]),
            "sse_added_ms": median(sse_added) if sse else None,
            "rounds": {"added_p50_ms": added, "rps_32": [p["rps"] for p in c32], "sse_added_ms": sse_added},
        }
    out["direct"] = {
        "p50_ms": median([d["p50_us"] / 1000 for d in direct["c1"]]),
        "p99_ms": median([d["p99_us"] / 1000 for d in direct["c1"]]),
        "rps_32": median([d["rps"] for d in direct["c32"]]),
        "sse_first_event_ms": median([d["first_event_p50_ms"] for d in direct["sse"]]),
    }
    for v in variants:
        out[f"{v.name}/plain"]["idle_rss_mib"] = v.idle_rss_kib / 1024 if v.idle_rss_kib else None
    return out


def _f(x, digits=3, sign=False) -> str:
    if x is None:
        return "–"
    return f"{x:+.{digits}f}" if sign else f"{x:,.{digits}f}"


def table(summary: dict) -> str:
    names = [n for n in summary if n != "direct"]
    d = summary["direct"]
    rows = [
        ("added p50, 1 client (ms)", lambda s: _f(s["added_p50_ms"], 3, True), f"p50 {_f(d['p50_ms'])}"),
        ("p99, 1 client (ms)", lambda s: _f(s["p99_ms"], 2), _f(d["p99_ms"], 3)),
        ("req/s, 32 clients", lambda s: _f(s["rps_32"], 0), _f(d["rps_32"], 0)),
        ("CPU per request at 32 clients (µs)", lambda s: _f(s["cpu_us_32"], 0), "–"),
        ("SSE first byte, added, new connection (ms)", lambda s: _f(s["sse_added_ms"], 3, True),
         f"first event {_f(d['sse_first_event_ms'])}"),
        ("idle RSS (MiB)", lambda s: _f(s.get("idle_rss_mib"), 1), "–"),
    ]
    lines = ["| lane | direct | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for label, get, direct in rows:
        lines.append(f"| {label} | {direct} | " + " | ".join(get(summary[n]) for n in names) + " |")
    return "\n".join(lines)


def targets(summary: dict, name: str) -> list[tuple[str, str, str, bool | None]]:
    """Issue 21's goals 1-2 for variant C{name}: (what, figure, target, met)."""
    s = summary.get(f"{name}/plain")
    if s is None:
        return []
    g = summary.get(f"{name}/governed")
    out = [
        ("added p50, 1 client", _f(s["added_p50_ms"], 3, True) + " ms", f"≤ {TARGETS['added_p50_ms']} ms",
         None if s["added_p50_ms"] is None else s["added_p50_ms"] <= TARGETS["added_p50_ms"]),
        ("req/s, 32 clients", _f(s["rps_32"], 0), f"≥ {TARGETS['rps_32']:,}",
         None if s["rps_32"] is None else s["rps_32"] >= TARGETS["rps_32"]),
        ("SSE first byte added", _f(s["sse_added_ms"], 3, True) + " ms", f"≤ {TARGETS['sse_added_ms']} ms",
         None if s["sse_added_ms"] is None else s["sse_added_ms"] <= TARGETS["sse_added_ms"]),
    ]
    if g is not None and g["cpu_us_32"] and s["cpu_us_32"]:
        ratio = g["cpu_us_32"] / s["cpu_us_32"]
        out.append(("governed CPU per request vs plain", f"{ratio:.3f}×", f"≤ {TARGETS['governed_ratio']}×",
                    ratio <= TARGETS["governed_ratio"]))
        if g["rps_32"] and s["rps_32"]:
            out.append(("governed req/s vs plain", f"{g['rps_32'] / s['rps_32']:.3f}×",
                        f"≥ {1 / TARGETS['governed_ratio']:.3f}×",
                        g["rps_32"] / s["rps_32"] >= 1 / TARGETS["governed_ratio"]))
    return out


def targets_md(summary: dict, name: str) -> str:
    rows = targets(summary, name)
    if not rows:
        return ""
    lines = ["| goal | figure | target | met |", "|---|---|---|---|"]
    for what, figure, target, met in rows:
        lines.append(f"| {what} | {figure} | {target} | {'–' if met is None else ('yes' if met else '**no**')} |")
    return "\n".join(lines)


def lane(duration: float, quiet_wait: float, rounds: int = 3) -> dict:
    """bench/run's reference lane: this work tree, plain and governed, C{rounds} rounds."""
    try:
        return run([Variant("cllama_tx")], rounds, duration, True, quiet_wait)
    except RuntimeError as e:
        bench.log(f"reference lane failed: {e}")
        return {"error": str(e)}


def doc_md(summary: dict | None) -> str:
    """The reference lane's section of docs/PERFORMANCE.md."""
    if not summary:
        return ""
    if "error" in summary:
        return f"## The reference workload (issue 21)\n\nThe lane failed: {summary['error']}\n"
    meta = summary.get("_meta", {})
    figures = {k: v for k, v in summary.items() if k != "_meta"}
    failed = [name for name, s in figures.items() if isinstance(s, dict) and s.get("failed")]
    return f"""## The reference workload (issue 21)

The workload the Go reference proxy and LiteLLM were measured on, exactly
(`bench/reference.py`, run by `bash bench/run`; alone:
`.venv/bin/python bench/reference.py --governed`): `POST /v1/chat/completions`
with `{BODY}`, answered by nginx with a fixed {ANSWER_SIZE}-byte `chat.completion` (usage
with `prompt_tokens_details` and `completion_tokens_details`), streams with a
{STREAM_SIZE:,}-byte, {STREAM_EVENTS}-event SSE body sent in one write; the daemon
started as the README says (`twistd -n cllama`), ledger on; plain agent without
governance, governed agent with policy, budget reservation and rate limits.
{meta.get("rounds", 3)} rounds of {meta.get("duration", 10):g} s per lane, medians; added =
proxy minus direct of the same round; the SSE first byte is timed from the connect
of a new connection per request. Only figures of this run compare with each other.
{"**Failed: " + ", ".join(failed) + "**" if failed else ""}

{table(figures)}

Issue 21's goals 1 and 2 (per request, one core):

{targets_md(summary, "cllama_tx")}
"""


def run(variants: list[Variant], rounds: int, duration: float, governed: bool, quiet_wait: float,
        start_timeout: float = 30.0, keep: bool = False) -> dict:
    """Start nginx and the variants, measure, stop everything; the summary."""
    usable = sorted(os.sched_getaffinity(0))
    pin = len(usable) >= 2 and 0 in usable and 1 in usable
    proxy_core, load_core = ("0", "1") if pin else (None, None)
    if pin:
        os.sched_setaffinity(0, {1})
    tmp = Path(tempfile.mkdtemp(prefix="cllama-ref-"))
    try:
        mock_port = bench.free_port()
        start_nginx(tmp, mock_port, load_core)
        for v in variants:
            v.start(tmp, mock_port, proxy_core, start_timeout)
            bench.log(f"{v.name}: pid {v.proc.pid}, port {v.port}, idle RSS {v.idle_rss_kib} KiB")
        # Warm every daemon up (not measured).
        warm = lua(tmp, "warm", bench.TOKEN)
        for v in variants:
            bench.run_wrk(f"http://127.0.0.1:{v.port}/v1/chat/completions", warm, 4, 2, load_core, latency=False)
        raw = measure(variants, mock_port, rounds, duration, load_core, governed, tmp, quiet_wait)
        (bench.RESULTS / "reference-raw.json").parent.mkdir(parents=True, exist_ok=True)
        (bench.RESULTS / "reference-raw.json").write_text(json.dumps(
            {k: {kk: [{x: y for x, y in r.items() if x != "raw"} for r in vv] for kk, vv in v.items()}
             for k, v in raw.items()}, default=str))
        summary = summarise(raw, variants)
        summary["_meta"] = {"rounds": rounds, "duration": duration, "pinned": pin,
                            "variants": {v.name: {"tree": str(v.tree), "env": v.env} for v in variants}}
        return summary
    finally:
        for v in variants:
            if v.proc is not None:
                bench.stop(v.proc)
        bench.stop_all()
        if keep:
            bench.log(f"kept {tmp}")
        else:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per lane and side")
    ap.add_argument("--variant", action="append", default=[], help="NAME[@TREE][:ENV=VALUE,...]")
    ap.add_argument("--governed", action="store_true", help="the governed agent's lanes too")
    ap.add_argument("--quiet-wait", type=float, default=5.0, help="at most this long before each lane for idle cores")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", help="write the summary here")
    args = ap.parse_args(argv)
    variants = [Variant(s) for s in (args.variant or ["current"])]
    if len({v.name for v in variants}) != len(variants):
        ap.error("variant names must differ")
    summary = run(variants, args.rounds, args.duration, args.governed, args.quiet_wait, keep=args.keep)
    print(table({k: v for k, v in summary.items() if k != "_meta"}))
    for v in variants:
        print(f"\nIssue 21 goals, {v.name}:")
        print(targets_md(summary, v.name))
    for name, s in summary.items():
        if isinstance(s, dict) and s.get("failed"):
            print(f"FAILED {name}: {s['failed'][:3]}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2, default=str))
    return 1 if any(isinstance(s, dict) and s.get("failed") for s in summary.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
