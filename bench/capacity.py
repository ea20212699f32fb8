#!/usr/bin/env python3
"""
The capacity lanes: streams on one core, one worker against two on two
cores, and the memory of an idle daemon, each figure printed next to its
target (issue 21, goals 3 to 5), all in one run (never compare them with
another run's).

    .venv/bin/python bench/capacity.py [--streams 1000] [--hold 10] [--duration 10]
                                       [--only streams,workers,memory] [--quiet-wait 60]

Two trees side by side (a before and an after), streams lane only, results in
bench/results/capacity-trees.json:

    .venv/bin/python bench/capacity.py --tree before@/tmp/wt-before --tree after@. [--rounds 3]
    .venv/bin/python bench/capacity.py --tree ... --split --streams 300   # CPU per request, per event

`bash bench/run` runs it before the request lanes and puts its tables in
docs/PERFORMANCE.md; `bash bench/run --capacity-only` runs it alone.
Results in bench/results/capacity.json (read by bench.py for the doc).

1. Streams on one core.  The proxy (`python -m twisted cllama`, one
   process) pinned to core 0; on core 1 the load: bench/sseload.c, an
   upstream mock and a stream client in C (a few microseconds an event,
   where a Python client and mock took half a core at 1,000 streams and
   put their own delays in the figures).  N keep-alive connections (opened
   in batches of 50, 20 ms apart) each send streaming requests back to
   back for --hold seconds: every stream is 64 content events 20 ms apart
   (50 events/s), a usage chunk and [DONE] (the proxy strips the usage
   chunk: the agent did not ask for it).  First event = from sending a
   request to its first complete event (a connection's first request
   includes its accept); gaps = between one stream's events.  Measured
   direct (client -> mock: the floor of the load itself), plain (model
   xai/slow, chat chunks relayed and metered) and translated (model
   anthropic/claude-slow on the chat surface: the mock answers Anthropic
   SSE, the proxy translates it to chat chunks).  Memory per stream = (RSS
   mid-hold - RSS before) / streams in flight mid-hold; CPU per event =
   the proxy's CPU over the lane / events delivered (requests included).
2. Workers on two cores.  Nothing pinned (the proxy's processes and the
   load share both cores alike in both runs), `--workers 1` then
   `--workers 2`, same run: requests/s at 32 clients (wrk, nginx mock,
   ledger on, no governance) and stream capacity, the events/s delivered
   with 2,000 streams offered (100,000 events/s, more than either serves)
   divided by 50 (events/s of one stream); the 1,000-stream tails of each.
   The load generators' share of the cores is measured too: on two cores
   they bound the ratio (see the doc).
3. Memory.  `twistd -n cllama` as the README starts it, with the bench's
   configuration (an OpenAI-format provider over HTTP, the ledger on):
   RSS once /health answers and 5 s later (idle), and after one chat and
   one streamed request; beside it, in the same run, what Twisted alone
   holds: `twistd -n web` serving a directory, idle.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench  # noqa: E402  (bench/bench.py: nginx mock, wrk, the proxy's environment)

RESULTS = bench.RESULTS / "capacity.json"
SSELOAD_SRC = HERE / "sseload.c"
SSELOAD = bench.RESULTS / "sseload"
TWISTD = bench.REPO / ".venv" / "bin" / "twistd"

EVENTS = 64  # content events a stream
GAP_MS = 20  # between them: 50 events/s
TARGETS = {
    "streams": 1000,
    "first_event_p99_ms": 100.0,
    "gap_p99_ms": 50.0,
    "kib_per_stream": 64.0,
    "translated_ratio": 1.5,
    "worker_scaling": 1.8,
    "idle_rss_mib": 45.0,
}
PLAIN_MODEL = "xai/slow"
TRANSLATED_MODEL = "anthropic/claude-slow"
SATURATING_STREAMS = 2000


def log(msg: str) -> None:
    bench.log(msg)


def build_sseload() -> Path:
    """Compile bench/sseload.c (once, again when it changed)."""
    if SSELOAD.exists() and SSELOAD.stat().st_mtime >= SSELOAD_SRC.stat().st_mtime:
        return SSELOAD
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc): `bash bench/run` installs gcc")
    bench.RESULTS.mkdir(parents=True, exist_ok=True)
    subprocess.run([cc, "-O2", "-o", str(SSELOAD), str(SSELOAD_SRC)], check=True)
    return SSELOAD


def tree(pid: int) -> list[int]:
    """C{pid} and the processes of its session (a supervisor's workers)."""
    return sorted(set([pid, *bench.session_pids(pid)]))


def cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += bench.cpu_seconds(pid)
        except (OSError, IndexError, ValueError):
            pass
    return total


def rss(pids: list[int]) -> int:
    return sum(bench.rss_kib(pid) or 0 for pid in pids)


def machine_busy() -> float:
    """CPU seconds all cores have been busy since boot."""
    return sum(busy for busy, _steal in bench.cpu_stat().values())


class Lane:
    """CPU of the proxy, of the load and of everything else over one lane."""

    def __init__(self, proxy: list[int], load: list[int]) -> None:
        self.proxy, self.load = proxy, load
        self.t0 = time.monotonic()
        self.p0, self.l0, self.m0 = cpu(proxy), cpu(load), machine_busy()

    def end(self, own_load_s: float = 0.0) -> dict:
        wall = time.monotonic() - self.t0
        p, ld = cpu(self.proxy) - self.p0, cpu(self.load) - self.l0 + own_load_s
        others = max(0.0, machine_busy() - self.m0 - p - ld)
        return {"wall_s": wall, "proxy_cpu_s": p, "load_cpu_s": ld, "others_cores": others / wall}


def quiet(args, budget: list[float]) -> dict | None:
    if args.quiet_wait <= 0 or budget[0] <= 0:
        return None
    t0 = time.monotonic()
    busy, ok = bench.wait_quiet(min(budget[0], 20.0), window=1.0)
    budget[0] -= max(0.0, time.monotonic() - t0 - 1.0)
    return {"busy_cores": busy, "quiet": ok}


def start_mock(core, port: int, tmp: Path):
    p = bench.start(bench.pinned(core, [str(SSELOAD), "mock", str(port), "--events", str(EVENTS), "--gap-ms",
                                        str(GAP_MS)]),
                    stdin=subprocess.DEVNULL, stdout=open(tmp / "sseload-mock.log", "wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return p
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("the stream mock did not start")


def run_streams(core, port: int, body: Path, n: int, hold: float, pids: list[int]) -> tuple[dict, float]:
    """The C client: its result, and its own CPU seconds."""
    cmd = bench.pinned(core, [str(SSELOAD), "client", str(port), "/v1/chat/completions", str(body), bench.TOKEN,
                              "--streams", str(n), "--hold", str(hold), "--pids", ",".join(map(str, pids))])
    t0 = os.times()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=hold + 120)
    t1 = os.times()
    own = (t1.children_user - t0.children_user) + (t1.children_system - t0.children_system)
    try:
        r = json.loads(out.stdout)
    except ValueError:
        return {"ok": False, "error": f"the stream client failed: {(out.stdout + out.stderr)[-400:]}"}, own
    r["ok"] = (r["connect_errors"] == 0 and r["bad_status"] == 0 and r["unfinished"] == 0
               and r["completed"] > 0 and r["opened"] == n)
    if not r["ok"]:
        r["error"] = (f"opened {r['opened']}/{n}, connect errors {r['connect_errors']}, "
                      f"non-200 {r['bad_status']}, unfinished {r['unfinished']}")
    r["events_per_s"] = r["events"] / r["wall_s"] if r.get("wall_s") else 0.0
    return r, own


def stream_lane(core, port: int, body: Path, n: int, hold: float, proxy: list[int], load: list[int]) -> dict:
    before = rss(proxy) if proxy else None
    lane = Lane(proxy, load)
    r, own = run_streams(core, port, body, n, hold, proxy or load)
    r.update(lane.end(own))
    if proxy:
        r["rss_before_kib"] = before
        r["rss_while_kib"] = r.pop("rss_sample_kib")
        if r.get("active_at_sample"):
            r["kib_per_stream"] = (r["rss_while_kib"] - before) / r["active_at_sample"]
        if r.get("events"):
            r["proxy_us_per_event"] = r["proxy_cpu_s"] * 1e6 / r["events"]
    if r.get("events"):
        r["load_us_per_event"] = r["load_cpu_s"] * 1e6 / r["events"]
    return r


def proxy_env(tmp: Path, api: int, ui: int, mock: int, sse_port: int) -> dict:
    env = bench.proxy_env(tmp, api, ui, mock)
    env.update({"XAI_API_KEY": "xai-bench-not-real", "XAI_BASE_URL": f"http://127.0.0.1:{sse_port}/v1",
                "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{sse_port}/v1"})
    return env


def write_body(tmp: Path, model: str) -> Path:
    path = tmp / f"{model.replace('/', '_')}.json"
    path.write_text(json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}))
    return path


def wait_ready(api: int, wait_s: float = 60.0) -> None:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            if bench.http("GET", f"http://127.0.0.1:{api}/health/readiness", timeout=1)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("the proxy did not become ready")


# ---------------------------------------------------------------- the lanes


def streams(args, res: dict, tmp: Path, budget: list[float]) -> None:
    """Goal 3: N streams of 50 events/s through one process on one core."""
    pin = len(os.sched_getaffinity(0)) >= 2
    proxy_core, load_core = ("0", "1") if pin else (None, None)
    run = tmp / "streams"
    run.mkdir()
    sse_port = bench.free_port()
    mock = start_mock(load_core, sse_port, run)
    api, ui = bench.free_port(), bench.free_port()
    proxy = bench.start_proxy(run, proxy_env(run, api, ui, bench.free_port(), sse_port), api, proxy_core, 60)
    wait_ready(api)
    pids = tree(proxy.pid)
    load = [mock.pid]
    plain, translated = write_body(run, PLAIN_MODEL), write_body(run, TRANSLATED_MODEL)
    # Warm-up: every kind once, not counted.
    run_streams(load_core, api, plain, 100, 2.0, pids)
    run_streams(load_core, api, translated, 100, 2.0, pids)
    out: dict = {"n": args.streams, "hold": args.hold, "pinned": pin}
    for name, port, body, proxied in (("direct", sse_port, plain, []), ("plain", api, plain, pids),
                                      ("translated", api, translated, pids)):
        waited = quiet(args, budget)
        log(f"streams: {args.streams} {name}")
        r = stream_lane(load_core, port, body, args.streams, args.hold, proxied, load)
        r["quiet_before"] = waited
        out[name] = r
        time.sleep(1.0)
    bench.stop(proxy)
    bench.stop(mock)
    res["streams"] = out


def start_trees(specs: list[str], run: Path, sse_port: int, core) -> list[tuple]:
    """A daemon for each C{NAME@PATH} tree, ready: (name, API port, its processes, the process)."""
    trees = []
    for spec in specs:
        name, _, path = spec.partition("@")
        home = run / name
        home.mkdir()
        api, ui = bench.free_port(), bench.free_port()
        proxy = start_tree_proxy(home, proxy_env(home, api, ui, bench.free_port(), sse_port), api, core,
                                 Path(path or bench.REPO).resolve())
        wait_ready(api)
        trees.append((name, api, tree(proxy.pid), proxy))
    return trees


def start_tree_proxy(run: Path, env: dict, api: int, core, tree: Path) -> subprocess.Popen:
    """The daemon of work tree C{tree} (its own code: C{cwd} and C{PYTHONPATH}), answering /health."""
    env = dict(env, PYTHONPATH=str(tree))
    p = bench.start(bench.pinned(core, bench.proxy_command()), cwd=str(tree), env=env, stdin=subprocess.DEVNULL,
                    stdout=open(run / "audit.jsonl", "wb"), stderr=open(run / "proxy.log", "wb"))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise RuntimeError(f"{tree}: the daemon exited: {bench.tail(run / 'proxy.log')}")
        try:
            if bench.http("GET", f"http://127.0.0.1:{api}/health", timeout=1)[0] == 200:
                return p
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{tree}: /health did not answer: {bench.tail(run / 'proxy.log')}")


def streams_trees(args, res: dict, tmp: Path, budget: list[float]) -> None:
    """
    The streams lane for several work trees side by side (C{--tree
    NAME@PATH}, a before and an after): one daemon each, all pinned to core
    0 (the ones not under load idle), the plain and translated lanes taken
    tree after tree, the trees' order turned round each round.
    """
    pin = len(os.sched_getaffinity(0)) >= 2
    proxy_core, load_core = ("0", "1") if pin else (None, None)
    run = tmp / "streams-trees"
    run.mkdir()
    sse_port = bench.free_port()
    mock = start_mock(load_core, sse_port, run)
    trees = start_trees(args.tree, run, sse_port, proxy_core)
    plain, translated = write_body(run, PLAIN_MODEL), write_body(run, TRANSLATED_MODEL)
    for _, api, pids, _ in trees:  # warm-up, not counted
        run_streams(load_core, api, plain, 100, 2.0, pids)
        run_streams(load_core, api, translated, 100, 2.0, pids)
    out: dict = {"n": args.streams, "hold": args.hold, "pinned": pin, "rounds": args.rounds,
                 "trees": {name: {"path": spec.partition("@")[2], "plain": [], "translated": []}
                           for (name, *_), spec in zip(trees, args.tree, strict=True)}}
    quiet(args, budget)
    log(f"streams: {args.streams} direct")
    out["direct"] = stream_lane(load_core, sse_port, plain, args.streams, args.hold, [], [mock.pid])
    for r in range(args.rounds):
        order = trees if r % 2 == 0 else trees[::-1]
        for lane, body in (("plain", plain), ("translated", translated)):
            for name, api, pids, _ in order:
                time.sleep(1.0)
                waited = quiet(args, budget)
                log(f"streams: {args.streams} {lane} {name} (round {r + 1})")
                result = stream_lane(load_core, api, body, args.streams, args.hold, pids, [mock.pid])
                result["quiet_before"] = waited
                out["trees"][name][lane].append(result)
    for *_, proxy in trees:
        bench.stop(proxy)
    bench.stop(mock)
    res["streams_trees"] = out


SPLIT_EVENTS = (16, 128)


def split_trees(args, res: dict, tmp: Path, budget: list[float]) -> None:
    """
    What a stream costs a tree per request and per event (C{--split}): the
    streams lane at a load the proxy keeps up with (C{--streams}, 300 say),
    once with streams of 16 events and once of 128, then CPU = a x streams +
    b x events solved for a and b, per round.
    """
    global EVENTS
    proxy_core, load_core = ("0", "1") if len(os.sched_getaffinity(0)) >= 2 else (None, None)
    raw: dict = {}
    for events in SPLIT_EVENTS:
        EVENTS = events
        run = tmp / f"split-{events}"
        run.mkdir()
        sse_port = bench.free_port()
        mock = start_mock(load_core, sse_port, run)
        trees = start_trees(args.tree, run, sse_port, proxy_core)
        bodies = {"plain": write_body(run, PLAIN_MODEL), "translated": write_body(run, TRANSLATED_MODEL)}
        for _, api, pids, _ in trees:
            for body in bodies.values():
                run_streams(load_core, api, body, 100, 2.0, pids)
        for r in range(args.rounds):
            for lane, body in bodies.items():
                for name, api, pids, _ in (trees if r % 2 == 0 else trees[::-1]):
                    quiet(args, budget)
                    log(f"split: {events} events a stream, {lane} {name} (round {r + 1})")
                    result = stream_lane(load_core, api, body, args.streams, args.hold, pids, [mock.pid])
                    raw.setdefault(name, {}).setdefault(lane, {}).setdefault(events, []).append(result)
        for *_, proxy in trees:
            bench.stop(proxy)
        bench.stop(mock)
    EVENTS = 64
    out: dict = {"n": args.streams, "hold": args.hold, "rounds": args.rounds, "events": SPLIT_EVENTS, "trees": {}}
    short, long = SPLIT_EVENTS
    for name, lanes in raw.items():
        for lane, by_events in lanes.items():
            rows = []
            for a, b in zip(by_events[short], by_events[long], strict=True):
                c1, s1, e1 = a["proxy_cpu_s"], a["streams"], a["events"]
                c2, s2, e2 = b["proxy_cpu_s"], b["streams"], b["events"]
                det = s1 * e2 - s2 * e1
                rows.append({"us_per_request": (c1 * e2 - c2 * e1) / det * 1e6 if det else None,
                             "us_per_event": (s1 * c2 - s2 * c1) / det * 1e6 if det else None,
                             "others_cores": (a["others_cores"], b["others_cores"]), "ok": a.get("ok") and b.get("ok")})
            out["trees"].setdefault(name, {})[lane] = rows
    res["split_trees"] = out


def split_report(s: dict) -> str:
    names = list(s["trees"])
    lines = [f"{s['n']:,} streams, streams of {s['events'][0]} and of {s['events'][1]} events, {s['rounds']} round(s): "
             "CPU = a per request + b per event", "", "| figure | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(names)]
    for lane in ("plain", "translated"):
        for key, label in (("us_per_event", "µs an event"), ("us_per_request", "µs a stream's request")):
            cells = [" / ".join(_f(r[key], 1 if key == "us_per_event" else 0) for r in s["trees"][n][lane])
                     for n in names]
            lines.append(f"| {lane}: {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def trees_report(s: dict) -> str:
    """The trees' figures side by side: each round, and the median of the rounds."""
    keys = (("proxy_us_per_event", "proxy CPU us an event", 1), ("events_per_s", "events/s delivered", 0),
            ("ttfb_p50_ms", "first event p50 ms", 1), ("ttfb_p99_ms", "first event p99 ms", 1),
            ("gap_p50_ms", "gap p50 ms", 1), ("gap_p99_ms", "gap p99 ms", 1), ("others_cores", "other processes (cores)", 2))
    names = list(s["trees"])
    lines = [f"{s['n']:,} streams of 50 events/s for {s['hold']:g} s, {s['rounds']} round(s), trees "
             + ", ".join(f"{n} ({s['trees'][n]['path'] or 'this tree'})" for n in names) + ":", ""]
    lines += ["| lane | figure | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for lane in ("plain", "translated"):
        for key, label, digits in keys:
            cells = []
            for n in names:
                values = [r.get(key) for r in s["trees"][n][lane] if r.get(key) is not None]
                cells.append(" / ".join(_f(v, digits) for v in values) or "-")
            lines.append(f"| {lane} | {label} | " + " | ".join(cells) + " |")
    for n in names:
        p, t = s["trees"][n]["plain"], s["trees"][n]["translated"]
        ratios = [b["proxy_us_per_event"] / a["proxy_us_per_event"] for a, b in zip(p, t, strict=True)
                  if a.get("proxy_us_per_event") and b.get("proxy_us_per_event")]
        lines.append(f"\nTranslated against plain, CPU an event, {n}: " + " / ".join(f"{x:.2f}x" for x in ratios) + ".")
    d = s.get("direct") or {}
    lines += ["", f"Direct (the load alone): first event p99 {_f(d.get('ttfb_p99_ms'))} ms, "
                  f"gap p99 {_f(d.get('gap_p99_ms'))} ms, load CPU {_f(d.get('load_us_per_event'))} us an event."]
    return "\n".join(lines) + "\n"


def workers(args, res: dict, tmp: Path, budget: list[float]) -> None:
    """Goal 4: one worker against two, on both cores, nothing pinned."""
    run = tmp / "workers"
    run.mkdir()
    mock_port = bench.free_port()
    nginx = bench.start_nginx(run, mock_port, None)
    sse_port = bench.free_port()
    mock = start_mock(None, sse_port, run)
    lua = bench.write_lua(run, "chat", bench.CHAT_BODY, bench.TOKEN)
    body = write_body(run, PLAIN_MODEL)
    out: dict = {"duration": args.duration, "hold": args.hold}
    for count in (1, 2):
        home = run / f"w{count}"
        home.mkdir()
        api, ui = bench.free_port(), bench.free_port()
        env = proxy_env(home, api, ui, mock_port, sse_port)
        env["CLLAMA_WORKERS"] = str(count)
        log(f"workers: {count}")
        proxy = bench.start_proxy(home, env, api, None, 60)
        wait_ready(api)
        time.sleep(1.0 + count)  # every worker says it serves (readiness is the first one's)
        pids = tree(proxy.pid)
        url = f"http://127.0.0.1:{api}/v1/chat/completions"
        lane_out: dict = {"processes": len(pids)}
        bench.run_wrk(url, lua, 32, 2.0, None, latency=False)
        waited = quiet(args, budget)
        lane = Lane(pids, bench.session_pids(nginx.pid))
        t0 = os.times()
        r = bench.run_wrk(url, lua, 32, args.duration, None)
        t1 = os.times()  # wrk's own CPU: a child of this process, waited for
        r.pop("raw", None)
        r.update(lane.end((t1.children_user - t0.children_user) + (t1.children_system - t0.children_system)))
        r["proxy_us_per_request"] = r["proxy_cpu_s"] * 1e6 / r["requests"] if r.get("requests") else None
        r["quiet_before"] = waited
        lane_out["requests"] = r
        time.sleep(1.0)
        quiet(args, budget)
        lane_out["streams"] = stream_lane(None, api, body, args.streams, args.hold, pids, [mock.pid])
        time.sleep(1.0)
        quiet(args, budget)
        lane_out["saturated"] = stream_lane(None, api, body, SATURATING_STREAMS, args.hold, pids, [mock.pid])
        lane_out["rss_kib"] = rss(pids)
        out[f"w{count}"] = lane_out
        bench.stop(proxy, grace=40)
        time.sleep(1.0)
    bench.stop(mock)
    bench.stop(nginx)
    res["workers"] = out


def _idle_rss(cmd: list[str], env: dict, port: int, cwd: Path, settle: float, after=None) -> dict:
    p = bench.start(cmd, cwd=str(cwd), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=open(cwd / f"idle-{port}.log", "wb"))
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if p.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited with {p.returncode}:\n{bench.tail(cwd / f'idle-{port}.log')}")
            try:
                if bench.http("GET", f"http://127.0.0.1:{port}/health", timeout=1)[0] in (200, 404):
                    break
            except OSError:
                pass
            time.sleep(0.1)
        out = {"at_start_kib": bench.rss_kib(p.pid)}
        time.sleep(settle)
        out["idle_kib"] = bench.rss_kib(p.pid)
        if after is not None:
            after()
            time.sleep(1.0)
            out["after_requests_kib"] = bench.rss_kib(p.pid)
        out["maps"] = smaps(p.pid)
        return out
    finally:
        bench.stop(p)


def smaps(pid: int) -> dict:
    """Resident KiB by kind: the heap (Python's objects), shared libraries, the rest."""
    kinds = {"heap": 0, "libraries": 0, "other": 0}
    big: dict[str, int] = {}
    current = "other"
    try:
        for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
            head = line.split(None, 5)
            if head and ":" not in head[0]:
                name = head[5] if len(head) > 5 else ""
                current = "libraries" if ".so" in name else ("heap" if name in ("", "[heap]") else "other")
                key = name.rsplit("/", 1)[-1] if ".so" in name else ""
            elif head and head[0] == "Rss:":
                kinds[current] += int(head[1])
                if key:
                    big[key] = big.get(key, 0) + int(head[1])
    except OSError:
        return {}
    kinds["largest_libraries"] = dict(sorted(big.items(), key=lambda kv: -kv[1])[:5])
    return kinds


def memory(args, res: dict, tmp: Path, budget: list[float]) -> None:
    """Goal 5: the idle daemon started as the README does, and what Twisted alone holds."""
    run = tmp / "memory"
    run.mkdir()
    mock_port = bench.free_port()
    nginx = bench.start_nginx(run, mock_port, None)
    api, ui = bench.free_port(), bench.free_port()
    env = bench.proxy_env(run, api, ui, mock_port)
    quiet(args, budget)

    def requests() -> None:
        headers = {"Authorization": f"Bearer {bench.TOKEN}", "Content-Type": "application/json"}
        base = f"http://127.0.0.1:{api}/v1/chat/completions"
        bench.http("POST", base, bench.CHAT_BODY.encode(), headers)
        bench.http("POST", base, bench.STREAM_BODY.encode(), headers)

    daemon = _idle_rss([str(TWISTD), "--pidfile=", "-n", "cllama"], env, api, run, 5.0, requests)
    web_port = bench.free_port()
    (run / "www").mkdir()
    web = _idle_rss([str(TWISTD), "--pidfile=", "-n", "web", "--listen", f"tcp:{web_port}:interface=127.0.0.1",
                     "--path", str(run / "www")], {k: v for k, v in env.items() if k != "PYTHONPATH"}, web_port,
                    run, 5.0)
    bench.stop(nginx)
    res["memory"] = {"daemon": daemon, "twisted_web": web}


# ---------------------------------------------------------------- the report


def _f(x, digits=1, unit="") -> str:
    return "-" if x is None else f"{x:,.{digits}f}{unit}"


def _met(ok) -> str:
    return "-" if ok is None else ("met" if ok else "**not met**")


def report(res: dict) -> str:
    t = TARGETS
    lines = [f"## Streams, workers and memory ({res['when']}, one run of `{res['command']}`)", ""]
    s = res.get("streams")
    targets: list[list[str]] = []
    if s:
        d, p, tr = s.get("direct") or {}, s.get("plain") or {}, s.get("translated") or {}
        lines += [
            f"{s['n']:,} concurrent streams of 50 events/s for {s['hold']:g} s, the proxy alone on core 0, the load "
            "(bench/sseload.c) on core 1:", "",
            "| streams | direct (the load alone) | through the proxy | translated (Anthropic SSE -> chat) |",
            "|---|---|---|---|",
        ]
        for key, label in (("first_event_p50_ms", "first event p50 ms"), ("ttfb_p99_ms", "first event p99 ms"),
                           ("first_ttfb_p99_ms", "a connection's first event p99 ms (its accept included)"),
                           ("gap_p50_ms", "gap between events p50 ms"), ("gap_p99_ms", "gap between events p99 ms"),
                           ("events_per_s", "events/s delivered"), ("proxy_us_per_event", "proxy CPU us an event"),
                           ("load_us_per_event", "load CPU us an event"), ("kib_per_stream", "proxy KiB a stream")):
            src = {"first_event_p50_ms": "ttfb_p50_ms"}.get(key, key)
            digits = 0 if key == "events_per_s" else 1
            # Memory a stream from the first lane through the proxy only: the
            # translated lane starts with what the plain one left allocated.
            third = None if key == "kib_per_stream" else tr.get(src)
            lines.append(f"| {label} | {_f(d.get(src), digits)} | {_f(p.get(src), digits)} | {_f(third, digits)} |")
        lines.append(f"| streams completed (errors) | {d.get('completed', 0):,} ({d.get('error', 'none')}) | "
                     f"{p.get('completed', 0):,} ({p.get('error', 'none')}) | "
                     f"{tr.get('completed', 0):,} ({tr.get('error', 'none')}) |")
        lines.append(f"| other processes on the cores (cores busy) | {_f(d.get('others_cores'), 2)} | "
                     f"{_f(p.get('others_cores'), 2)} | {_f(tr.get('others_cores'), 2)} |")
        lines.append("")
        ok = p.get("ok") and tr.get("ok")
        for lane, r in (("plain", p), ("translated", tr)):
            targets.append([f"{s['n']:,} streams, {lane}: first event p99", f"≤ {t['first_event_p99_ms']:g} ms",
                            _f(r.get("ttfb_p99_ms"), 1, " ms"),
                            _met(r.get("ok") and r.get("ttfb_p99_ms", 1e9) <= t["first_event_p99_ms"])])
            targets.append([f"{s['n']:,} streams, {lane}: gap p99", f"≤ {t['gap_p99_ms']:g} ms",
                            _f(r.get("gap_p99_ms"), 1, " ms"),
                            _met(r.get("ok") and r.get("gap_p99_ms", 1e9) <= t["gap_p99_ms"])])
        k = p.get("kib_per_stream")
        targets.append([f"memory a stream (at {s['n']:,})", f"≤ {t['kib_per_stream']:g} KiB", _f(k, 1, " KiB"),
                        _met(None if k is None else k <= t["kib_per_stream"])])
        if ok and p.get("proxy_us_per_event"):
            ratio = tr["proxy_us_per_event"] / p["proxy_us_per_event"]
            targets.append(["translated against plain: CPU an event", f"≤ {t['translated_ratio']:g}x",
                            f"{ratio:.2f}x", _met(ratio <= t["translated_ratio"])])
    w = res.get("workers")
    if w and w.get("w1") and w.get("w2"):
        w1, w2 = w["w1"], w["w2"]
        r1, r2 = w1["requests"], w2["requests"]
        c1, c2 = w1["saturated"], w2["saturated"]
        lines += [
            "One worker against two, nothing pinned (the load shares both cores too):", "",
            "| | 1 worker | 2 workers | ratio |", "|---|---|---|---|",
            f"| requests/s, 32 clients | {_f(r1.get('rps'), 0)} | {_f(r2.get('rps'), 0)} | "
            f"{_f(r2.get('rps', 0) / r1['rps'] if r1.get('rps') else None, 2)}x |",
            f"| proxy CPU us a request (every process) | {_f(r1.get('proxy_us_per_request'), 0)} | "
            f"{_f(r2.get('proxy_us_per_request'), 0)} | |",
            f"| cores: proxy / load / others | {_f(r1['proxy_cpu_s'] / r1['wall_s'], 2)} / "
            f"{_f(r1['load_cpu_s'] / r1['wall_s'], 2)} / {_f(r1['others_cores'], 2)} | "
            f"{_f(r2['proxy_cpu_s'] / r2['wall_s'], 2)} / {_f(r2['load_cpu_s'] / r2['wall_s'], 2)} / "
            f"{_f(r2['others_cores'], 2)} | |",
            f"| stream capacity (events/s at {SATURATING_STREAMS:,} streams offered / 50) | "
            f"{_f(c1.get('events_per_s', 0) / 50, 0)} | {_f(c2.get('events_per_s', 0) / 50, 0)} | "
            f"{_f(c2.get('events_per_s', 0) / c1['events_per_s'] if c1.get('events_per_s') else None, 2)}x |",
            f"| cores at capacity: proxy / load / others | {_f(c1['proxy_cpu_s'] / c1['wall_s'], 2)} / "
            f"{_f(c1['load_cpu_s'] / c1['wall_s'], 2)} / {_f(c1['others_cores'], 2)} | "
            f"{_f(c2['proxy_cpu_s'] / c2['wall_s'], 2)} / {_f(c2['load_cpu_s'] / c2['wall_s'], 2)} / "
            f"{_f(c2['others_cores'], 2)} | |",
        ]
        for key, label in (("ttfb_p99_ms", "first event p99 ms"), ("first_ttfb_p99_ms", "a connection's first event p99 ms"),
                           ("gap_p99_ms", "gap p99 ms")):
            lines.append(f"| {s['n'] if s else args_streams(res):,} streams: {label} | {_f(w1['streams'].get(key))} | "
                         f"{_f(w2['streams'].get(key))} | |")
        lines.append("")
        for what, a, b in (("requests/s", r1.get("rps"), r2.get("rps")),
                           ("stream capacity", c1.get("events_per_s"), c2.get("events_per_s"))):
            ratio = b / a if a and b else None
            targets.append([f"1 -> 2 workers on 2 cores: {what}", f"≥ {t['worker_scaling']:g}x", _f(ratio, 2, "x"),
                            _met(None if ratio is None else ratio >= t["worker_scaling"])])
    m = res.get("memory")
    if m:
        dm, web = m["daemon"], m["twisted_web"]
        lines += [
            "Memory of an idle daemon (`twistd -n cllama`, the bench's configuration), beside Twisted's own web "
            "server (`twistd -n web`) idle in the same run:", "",
            "| RSS MiB | twistd -n cllama | twistd -n web |", "|---|---|---|",
            f"| once it answers | {_f(dm['at_start_kib'] / 1024)} | {_f(web['at_start_kib'] / 1024)} |",
            f"| idle, 5 s later | {_f(dm['idle_kib'] / 1024)} | {_f(web['idle_kib'] / 1024)} |",
            f"| after one chat and one streamed request | {_f(dm.get('after_requests_kib', 0) / 1024)} | |",
            f"| of which heap (Python's objects) / shared libraries / other | "
            f"{_f(dm['maps'].get('heap', 0) / 1024)} / {_f(dm['maps'].get('libraries', 0) / 1024)} / "
            f"{_f(dm['maps'].get('other', 0) / 1024)} | {_f(web['maps'].get('heap', 0) / 1024)} / "
            f"{_f(web['maps'].get('libraries', 0) / 1024)} / {_f(web['maps'].get('other', 0) / 1024)} |",
            "",
            "Largest libraries (KiB resident): " + ", ".join(f"{k} {v:,}" for k, v in
                                                              dm["maps"].get("largest_libraries", {}).items()) + ".",
            "",
        ]
        targets.append(["idle RSS (twistd -n cllama)", f"≤ {t['idle_rss_mib']:g} MiB",
                        _f(dm["idle_kib"] / 1024, 1, " MiB"), _met(dm["idle_kib"] / 1024 <= t["idle_rss_mib"])])
    if targets:
        lines += ["| target | bar | this run | status |", "|---|---|---|---|"]
        lines += [f"| {' | '.join(row)} |" for row in targets]
    return "\n".join(lines) + "\n"


def main_trees(args) -> int:
    res: dict = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "args": vars(args)}
    tmp = Path(tempfile.mkdtemp(prefix="cllama-capacity-"))
    try:
        (split_trees if args.split else streams_trees)(args, res, tmp, [args.quiet_wait])
    finally:
        bench.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    bench.RESULTS.mkdir(parents=True, exist_ok=True)
    path = bench.RESULTS / "capacity-trees.json"
    path.write_text(json.dumps(res, indent=2, default=str))
    log(f"results in {path}")
    if args.split:
        print(split_report(res["split_trees"]))
        lanes = [r for t in res["split_trees"]["trees"].values() for rows in t.values() for r in rows]
    else:
        print(trees_report(res["streams_trees"]))
        lanes = [r for t in res["streams_trees"]["trees"].values() for lane in ("plain", "translated") for r in t[lane]]
    return 0 if all(r.get("ok") for r in lanes) else 1


def args_streams(res: dict) -> int:
    return int(res.get("args", {}).get("streams", 1000))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=TARGETS["streams"])
    ap.add_argument("--hold", type=float, default=10.0, help="seconds each stream lane holds its streams")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of each requests/s lane")
    ap.add_argument("--only", default="streams,workers,memory")
    ap.add_argument("--quiet-wait", type=float, default=float(os.environ.get("BENCH_QUIET_WAIT", "60")),
                    help="seconds in all to wait for other processes to leave the cores idle before lanes")
    ap.add_argument("--tree", action="append", default=[], metavar="NAME@PATH",
                    help="the streams lane only, for these work trees side by side (a before and an after); "
                         "results in bench/results/capacity-trees.json, not the doc's")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of the side-by-side streams lane (--tree)")
    ap.add_argument("--split", action="store_true",
                    help="with --tree: a stream's CPU per request and per event, from streams of 16 and 128 events "
                         "(use --streams the proxy keeps up with, 300 say)")
    args = ap.parse_args(argv)
    build_sseload()
    if args.tree:
        return main_trees(args)
    res: dict = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "args": vars(args),
                 "command": " ".join(["bash bench/run --capacity-only", *(argv if argv is not None else sys.argv[1:])])
                 if os.environ.get("BENCH_CAPACITY_CALLER") != "run" else "bash bench/run"}
    tmp = Path(tempfile.mkdtemp(prefix="cllama-capacity-"))
    budget = [args.quiet_wait]
    lanes = {"streams": streams, "workers": workers, "memory": memory}
    try:
        for name in [x.strip() for x in args.only.split(",") if x.strip()]:
            lanes[name](args, res, tmp, budget)
    finally:
        bench.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    bench.RESULTS.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=2, default=str))
    print(report(res))
    log(f"results in {RESULTS}")
    failed = [k for k, v in res.get("streams", {}).items() if isinstance(v, dict) and v.get("ok") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
