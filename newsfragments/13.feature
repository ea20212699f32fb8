Model names as clients send them: bare names resolve by family (`gpt-4o` to OpenAI,
`claude-*` to Anthropic) and by surface, vendors without a configured key go through
OpenRouter, virtual keys and teams carry model aliases, and the operator model table
(`CLLAMA_MODEL_TABLE`, LiteLLM's `model_list` YAML as written, re-read on SIGHUP and
`POST /api/reload`, shown on the UI's Model table page) maps public names to providers,
keys and prices. The unprefixed paths clients call (`/chat/completions`, `/messages`,
`/messages/count_tokens`, `/models`) work like their `/v1` twins, the master key may call
inference as `master`, and every request is audited, including 404s, 405s and
`/v1/models`; a name that resolves to nothing is a 400 naming only what was sent
(docs/SPEC.md, docs/CONFIGURATION.md "Model names").
