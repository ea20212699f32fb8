"""
Per-request cost of model resolution (cllama_tx.governance.resolution), in
process: what the request path pays for each rule of the order, against the
registry the daemon builds and a model table of 200 entries, next to the
policy decision alone (what the path paid before resolution existed); and
the same router with the model mappings (1,000 stored) and the resolution
trace attached, as the daemon runs it, with the two mapping rules.

    .venv/bin/python bench/probe_resolution.py [--seconds 0.5]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import timeit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.task import Clock  # noqa: E402

from cllama_tx.accounting.pricing import Pricing  # noqa: E402
from cllama_tx.governance.mappings import LLM, OPERATOR, ModelMapping  # noqa: E402
from cllama_tx.governance.policy import decide, parse_policy  # noqa: E402
from cllama_tx.governance.resolution import Router  # noqa: E402
from cllama_tx.governance.resolution_trace import ResolutionTrace  # noqa: E402
from cllama_tx.identity.principals import KeyPrincipal, MasterPrincipal  # noqa: E402
from cllama_tx.identity.virtual_keys import VirtualKey  # noqa: E402
from cllama_tx.providers.model_table import ModelTableFile  # noqa: E402
from cllama_tx.providers.registry import ProviderRegistry  # noqa: E402


class Agent:
    agent_id = "bench"
    model_policy = None


class Mappings:
    """The mapping store's memory, as the router reads it."""

    def __init__(self, count: int) -> None:
        self.current = {f"name-{i}": ModelMapping(f"name-{i}", "openai/gpt-4o", LLM, 0.0, 0.0) for i in range(count)}
        self.current["my-llama"] = ModelMapping("my-llama", "openai/gpt-4o-mini", OPERATOR, 0.0, 0.0, 0.0)


class Exchange:
    request_id = "0123456789abcdef"
    resolve_hints = None


def table_file(entries: int) -> str:
    lines = ["model_list:"]
    for i in range(entries):
        lines += [f"  - model_name: model-{i}", "    litellm_params:", f"      model: openai/gpt-4o-{i}"]
    lines += ["  - model_name: gpt-4", "    litellm_params:", "      model: openai/gpt-4o"]
    fd, path = tempfile.mkstemp(suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--seconds", type=float, default=0.5, help="time per case")
    args = parser.parse_args()
    clock = Clock()
    env = {"OPENAI_API_KEY": "sk-bench-1", "ANTHROPIC_API_KEY": "sk-bench-2", "OPENROUTER_API_KEY": "sk-bench-3"}
    registry = ProviderRegistry(env, None, clock)
    pricing = Pricing(clock)
    path = table_file(200)
    try:
        table = ModelTableFile(path, env, clock, registry=registry, pricing=pricing)
    finally:
        os.unlink(path)
    key = KeyPrincipal(VirtualKey("h" * 64, "sk-...abcd", team_id="acme", aliases={"fast": "gpt-4o-mini"}))
    router = Router(providers=registry, table=table, team_aliases=lambda team: {"smart": "gpt-4"}, pricing=pricing)
    policy = parse_policy({"allowed": [{"slot": "primary", "ref": "anthropic/claude-sonnet-4-5"},
                                       {"slot": "fallback", "ref": "anthropic/claude-haiku-4-5"}]})
    agent, master = Agent(), MasterPrincipal()
    routed = Router(providers=registry, table=table, team_aliases=lambda team: {"smart": "gpt-4"}, pricing=pricing)
    routed.attach(mappings=Mappings(1000), trace=ResolutionTrace(clock))
    ex = Exchange()
    cases = [
        ("before: policy decision, exact ref (no policy)", lambda: decide(None, "openai/gpt-4o")),
        ("exact ref of a configured provider", lambda: router.resolve(agent, "openai/gpt-4o", None, None)),
        ("bare name, family (gpt-4o)", lambda: router.resolve(agent, "gpt-4o", None, None)),
        ("bare name on /v1/messages (claude-...)", lambda: router.resolve(agent, "claude-sonnet-4-5", None, "anthropic")),
        ("model table name (gpt-4, 201 entries)", lambda: router.resolve(agent, "gpt-4", None, None)),
        ("unconfigured vendor via OpenRouter", lambda: router.resolve(agent, "mistralai/mistral-large", None, None)),
        ("virtual key alias (fast -> gpt-4o-mini)", lambda: router.resolve(key, "fast", None, None)),
        ("team alias then table (smart -> gpt-4)", lambda: router.resolve(key, "smart", None, None)),
        ("master key, exact ref", lambda: router.resolve(master, "openai/gpt-4o", None, None)),
        ("policy agent, dated id", lambda: router.resolve(agent, "claude-haiku-4-5-20251001", policy, "anthropic")),
        ("with mappings and trace: exact ref", lambda: routed.resolve(agent, "openai/gpt-4o", None, None, ex)),
        ("with mappings and trace: family (gpt-4o)", lambda: routed.resolve(agent, "gpt-4o", None, None, ex)),
        ("with mappings and trace: table name (gpt-4)", lambda: routed.resolve(agent, "gpt-4", None, None, ex)),
        ("operator mapping, rule 2b (my-llama)", lambda: routed.resolve(agent, "my-llama", None, None, ex)),
        ("LLM mapping, rule 8 (name-7)", lambda: routed.resolve(agent, "name-7", None, None, ex)),
    ]
    print(f"{'case':48} {'us/request':>10}")
    for name, call in cases:
        call()
        timer = timeit.Timer(call)
        number, _ = timer.autorange()
        runs = max(1, int(number * args.seconds / 0.2))
        best = min(timer.repeat(repeat=5, number=runs)) / runs
        print(f"{name:48} {best * 1e6:10.2f}")


if __name__ == "__main__":
    main()
