"""
The fleet lanes: what several workers and a shared store cost and give, all
in one run (never compare its figures with another run's).

    .venv/bin/python bench/fleet.py [--duration 10] [--streams 1000] [--hold 10] [--no-postgres]

1. Throughput: requests/s at 32 clients (wrk) through `--workers 1` and
   `--workers 2`, and the scaling ratio.  Nothing is pinned: the proxy's
   workers, the nginx mock and wrk share the machine's cores, in both runs
   alike, so on two cores the 2-worker figure is bounded by the load
   generator's share too (the ratio is a lower bound of what two free
   cores give).
2. Streams: 1,000 concurrent SSE streams (bench/slowmock.py, 64 events
   20 ms apart), time to the first event p50/p99, with 1 and 2 workers.
3. Budgeted requests: added p50/p99 at one client (governed agent: policy,
   budget reservation, rate limit) on the SQLite file and on PostgreSQL
   (a throwaway local cluster: cllama_tx/testing/postgres.py), against the
   direct nginx in the same run; plus the plain agent on PostgreSQL.

Prints a Markdown table and writes bench/results/fleet-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import streamload  # noqa: E402

import bench  # noqa: E402  (bench/bench.py: nginx mock, wrk, the proxy's environment)

WARMUP = 2.0


def tree_cpu(root: int) -> float:
    """CPU seconds of C{root}'s session: the supervisor and its workers."""
    total = 0.0
    for pid in bench.session_pids(root):
        try:
            total += bench.cpu_seconds(pid)
        except (OSError, IndexError, ValueError):
            pass
    return total


def start_proxy(tmp: Path, env: dict, api_port: int) -> subprocess.Popen:
    return bench.start_proxy(tmp, env, api_port, None, 60.0)


def wait_ready(api_port: int, wait_s: float = 30.0) -> None:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            status, _, _ = bench.http("GET", f"http://127.0.0.1:{api_port}/health/readiness", timeout=1)
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("the proxy did not become ready")


def throughput(url: str, lua: Path, duration: float, proxy) -> dict:
    bench.run_wrk(url, lua, 32, WARMUP, None, latency=False)
    before = tree_cpu(proxy.pid)
    r = bench.run_wrk(url, lua, 32, duration, None)
    used = tree_cpu(proxy.pid) - before
    r["cpu_us_per_req"] = used * 1e6 / r["requests"] if r.get("requests") else None
    return r


def latency(url: str, lua: Path, duration: float) -> dict:
    bench.run_wrk(url, lua, 1, WARMUP, None, latency=False)
    return bench.run_wrk(url, lua, 1, duration, None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--hold", type=float, default=10.0)
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    res: dict = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "args": vars(args)}
    tmp = Path(tempfile.mkdtemp(prefix="cllama-fleet-bench-"))
    cluster = None
    try:
        mock_port = bench.free_port()
        bench.start_nginx(tmp, mock_port, None)
        slow_port = bench.SLOW_PORT[0] = bench.free_port()
        bench.start([str(bench.VENV_PY), str(bench.HERE / "slowmock.py"), str(slow_port),
                     "--delay-ms", str(bench.SLOW_DELAY_MS), "--chunks", str(bench.SLOW_CHUNKS),
                     "--gap-ms", str(bench.SLOW_GAP_MS)],
                    stdin=subprocess.DEVNULL, stdout=open(tmp / "slowmock.log", "wb"), stderr=subprocess.STDOUT)
        plain_lua = bench.write_lua(tmp, "chat", bench.CHAT_BODY, bench.TOKEN)
        governed_lua = bench.write_lua(tmp, "governed", bench.CHAT_BODY, bench.GOV_TOKEN)
        direct = f"http://127.0.0.1:{mock_port}/v1/chat/completions"
        res["direct_1"] = latency(direct, plain_lua, args.duration)
        res["direct_32"] = bench.run_wrk(direct, plain_lua, 32, args.duration, None)

        for workers in (1, 2):
            run = tmp / f"w{workers}"
            run.mkdir()
            api_port, ui_port = bench.free_port(), bench.free_port()
            env = bench.proxy_env(run, api_port, ui_port, mock_port)
            env["CLLAMA_WORKERS"] = str(workers)
            bench.log(f"{workers} worker(s)")
            proxy = start_proxy(run, env, api_port)
            wait_ready(api_port)
            url = f"http://127.0.0.1:{api_port}/v1/chat/completions"
            res[f"rps_w{workers}"] = throughput(url, plain_lua, args.duration, proxy)
            time.sleep(1.0)
            res[f"streams_w{workers}"] = streamload.run(
                api_port, "/v1/chat/completions", bench.SLOW_STREAM_BODY, bench.TOKEN, args.streams, args.hold,
                expect=bench.SLOW_CHUNKS + 1)
            res[f"budgeted_sqlite_w{workers}"] = latency(url, governed_lua, args.duration)
            res[f"plain_sqlite_w{workers}"] = latency(url, plain_lua, args.duration)
            bench.stop(proxy, grace=40)

        if not args.no_postgres:
            from cllama_tx.testing.postgres import PostgresCluster

            cluster = PostgresCluster()
            cluster.start()
            run = tmp / "pg"
            run.mkdir()
            api_port, ui_port = bench.free_port(), bench.free_port()
            env = bench.proxy_env(run, api_port, ui_port, mock_port)
            env["CLLAMA_DATABASE_URL"] = cluster.database()
            proxy = start_proxy(run, env, api_port)
            wait_ready(api_port)
            url = f"http://127.0.0.1:{api_port}/v1/chat/completions"
            res["budgeted_postgres"] = latency(url, governed_lua, args.duration)
            res["plain_postgres"] = latency(url, plain_lua, args.duration)
            res["rps_postgres"] = throughput(url, plain_lua, args.duration, proxy)
            bench.stop(proxy, grace=40)
    finally:
        bench.stop_all()
        if cluster is not None:
            cluster.destroy()

    for r in res.values():
        if isinstance(r, dict):
            r.pop("raw", None)
    out = bench.RESULTS / f"fleet-{time.strftime('%Y%m%d-%H%M%S')}.json"
    bench.RESULTS.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(report(res))
    bench.log(f"results in {out}")
    return 0 if all(r.get("ok", True) for r in res.values() if isinstance(r, dict)) else 1


def _ms(us) -> str:
    return "-" if us is None else f"{us / 1000:.2f}"


def report(res: dict) -> str:
    d1 = res["direct_1"]
    lines = [f"## Fleet lanes ({res['when']}, one run)", ""]
    w1, w2 = res.get("rps_w1", {}), res.get("rps_w2", {})
    ratio = w2.get("rps", 0) / w1["rps"] if w1.get("rps") else None
    lines += [
        "| lane | 1 worker | 2 workers | ratio |",
        "|---|---|---|---|",
        f"| requests/s at 32 clients (direct nginx: {res['direct_32'].get('rps', 0):,.0f}) | "
        f"{w1.get('rps', 0):,.0f} | {w2.get('rps', 0):,.0f} | {ratio:.2f}x |" if ratio else "| requests/s | - | - | - |",
        f"| CPU per request (us, all processes) | {w1.get('cpu_us_per_req') or 0:.0f} | "
        f"{w2.get('cpu_us_per_req') or 0:.0f} | |",
    ]
    s1, s2 = res.get("streams_w1", {}), res.get("streams_w2", {})
    for key, label in (("ttfb_p50_ms", "first event p50"), ("ttfb_p99_ms", "first event p99"),
                       ("gap_p99_ms", "gap between events p99")):
        a, b = s1.get(key), s2.get(key)
        lines.append(f"| {res['args']['streams']:,} streams: {label} (ms) | {a or 0:.1f} | {b or 0:.1f} | "
                     f"{(a / b) if a and b else 0:.2f}x |")
    lines.append(f"| streams held / completed | {s1.get('completed', 0):,} ({'ok' if s1.get('ok') else 'errors'}) | "
                 f"{s2.get('completed', 0):,} ({'ok' if s2.get('ok') else 'errors'}) | |")
    lines += ["", "| one client, added to direct (ms) | p50 | p99 |", "|---|---|---|"]
    for key, label in (("plain_sqlite_w1", "plain, SQLite, 1 worker"),
                       ("budgeted_sqlite_w1", "budgeted, SQLite, 1 worker (in-process budgets)"),
                       ("plain_sqlite_w2", "plain, SQLite, 2 workers"),
                       ("budgeted_sqlite_w2", "budgeted, SQLite, 2 workers (shared budgets in the file)"),
                       ("plain_postgres", "plain, PostgreSQL"),
                       ("budgeted_postgres", "budgeted, PostgreSQL (shared budgets)")):
        r = res.get(key)
        if not r or not r.get("ok"):
            continue
        lines.append(f"| {label} | {_ms(r['p50_us'] - d1['p50_us'])} | {_ms(r['p99_us'] - d1['p99_us'])} |")
    if res.get("rps_postgres"):
        lines.append("")
        lines.append(f"One worker on PostgreSQL at 32 clients: {res['rps_postgres'].get('rps', 0):,.0f} requests/s.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
