#!/usr/bin/env python3
"""
The soak lane: does the proxy's memory stay flat under steady load?

Runs the real proxy (core 0) in front of the benchmark's nginx mock, drives
it with wrk (core 1) for C{--minutes} minutes (default 10) at C{--clients}
connections, and samples the proxy's resident set size and the ledger's
write-ahead log every C{--sample} seconds.  After C{--warmup} minutes
(default 2) it prints:

  - the RSS at the end of the warm-up, its minimum and maximum afterwards,
    and the spread (max - min), against the goal of 2 MiB;
  - the least-squares slope of RSS over the measured minutes (KiB a minute)
    and per request (bytes);
  - the WAL's largest size (the ledger checkpoints must keep it bounded).

A time series goes to C{bench/results/soak.json}.  Run it through
C{bash bench/run --soak-only} (which installs nginx and wrk), or directly
with C{.venv/bin/python bench/soak.py} when they are installed.  It stops
everything it started, also on Ctrl-C.  Exit status 0 when the spread is
within the goal, 1 when it is not, 2 when the proxy did not start.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import bench  # bench/ is on sys.path: this script's own directory

GOAL_SPREAD_MIB = 2.0


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def wal_bytes(state: Path) -> int:
    try:
        return (state / "ledger.sqlite3-wal").stat().st_size
    except FileNotFoundError:
        return 0


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    den = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=2.0, help="minutes left out of the figures")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--sample", type=float, default=5.0, help="seconds between samples")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="cllama-soak-"))
    mock_port, api_port, ui_port = bench.free_port(), bench.free_port(), bench.free_port()
    bench.start_nginx(tmp, mock_port, bench.LOAD_CORE)
    env = bench.proxy_env(tmp, api_port, ui_port, mock_port)
    try:
        proxy = bench.start_proxy(tmp, env, api_port, bench.PROXY_CORE, 30.0)
    except bench.ProxyFailed as e:
        bench.log(str(e))
        return 2
    lua = bench.write_lua(tmp)
    url = f"http://127.0.0.1:{api_port}/v1/chat/completions"
    duration = args.minutes * 60
    result: dict = {}

    def load() -> None:
        result.update(bench.run_wrk(url, lua, args.clients, duration, bench.LOAD_CORE, latency=False))

    bench.log(f"soak: {args.minutes:g} min at {args.clients} clients, sampling every {args.sample:g} s")
    started = time.monotonic()
    driver = threading.Thread(target=load, daemon=True)
    driver.start()
    samples = []
    while driver.is_alive():
        t = time.monotonic() - started
        samples.append({"t_s": round(t, 1), "rss_kib": rss_kib(proxy.pid), "wal_bytes": wal_bytes(tmp / "state")})
        driver.join(args.sample)
    bench.stop_all()

    if not result.get("ok"):
        bench.log(f"the load failed: {result.get('error')}")
        return 1
    rps = result["rps"]
    measured = [s for s in samples if s["t_s"] >= args.warmup * 60]
    if len(measured) < 2:
        bench.log("too few samples after the warm-up: run longer")
        return 1
    rss = [s["rss_kib"] for s in measured]
    spread_mib = (max(rss) - min(rss)) / 1024
    per_minute = slope([(s["t_s"] / 60, s["rss_kib"]) for s in measured])
    per_request = per_minute * 1024 / (rps * 60) if rps else 0.0
    wal_max = max(s["wal_bytes"] for s in samples)
    summary = {
        "minutes": args.minutes,
        "warmup_minutes": args.warmup,
        "clients": args.clients,
        "requests": result["requests"],
        "rps": round(rps, 1),
        "rss_after_warmup_mib": round(rss[0] / 1024, 2),
        "rss_min_mib": round(min(rss) / 1024, 2),
        "rss_max_mib": round(max(rss) / 1024, 2),
        "rss_spread_mib": round(spread_mib, 2),
        "rss_slope_kib_per_min": round(per_minute, 1),
        "rss_slope_bytes_per_request": round(per_request, 2),
        "wal_max_mib": round(wal_max / 2**20, 2),
        "goal_spread_mib": GOAL_SPREAD_MIB,
        "met": spread_mib <= GOAL_SPREAD_MIB,
    }
    bench.RESULTS.mkdir(exist_ok=True)
    (bench.RESULTS / "soak.json").write_text(json.dumps({"summary": summary, "samples": samples}, indent=1))
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        print(f"{key:<{width}}  {value}")
    return 0 if summary["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
