"""
The PostgreSQL schema, as numbered migrations.  Each runs once, in its own
transaction with the version it brings, under an advisory lock so that
instances starting together never run one twice (L{postgres.migrate}).

Columns mirror the SQLite file's (L{cllama_tx.store.ledger},
L{cllama_tx.identity.virtual_keys}) so that one set of portable statements
serves both; money and times are C{double precision}, as SQLite's REAL.
Add a migration at the end; never edit one that has shipped.
"""

from __future__ import annotations

__all__ = ["MIGRATIONS", "SCHEMA_VERSION"]

_LEDGER = """
CREATE TABLE requests (
    id BIGSERIAL PRIMARY KEY,
    request_id TEXT NOT NULL UNIQUE,
    ts DOUBLE PRECISION NOT NULL,
    agent TEXT,
    provider TEXT,
    requested_model TEXT,
    effective_model TEXT,
    status INTEGER NOT NULL,
    stream INTEGER NOT NULL,
    latency_ms DOUBLE PRECISION NOT NULL,
    ttfb_ms DOUBLE PRECISION,
    input_tokens BIGINT NOT NULL DEFAULT 0,
    output_tokens BIGINT NOT NULL DEFAULT 0,
    cache_read_tokens BIGINT NOT NULL DEFAULT 0,
    cache_write_tokens BIGINT NOT NULL DEFAULT 0,
    reasoning_tokens BIGINT NOT NULL DEFAULT 0,
    cost_usd DOUBLE PRECISION NOT NULL DEFAULT 0,
    priced INTEGER NOT NULL,
    estimated INTEGER NOT NULL,
    key_id TEXT,
    team_id TEXT,
    user_id TEXT,
    instance TEXT
);
CREATE INDEX requests_ts ON requests (ts);
CREATE INDEX requests_agent ON requests (agent, id);
CREATE INDEX requests_key ON requests (key_id, id) WHERE key_id IS NOT NULL;
CREATE INDEX requests_team ON requests (team_id, id) WHERE team_id IS NOT NULL;
CREATE TABLE rollups (
    day TEXT NOT NULL,
    agent TEXT NOT NULL DEFAULT '',
    provider TEXT NOT NULL DEFAULT '',
    model TEXT NOT NULL DEFAULT '',
    key_id TEXT NOT NULL DEFAULT '',
    team_id TEXT NOT NULL DEFAULT '',
    user_id TEXT NOT NULL DEFAULT '',
    requests BIGINT NOT NULL,
    priced_requests BIGINT NOT NULL,
    unpriced_requests BIGINT NOT NULL,
    estimated_requests BIGINT NOT NULL,
    errors BIGINT NOT NULL,
    input_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    cache_read_tokens BIGINT NOT NULL,
    cache_write_tokens BIGINT NOT NULL,
    cost_usd DOUBLE PRECISION NOT NULL,
    counted_requests BIGINT NOT NULL DEFAULT 0,
    counted_unpriced_requests BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (day, agent, provider, model, key_id, team_id, user_id)
);
CREATE TABLE budget_overrides (
    agent TEXT PRIMARY KEY,
    budget_json TEXT,
    spent_offset_usd DOUBLE PRECISION,
    reset_at DOUBLE PRECISION,
    updated_at DOUBLE PRECISION NOT NULL,
    updated_by TEXT
);
"""

_KEYS = """
CREATE TABLE virtual_keys (
    token_hash TEXT PRIMARY KEY,
    key_name TEXT NOT NULL,
    key_alias TEXT,
    team_id TEXT,
    user_id TEXT,
    models_json TEXT NOT NULL DEFAULT '[]',
    max_budget DOUBLE PRECISION,
    budget_duration TEXT,
    rpm_limit BIGINT,
    tpm_limit BIGINT,
    metadata_json TEXT NOT NULL DEFAULT '{}',
    aliases_json TEXT NOT NULL DEFAULT '{}',
    created_at DOUBLE PRECISION NOT NULL DEFAULT 0,
    updated_at DOUBLE PRECISION NOT NULL DEFAULT 0,
    expires DOUBLE PRECISION,
    blocked INTEGER NOT NULL DEFAULT 0,
    deleted_at DOUBLE PRECISION
);
CREATE INDEX virtual_keys_team ON virtual_keys (team_id);
CREATE INDEX virtual_keys_user ON virtual_keys (user_id);
CREATE TABLE team_settings (
    team_id TEXT PRIMARY KEY,
    model_aliases_json TEXT NOT NULL DEFAULT '{}',
    updated_at DOUBLE PRECISION NOT NULL DEFAULT 0
);
"""

# What instances share beyond the records (cllama_tx.store.coordination).
_COORDINATION = """
CREATE TABLE instances (
    instance TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started_at DOUBLE PRECISION NOT NULL,
    seen_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE reservations (
    id BIGSERIAL PRIMARY KEY,
    instance TEXT NOT NULL,
    scope TEXT NOT NULL,
    amount_usd DOUBLE PRECISION NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX reservations_scope ON reservations (scope);
CREATE INDEX reservations_instance ON reservations (instance);
CREATE TABLE rate_events (
    id BIGSERIAL PRIMARY KEY,
    instance TEXT NOT NULL,
    scope TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL,
    tokens BIGINT NOT NULL
);
CREATE INDEX rate_events_scope ON rate_events (scope, id);
CREATE INDEX rate_events_at ON rate_events (at);
CREATE TABLE changes (
    id BIGSERIAL PRIMARY KEY,
    instance TEXT NOT NULL,
    kind TEXT NOT NULL,
    subject TEXT,
    at DOUBLE PRECISION NOT NULL
);
CREATE TABLE shared_documents (
    name TEXT PRIMARY KEY,
    content TEXT NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    instance TEXT NOT NULL
);
"""

# The operator UI's sessions, shared by every instance (cllama_tx.identity.operator_sessions):
# only a hash of the session id; the CSRF token is derived from the id, so none is stored.
# Key aliases are unique among live keys: checked on every create and rename.
_UI_SESSIONS = """
CREATE TABLE ui_sessions (
    session_hash TEXT PRIMARY KEY,
    name TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    last_seen DOUBLE PRECISION NOT NULL
);
CREATE INDEX ui_sessions_created ON ui_sessions (created_at);
CREATE INDEX virtual_keys_alias ON virtual_keys (key_alias) WHERE key_alias IS NOT NULL;
"""

# The Responses surface's conversations with translated providers
# (cllama_tx.store.conversations): a follow-up turn may land on any instance.
_CONVERSATIONS = """
CREATE TABLE responses_conversations (
    agent TEXT NOT NULL,
    response_id TEXT NOT NULL,
    items TEXT NOT NULL,
    size INTEGER NOT NULL,
    used_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (agent, response_id)
);
CREATE INDEX responses_conversations_used ON responses_conversations (used_at);
"""

# LiteLLM's key fields (cllama_tx.identity.key_fields): those that govern
# have columns, the rest are kept as given in extra_json.  Ledger rows say
# who else they are billed to (organisation, customer) and the answer's id.
_KEY_FIELDS = """
ALTER TABLE virtual_keys ADD COLUMN organization_id TEXT;
ALTER TABLE virtual_keys ADD COLUMN soft_budget DOUBLE PRECISION;
ALTER TABLE virtual_keys ADD COLUMN max_parallel_requests BIGINT;
ALTER TABLE virtual_keys ADD COLUMN tags_json TEXT NOT NULL DEFAULT '[]';
ALTER TABLE virtual_keys ADD COLUMN model_max_budget_json TEXT NOT NULL DEFAULT '{}';
ALTER TABLE virtual_keys ADD COLUMN model_rpm_limit_json TEXT NOT NULL DEFAULT '{}';
ALTER TABLE virtual_keys ADD COLUMN model_tpm_limit_json TEXT NOT NULL DEFAULT '{}';
ALTER TABLE virtual_keys ADD COLUMN budget_anchor DOUBLE PRECISION;
ALTER TABLE virtual_keys ADD COLUMN extra_json TEXT NOT NULL DEFAULT '{}';
CREATE INDEX virtual_keys_organization ON virtual_keys (organization_id);
ALTER TABLE requests ADD COLUMN organization_id TEXT;
ALTER TABLE requests ADD COLUMN end_user TEXT;
ALTER TABLE requests ADD COLUMN response_id TEXT;
CREATE INDEX requests_user ON requests (user_id, id) WHERE user_id IS NOT NULL;
CREATE INDEX requests_organization ON requests (organization_id, id) WHERE organization_id IS NOT NULL;
CREATE INDEX requests_end_user ON requests (end_user, id) WHERE end_user IS NOT NULL;
CREATE INDEX requests_response ON requests (response_id) WHERE response_id IS NOT NULL;
"""

# LiteLLM's users, teams, organisations, customers and added models
# (cllama_tx.identity.directory): one JSON document each.
_DIRECTORY = """
CREATE TABLE directory (
    kind TEXT NOT NULL,
    id TEXT NOT NULL,
    doc TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (kind, id)
);
"""

# Requested names mapped to available models, by an operator or the LLM
# resolver (cllama_tx.governance.mapping_store), shared by every instance.
_MODEL_MAPPINGS = """
CREATE TABLE model_mappings (
    name TEXT PRIMARY KEY,
    target TEXT NOT NULL,
    source TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    confirmed_at DOUBLE PRECISION,
    created_by TEXT,
    detail TEXT NOT NULL DEFAULT '{}'
);
"""

# The passthrough's requests (/_proxy/<provider>/<path>): the
# provider-native path and the bytes that went each way.
_PASSTHROUGH_ROWS = """
ALTER TABLE requests ADD COLUMN path TEXT;
ALTER TABLE requests ADD COLUMN request_bytes BIGINT;
ALTER TABLE requests ADD COLUMN response_bytes BIGINT;
"""

MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (1, "ledger, virtual keys and coordination tables", _LEDGER + _KEYS + _COORDINATION),
    (2, "operator UI sessions; virtual keys by alias", _UI_SESSIONS),
    (3, "Responses conversations kept for translated providers", _CONVERSATIONS),
    (4, "virtual keys: LiteLLM's key fields; ledger rows' organisation, customer and answer id", _KEY_FIELDS),
    (5, "the key API's users, teams, organisations, customers and models", _DIRECTORY),
    (6, "model mappings: requested names mapped by an operator or the LLM resolver", _MODEL_MAPPINGS),
    (7, "ledger rows of the passthrough: path and bytes", _PASSTHROUGH_ROWS),
)

SCHEMA_VERSION = MIGRATIONS[-1][0]
