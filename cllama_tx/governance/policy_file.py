"""
The operator policy file (C{CLLAMA_POLICY_FILE}): per-agent budgets in the
shape budget-tier gateways use, mapped to our budget objects.

    cost_routing:
      agents:
        <agent-id>:
          budget_total: 50          # -> limit_usd
          budget_spent: 12.5        # -> spent_offset_usd (this period)
          period: monthly           # -> period (daily|weekly|monthly), none or
                                    #    lifetime -> period lifetime, or a
                                    #    duration such as "24h" -> window
          hard_cap: true            # true -> hard_stop, else soft_alert
          max_requests: 1000        # optional, passed through
          tiers:                    # -> tiers
            - {threshold: 0.5, models: [anthropic/claude-sonnet-4-5]}
            - {threshold: 0.0, models: [anthropic/claude-haiku-4-5]}

String values may use C{${VAR}} (error when unset) and C{${VAR:-default}}
(default when unset or empty; C{${VAR-default}}: when unset); C{$$} is a
literal C{$}.  Interpolation happens after parsing, in string values only,
so a variable cannot inject structure; numbers and booleans given as
strings (C{budget_total: "${AGENT_BUDGET:-50}"}) are converted.

The file is YAML (needs PyYAML, imported only when a YAML file is read); a
file whose first non-blank character is C{{} is read as JSON without it.

A file with a C{cost_routing.openrouter} section is the Execwall OR gate's
own C{policy.yaml}: its agents are read as the gate reads them
(L{cllama_tx.governance.gate_policy}).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from cllama_tx.governance.budgets import HARD_STOP, SOFT_ALERT, parse_budget
from cllama_tx.governance.periods import LIFETIME, PERIODS, BudgetError, parse_window
from cllama_tx.store.jsonfile import UnreadableFile, read_text_file

POLICY_FILE_ENV = "CLLAMA_POLICY_FILE"

MAX_POLICY_FILE_BYTES = 1024 * 1024

DEFAULT_PERIOD = "monthly"

_AGENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
_AGENT_KEYS = frozenset({"budget_total", "budget_spent", "period", "hard_cap", "tiers", "max_requests"})
# The OR gate's informational keys: known, not budget settings (its console API reports them).
_GATE_INFO_KEYS = frozenset({"budget_source", "period_reset"})
#: C{period: none} (the OR gate's word) is a lifetime budget.
_LIFETIME_WORDS = frozenset({"none", LIFETIME})
_VARIABLE = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\})")
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


class PolicyFileError(BudgetError):
    """The policy file cannot be read, parsed or mapped; the message says where."""


# --------------------------------------------------------------------------
# Interpolation


def interpolate(value: Any, env: Mapping[str, str], where: str = "") -> Any:
    """
    C{value} (parsed YAML/JSON) with C{${VAR}}, C{${VAR:-default}},
    C{${VAR-default}} and C{$$} replaced in every string value (not in
    mapping keys).

    @raise PolicyFileError: C{${VAR}} names an unset variable.
    """
    if isinstance(value, str):
        return _interpolate_string(value, env, where)
    if isinstance(value, list):
        return [interpolate(v, env, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: interpolate(v, env, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    return value


def _interpolate_string(text: str, env: Mapping[str, str], where: str) -> str:
    def replace(match: re.Match) -> str:
        if match.group(1):
            return "$"
        name, operator, default = match.group(2), match.group(3), match.group(4)
        value = env.get(name)
        if operator == ":-" and not value:
            return default
        if operator == "-" and value is None:
            return default
        if value is None:
            raise PolicyFileError(
                f"{where or 'value'}: environment variable {name} is not set "
                f"(write ${{{name}:-default}} to give a default)"
            )
        return value

    return _VARIABLE.sub(replace, text)


# --------------------------------------------------------------------------
# Mapping


def _amount(value: Any, where: str, positive: bool) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise PolicyFileError(f"{where}: {value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PolicyFileError(f"{where}: must be a number")
    if positive and value <= 0:
        raise PolicyFileError(f"{where}: must be greater than 0")
    if value < 0:
        raise PolicyFileError(f"{where}: must not be negative")
    return float(value)


def _flag(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise PolicyFileError(f"{where}: must be true or false")


def _threshold(value: Any) -> Any:
    # Numbers and "80%" are checked by parse_tiers; plain numeric strings
    # (from interpolation) become numbers here.
    if isinstance(value, str) and not value.strip().endswith("%"):
        try:
            return float(value.strip())
        except ValueError:
            return value
    return value


def agent_budget(entry: Any, where: str, warnings: list[str] | None = None) -> dict:
    """The raw budget object for one C{cost_routing.agents.<id>} entry."""
    if not isinstance(entry, dict):
        raise PolicyFileError(f"{where}: must be a mapping")
    known = _AGENT_KEYS | _GATE_INFO_KEYS
    for key in sorted(str(k) for k in entry if k not in known and not str(k).startswith("_")):
        if warnings is not None:
            warnings.append(f"{where}: unknown key {key!r} ignored")
    if entry.get("budget_total") is None:
        raise PolicyFileError(f"{where}: 'budget_total' is required")
    budget: dict[str, Any] = {
        "limit_usd": _amount(entry["budget_total"], f"{where}.budget_total", positive=True),
        "behavior": HARD_STOP if _flag(entry.get("hard_cap", False), f"{where}.hard_cap") else SOFT_ALERT,
    }
    spent = entry.get("budget_spent")
    if spent is not None:
        spent = _amount(spent, f"{where}.budget_spent", positive=False)
        if spent:
            budget["spent_offset_usd"] = spent
    period = entry.get("period")
    if period is None or (isinstance(period, str) and not period.strip()):
        period = DEFAULT_PERIOD
    if not isinstance(period, str):
        raise PolicyFileError(f"{where}.period: must be one of {', '.join(PERIODS)} or a duration")
    if period.strip().lower() in _LIFETIME_WORDS:
        budget["period"] = LIFETIME
    elif period.strip().lower() in PERIODS:
        budget["period"] = period.strip().lower()
    else:
        try:
            parse_window(period)
        except BudgetError:
            raise PolicyFileError(
                f"{where}.period: {period!r} is not one of {', '.join(PERIODS)} nor a duration such as \"24h\""
            ) from None
        budget["window"] = period.strip()
    max_requests = entry.get("max_requests")
    if max_requests is not None:
        count = _amount(max_requests, f"{where}.max_requests", positive=True)
        if count != int(count):
            raise PolicyFileError(f"{where}.max_requests: must be a whole number")
        budget["max_requests"] = int(count)
    tiers = entry.get("tiers")
    if tiers is not None:
        if not isinstance(tiers, list):
            raise PolicyFileError(f"{where}.tiers: must be a list")
        mapped = []
        for tier in tiers:
            if isinstance(tier, dict):
                tier = dict(tier)
                if "threshold" in tier:
                    tier["threshold"] = _threshold(tier["threshold"])
            mapped.append(tier)
        budget["tiers"] = mapped
    # Validate now, with the file's location in the message.
    try:
        parse_budget(budget)
    except PolicyFileError:
        raise
    except BudgetError as e:
        raise PolicyFileError(f"{where}: {e}") from None
    return budget


def policy_budgets(
    doc: Any,
    source: str = "policy file",
    warnings: list[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> dict[str, dict]:
    """
    C{{agent_id: raw budget}} of a parsed policy document, interpolating
    C{env} (when given) into C{cost_routing.agents} only.  Top-level keys
    other than C{cost_routing}, and keys of C{cost_routing} other than
    C{agents}, are ignored (the file may be shared with a gateway).

    @raise PolicyFileError: the shape or a value is wrong.
    """
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise PolicyFileError(f"{source}: must be a mapping at the top level")
    routing = doc.get("cost_routing")
    if routing is None:
        return {}
    if not isinstance(routing, dict):
        raise PolicyFileError(f"{source}: 'cost_routing' must be a mapping")
    return {
        agent_id: agent_budget(entry, f"{source}: cost_routing.agents.{agent_id}", warnings)
        for agent_id, entry in agent_entries(routing, source, env).items()
    }


def agent_entries(routing: dict, source: str, env: Mapping[str, str] | None) -> dict[str, Any]:
    """
    C{{agent_id: entry}} of C{cost_routing.agents}, interpolated (when
    C{env} is given), every agent id checked.

    @raise PolicyFileError: the section is not a mapping, or an id is not valid.
    """
    agents = routing.get("agents")
    if agents is None:
        return {}
    if not isinstance(agents, dict):
        raise PolicyFileError(f"{source}: 'cost_routing.agents' must map agent ids to budgets")
    if env is not None:
        try:
            agents = interpolate(agents, env, "cost_routing.agents")
        except PolicyFileError as e:
            raise PolicyFileError(f"{source}: {e}") from None
    entries: dict[str, Any] = {}
    for raw_id, entry in agents.items():
        agent_id = str(raw_id) if isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool) else None
        if agent_id is None or not _AGENT_ID.match(agent_id):
            raise PolicyFileError(f"{source}: {raw_id!r} is not a valid agent id")
        entries[agent_id] = entry
    return entries


# --------------------------------------------------------------------------
# Loading


def _import_yaml() -> Any:
    try:
        import yaml
    except ImportError:
        raise PolicyFileError(
            f"{POLICY_FILE_ENV} names a YAML file, but PyYAML is not installed: "
            f"install it (pip install pyyaml), or write the file as JSON"
        ) from None
    return yaml


def _read(path: str) -> str:
    try:
        signature, text = read_text_file(path, MAX_POLICY_FILE_BYTES)
    except UnreadableFile as e:
        raise PolicyFileError(f"{path}: {e}") from None
    if text is None:
        raise PolicyFileError(f"{path}: does not exist")
    return text


def parse_policy_text(text: str, source: str) -> Any:
    """Parse the file's text: JSON when it starts with C{{}, else YAML."""
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except ValueError as e:
            raise PolicyFileError(f"{source}: is not valid JSON ({e})") from None
    yaml = _import_yaml()
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PolicyFileError(f"{source}: is not valid YAML ({e})") from None


def load_policy_file(
    path: str, env: Mapping[str, str], warnings: list[str] | None = None
) -> dict[str, dict]:
    """
    Read C{path} and return C{{agent_id: raw budget object}} (see the
    module docstring for the mapping).  C{env} is the environment used for
    interpolation (usually C{os.environ}).  Blocking I/O: call at start or
    from a thread.

    @raise PolicyFileError: the file is missing, unreadable, too large, not
        UTF-8, not parseable, not in the expected shape, uses an unset
        variable, or PyYAML is needed but missing.
    """
    text = _read(path)
    doc = parse_policy_text(text, path)
    return policy_budgets(doc, path, warnings, env)
