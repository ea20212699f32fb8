Scale out: `--workers N` runs N processes on one host behind the same two ports, and
`CLLAMA_DATABASE_URL` (or `DATABASE_URL`) puts everything instances share in one
PostgreSQL, so several hosts form one fleet with no other new setting. Budgets (with
their reservations, periods, offsets and resets), rate limits, virtual keys, operator
overrides, reloads, provider changes and UI sessions are decided or seen the same on
every instance; the database going away is a clear, self-healing state (readiness fails,
budgeted requests get 503 at once, completed requests are never lost). Migrations run at
start or with `cllama-tx migrate` (docs/DEPLOYMENT.md, docs/LEDGER.md).
