#!/usr/bin/env python3
"""
LiteLLM's proxy as a comparison column for the cllama_tx benchmark.

The team's bar quotes LiteLLM's figures from an earlier measurement; this
module measures them in the same run, the same way as cllama_tx: LiteLLM's
proxy on the proxy core (one worker), the same nginx mock behind it, the same
wrk lanes in front of it.  LiteLLM is installed into its own virtualenv
(C{bench/.litellm-venv}, not tracked), reused by later runs, so that its
large dependency tree never meets the project's.

bench.py drives it with C{run(...)}; C{python bench/litellm_lane.py} runs it
alone (nginx mock, direct lanes, LiteLLM lanes) as a quick check.

Every function that needs bench.py's helpers (C{start}, C{stop}, C{run_wrk},
C{write_lua}, C{http}, ...) takes that module as its first argument C{b}:
bench.py runs as C{__main__}, and importing it again would make a second copy
whose list of children its exit handler would not see.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# A fixed release, so that every run measures the same LiteLLM and a newer
# upload is never installed unseen (LiteLLM had releases pulled from PyPI
# after they were found compromised).  BENCH_LITELLM_SPEC overrides it.
LITELLM_SPEC = os.environ.get("BENCH_LITELLM_SPEC", "litellm[proxy]==1.102.4")
VENV = Path(os.environ.get("BENCH_LITELLM_VENV", HERE / ".litellm-venv"))
MARKER = ".bench-installed"  # written last: a venv without it is a broken install
INSTALL_TIMEOUT = 1200.0

MODEL = "gpt-4o-mini"  # the name clients use; routed to openai/gpt-4o-mini
MASTER_KEY = "sk-litellm-bench-master"
BODY = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
MOCK_ID = "chatcmpl-benchmock"
LANES = ("latency_litellm", "throughput_litellm")

# Anything LiteLLM would fetch from the internet goes to this closed loopback
# port instead, and fails at once rather than hanging on a connect timeout.
DEAD_PROXY = "http://127.0.0.1:9"


class Unavailable(Exception):
    """LiteLLM could not be installed, started or reached the mock."""


def _say(log, msg: str) -> None:
    (log or (lambda m: print(f"litellm: {m}", file=sys.stderr, flush=True)))(msg)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR") or "rror:" in line]
    return (errors or lines or ["(no output)"])[-1][:300]


def _dir_mib(path: Path) -> float:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total / 2**20


# ---------------------------------------------------------------- install

def install(venv: Path = VENV, spec: str = LITELLM_SPEC, log=None) -> tuple[str | None, str]:
    """
    LiteLLM's proxy in its own virtualenv, installed once and reused.

    Returns (path of the C{litellm} executable, one-line summary), or (None,
    one-line reason) when it cannot be had: the benchmark goes on without it.
    """
    exe = venv / "bin" / "litellm"
    marker = venv / MARKER
    if exe.exists() and marker.exists() and marker.read_text().strip() == spec:
        return str(exe), f"{spec} (cached in {venv})"
    if venv.exists():
        _say(log, f"{venv} is incomplete or holds another version: reinstalling")
        shutil.rmtree(venv, ignore_errors=True)
    _say(log, f"installing {spec} into {venv} (once; later runs reuse it)")
    t0 = time.monotonic()
    steps = (
        ("python -m venv", [sys.executable, "-m", "venv", str(venv)]),
        (f"pip install {spec}", [str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                                 "--disable-pip-version-check", "--no-input", spec]),
    )
    for what, cmd in steps:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT,
                               stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as e:
            shutil.rmtree(venv, ignore_errors=True)
            return None, f"{what} failed: {e}"
        if r.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            return None, f"{what} failed: {_last_line(r.stdout + r.stderr)}"
    if not exe.exists():
        shutil.rmtree(venv, ignore_errors=True)
        return None, f"{spec} installed no `litellm` executable"
    marker.write_text(spec + "\n")
    secs = time.monotonic() - t0
    msg = f"{spec} installed in {secs:.0f} s ({_dir_mib(venv):.0f} MiB in {venv})"
    _say(log, msg)
    return str(exe), msg


# ---------------------------------------------------------------- start

def config(mock_port: int) -> dict:
    """One model routed to the mock; a master key; nothing that wants a database."""
    return {
        "model_list": [{
            "model_name": MODEL,
            "litellm_params": {
                "model": f"openai/{MODEL}",
                "api_base": f"http://127.0.0.1:{mock_port}/v1",
                "api_key": "sk-bench-not-real",
            },
        }],
        "litellm_settings": {"telemetry": False, "num_retries": 0, "request_timeout": 30},
        "general_settings": {"master_key": MASTER_KEY, "disable_spend_logs": True},
    }


def env(tmp: Path) -> dict:
    """
    The environment LiteLLM runs in: the user's provider keys and database
    settings left out, the bundled cost map instead of a download, no
    telemetry, and any other outbound HTTP(S) sent to a dead loopback port.
    """
    keep = {
        k: v for k, v in os.environ.items()
        if not re.match(r"^(OPENAI|ANTHROPIC|OPENROUTER|XAI|GEMINI|GOOGLE|AZURE|AWS|COHERE|MISTRAL|"
                        r"HUGGINGFACE|HF|LITELLM|DATABASE|DIRECT_URL|REDIS|LANGFUSE|DD|SENTRY)_", k)
        and k not in ("DATABASE_URL", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
        and not k.lower().endswith("_proxy")
    }
    keep.update({
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # the cost map in the package, not a download
        "LITELLM_MODE": "PRODUCTION",            # no .env loading from the working directory
        "LITELLM_LOG": "ERROR",
        "DISABLE_ADMIN_UI": "True",
        "HF_HUB_OFFLINE": "1",                   # tokenizers never fetched from a hub
        "HTTP_PROXY": DEAD_PROXY, "HTTPS_PROXY": DEAD_PROXY,
        "http_proxy": DEAD_PROXY, "https_proxy": DEAD_PROXY,
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
        "HOME": str(tmp),                        # caches it may write stay in the run's directory
        "PYTHONUNBUFFERED": "1",
    })
    return keep


def start_litellm(b, exe: str, tmp: Path, mock_port: int, core, wait_s: float = 120.0):
    """
    Start LiteLLM's proxy (one worker, pinned to C{core}) in front of the
    mock; return (Popen, port) once C{/health/readiness} answers 200.
    Raises L{Unavailable} with the end of its log when it does not.
    """
    d = tmp / "litellm"
    d.mkdir(parents=True, exist_ok=True)
    cfg = d / "config.yaml"
    cfg.write_text(json.dumps(config(mock_port), indent=2))  # JSON is YAML
    port = b.free_port()
    log_path = d / "litellm.log"
    cmd = [exe, "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1",
           "--telemetry", "False"]
    p = b.start(b.pinned(core, cmd), cwd=str(d), env=env(d), stdin=subprocess.DEVNULL,
                stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + wait_s
    last = "no answer"
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise Unavailable(f"LiteLLM exited with status {p.returncode} before it was ready; "
                              f"its log ends with:\n{b.tail(log_path)}")
        try:
            status, _, body = b.http("GET", f"http://127.0.0.1:{port}/health/readiness", timeout=2)
            if status == 200:
                return p, port
            last = f"status {status}: {body[:200]!r}"
        except OSError as e:
            last = str(e)
        time.sleep(0.25)
    b.stop(p)
    raise Unavailable(f"GET /health/readiness did not answer 200 within {wait_s:.0f} s (last: {last}); "
                      f"its log ends with:\n{b.tail(log_path)}")


def installed_version(venv: Path = VENV) -> str | None:
    """LiteLLM's version from its dist-info (importing it takes seconds)."""
    found = sorted(venv.glob("lib/python*/site-packages/litellm-*.dist-info"))
    return found[-1].name[len("litellm-"):-len(".dist-info")] if found else None


# ---------------------------------------------------------------- lanes

def verify(b, port: int, tmp: Path) -> None:
    """One request must come back from the mock, not from a LiteLLM error path."""
    headers = {"Authorization": f"Bearer {MASTER_KEY}", "Content-Type": "application/json"}
    try:
        status, _, body = b.http("POST", f"http://127.0.0.1:{port}/v1/chat/completions",
                                 BODY.encode(), headers, timeout=30)
    except OSError as e:
        raise Unavailable(f"POST /v1/chat/completions through LiteLLM failed: {e}\n"
                          f"{b.tail(tmp / 'litellm' / 'litellm.log')}") from None
    if status != 200 or MOCK_ID.encode() not in body:
        raise Unavailable(f"POST /v1/chat/completions through LiteLLM answered {status}: {body[:500]!r}\n"
                          f"its log ends with:\n{b.tail(tmp / 'litellm' / 'litellm.log')}")


def run_lanes(b, port: int, tmp: Path, duration: float, core, pid: int | None = None,
              warmup: float = 2.0, lane=None) -> dict:
    """
    The latency (1 client) and throughput (32 clients) lanes through LiteLLM,
    with wrk and a body like bench.py's CHAT_BODY (LiteLLM's model name, its
    master key as the bearer token).  Returns {lane name: run_wrk's dict}.

    C{lane(name, fn, pid)} wraps each measurement (bench.py passes its own,
    which waits for quiet cores and checks for noise, counting C{pid}'s CPU
    as the proxy's) and must return fn's dict.
    """
    lane = lane or (lambda name, fn, pid: fn())
    verify(b, port, tmp)
    lua = b.write_lua(tmp, "litellm", BODY, MASTER_KEY)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    if warmup > 0:
        b.run_wrk(url, lua, 4, warmup, core, latency=False)
    return {
        "latency_litellm": lane("latency_litellm",
                                lambda: b.run_wrk(url, lua, 1, duration, core, pid=pid), pid),
        "throughput_litellm": lane("throughput_litellm",
                                   lambda: b.run_wrk(url, lua, 32, duration, core, pid=pid), pid),
    }


def run(b, tmp: Path, mock_port: int, proxy_core, load_core, duration: float, warmup: float = 2.0,
        lane=None, log=None) -> dict:
    """
    Install (or reuse), start, verify, measure and stop LiteLLM.  Returns
    {"litellm": {"available": bool, "version", "install" | "reason"}} plus,
    when it ran, the two lane dicts; never raises for LiteLLM's own failures.
    """
    exe, note = install(log=log)
    if exe is None:
        _say(log, f"LiteLLM not available: {note}")
        return {"litellm": {"available": False, "reason": note}}
    p = None
    try:
        p, port = start_litellm(b, exe, tmp, mock_port, proxy_core)
        info = {"available": True, "install": note, "spec": LITELLM_SPEC,
                "version": installed_version(Path(exe).parent.parent), "pid": p.pid}
        _say(log, f"LiteLLM {info['version']} (pid {p.pid}) on 127.0.0.1:{port}: /health/readiness answered 200")
        out = run_lanes(b, port, tmp, duration, load_core, pid=p.pid, warmup=warmup, lane=lane)
        if p.poll() is not None:
            info["exited"] = f"LiteLLM exited with status {p.returncode} during the lanes"
        try:
            info["rss_kib"] = int(Path(f"/proc/{p.pid}/status").read_text().split("VmRSS:")[1].split()[0])
        except (OSError, IndexError, ValueError):
            pass
        out["litellm"] = info
        return out
    except (Unavailable, OSError) as e:
        reason = str(e)
        _say(log, f"LiteLLM not available: {reason}")
        return {"litellm": {"available": False, "install": note, "reason": reason.splitlines()[0],
                            "log_tail": reason}}
    finally:
        if p is not None:
            b.stop(p)


# ---------------------------------------------------------------- report

def _ok(r) -> bool:
    return bool(r) and bool(r.get("ok"))


def column(res: dict) -> dict[str, str]:
    """
    The LiteLLM cells of bench.py's main table, keyed by the row's metric
    (C{"p50 ms"}, C{"p99 ms"}, C{"req/s"}, C{"µs"}): value, then added to or
    ratio of the direct lane of the same run.
    """
    info = res.get("litellm") or {}
    if not info.get("available"):
        return {"p50 ms": "not available"} if info else {}
    out = {}
    ld, ll = res.get("latency_direct"), res.get("latency_litellm")
    for q in ("p50", "p99"):
        if _ok(ll):
            v = ll[f"{q}_us"] / 1000
            out[f"{q} ms"] = f"{v:.3f} (+{v - ld[f'{q}_us'] / 1000:.3f} ms)" if _ok(ld) else f"{v:.3f}"
        elif ll is not None:
            out[f"{q} ms"] = "FAILED"
    td, tl = res.get("throughput_direct"), res.get("throughput_litellm")
    if _ok(tl):
        out["req/s"] = f"{tl['rps']:.0f}" + (f" ({tl['rps'] / td['rps']:.3f}× of direct)" if _ok(td) else "")
        if tl.get("cpu_us_per_req") is not None:
            out["µs"] = f"{tl['cpu_us_per_req']:.0f}"
    elif tl is not None:
        out["req/s"] = "FAILED"
    for lane, key in ((ll, "p50 ms"), (tl, "req/s")):
        if _ok(lane) and lane.get("noisy") and key in out:
            out[key] += ", noisy"
    return out


def summary(res: dict) -> str:
    """One line on what the LiteLLM column is, or why it is empty."""
    info = res.get("litellm")
    if not info:
        return ""
    if not info.get("available"):
        return f"LiteLLM: not available: {info.get('reason')}"
    failed = [f"{k}: {res[k].get('error')}" for k in LANES if res.get(k) and not res[k].get("ok")]
    rss = f", RSS {info['rss_kib'] / 1024:.0f} MiB after the lanes" if info.get("rss_kib") else ""
    tl = res.get("throughput_litellm") or {}
    if "core0" in tl:
        rss += (f"; core 0 during its 32-client lane: LiteLLM {tl['core0']['proxy_pct']:.0f}%, "
                f"others {tl['core0']['others_pct']:.0f}%")
    counts = [f"{k.replace('_', ' ')}: {res[k].get('requests', 0):.0f}" for k in LANES if res.get(k)]
    if counts:
        rss += "; requests " + ", ".join(counts)
    return (f"LiteLLM column: LiteLLM {info.get('version')} proxy (`{info.get('spec', LITELLM_SPEC)}` in its "
            f"own virtualenv), one uvicorn worker pinned to the proxy's core, measured after cllama_tx was stopped, "
            f"behind the same nginx mock with the same wrk lanes (model `{MODEL}` routed to "
            f"`openai/{MODEL}`, master key as the bearer token, no database, local cost map){rss}."
            + (" FAILED lanes: " + "; ".join(failed) if failed else "")
            + (f" {info['exited']}." if info.get("exited") else ""))


def bar_row(res: dict) -> list[str] | None:
    """A row for the bar table: LiteLLM measured in this run."""
    info = res.get("litellm") or {}
    ld, ll, tl = res.get("latency_direct"), res.get("latency_litellm"), res.get("throughput_litellm")
    if not info.get("available") or not (_ok(ld) and _ok(ll)):
        return None
    added = (ll["p50_us"] - ld["p50_us"]) / 1000
    return [f"**LiteLLM {info.get('version')}, this run**", f"{added:.3f}",
            f"{tl['rps']:,.0f}" if _ok(tl) else "–"]


# ---------------------------------------------------------------- alone

def main(argv=None) -> int:
    """Nginx mock, the direct lanes and the LiteLLM lanes, without cllama_tx."""
    import argparse
    import tempfile

    sys.path.insert(0, str(HERE))
    import bench as b  # not __main__ here: one copy, one list of children

    ap = argparse.ArgumentParser(prog="python bench/litellm_lane.py",
                                 description="Measure LiteLLM's proxy against bench.py's nginx mock.")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per lane [default 5]")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of unmeasured load first [default 2]")
    ap.add_argument("--install-only", action="store_true", help="install (or find) LiteLLM and stop")
    args = ap.parse_args(argv)

    exe, note = install(log=b.log)
    print(f"install: {note}")
    if args.install_only or exe is None:
        return 0 if exe else 3

    usable = sorted(os.sched_getaffinity(0))
    pin = len(usable) >= 2 and 0 in usable and 1 in usable
    proxy_core, load_core = (b.PROXY_CORE, b.LOAD_CORE) if pin else (None, None)
    if pin:
        os.sched_setaffinity(0, {1})
    tmp = Path(tempfile.mkdtemp(prefix="litellm-bench-"))
    res: dict = {}
    try:
        mock_port = b.free_port()
        b.start_nginx(tmp, mock_port, load_core)
        lua = b.write_lua(tmp)
        direct = f"http://127.0.0.1:{mock_port}/v1/chat/completions"
        print(f"load average before: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
        b.wait_quiet(20.0, window=1.0)
        res["latency_direct"] = b.run_wrk(direct, lua, 1, args.duration, load_core)
        res["throughput_direct"] = b.run_wrk(direct, lua, 32, args.duration, load_core)

        def quiet_lane(name, fn, pid):
            """Like bench.py's lanes: wait (a little) for other people's work to leave the cores idle."""
            busy, quiet = b.wait_quiet(20.0, window=1.0)
            r = fn()
            r["busy_before"], r["quiet_before"] = busy, quiet
            return r

        res.update(run(b, tmp, mock_port, proxy_core, load_core, args.duration, args.warmup,
                       lane=quiet_lane, log=b.log))
        print(f"load average after: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    finally:
        b.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)

    info = res.get("litellm", {})
    if not info.get("available"):
        print(f"LiteLLM not available: {info.get('reason')}")
        return 1
    ld, ll, td, tl = (res.get(k) or {} for k in ("latency_direct", "latency_litellm",
                                                  "throughput_direct", "throughput_litellm"))
    print(f"LiteLLM {info.get('version')}; RSS after the lanes {info.get('rss_kib', 0) / 1024:.0f} MiB")
    for q in ("p50", "p99"):
        if ld.get("ok") and ll.get("ok"):
            d, lite = ld[f"{q}_us"] / 1000, ll[f"{q}_us"] / 1000
            print(f"latency, 1 client, {q}: direct {d:.3f} ms, LiteLLM {lite:.3f} ms, added {lite - d:+.3f} ms")
    if td.get("ok") and tl.get("ok"):
        print(f"throughput, 32 clients: direct {td['rps']:,.0f} req/s, LiteLLM {tl['rps']:,.0f} req/s "
              f"({tl.get('cpu_us_per_req') or 0:,.0f} µs CPU per request)")
    for k in LANES:
        if res.get(k) and not res[k].get("quiet_before", True):
            print(f"{k}: other processes kept {res[k]['busy_before']:.2f} cores busy before it (noisy)")
    for k in ("latency_direct", "throughput_direct", *LANES):
        if res.get(k) and not res[k].get("ok"):
            print(f"{k} FAILED: {res[k].get('error')}")
    return 0 if all(res.get(k, {}).get("ok") for k in LANES) else 1


if __name__ == "__main__":
    sys.exit(main())
