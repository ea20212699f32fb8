A platform built on LiteLLM's proxy API can point its base URL and master key at cllama_tx:
every `/key/generate` and `/key/update` field is taken (those that govern enforced:
`organization_id`, `soft_budget`, `max_parallel_requests` with 0 refusing everything,
`model_max_budget`, `model_rpm_limit`, `model_tpm_limit`, `tags`, budget schedules with
`budget_reset_at`; the rest kept and returned), with `/key/regenerate`, `/key/health` and
`/key/{key}/reset_spend`; users, teams with members and member budgets, organisations,
customers (the request's `user`) and models added at runtime, kept in the shared store;
budgets of every level checked and reserved together; spend logs found by the answer's id
or by key (raw or hashed), dates that count their whole day, `/global/spend/*` and daily
activity; `/health` with LiteLLM's fields for the master key. A Teams & budgets page in the
operator UI shows and edits them (docs/VIRTUAL_KEYS.md, field by field against LiteLLM).
