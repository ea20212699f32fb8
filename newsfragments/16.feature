A third ingress surface: OpenAI's Responses API, `POST /v1/responses` (and `/responses`),
JSON and streams, with identity, model resolution, policy, budgets, rate limits,
failover, audit, history and metering as on the other two. Codex CLI, OpenCode's `openai`
provider, OpenClaw's `openai-responses`, the AI SDK's `openai(model)` and LangChain's
`use_responses_api` now work through the proxy. OpenAI gets the request as it came; every
other provider gets it translated to chat completions or Anthropic Messages (dropped hints
named in the audit, anything untranslatable refused by name), and `previous_response_id`
works for translated answers, kept in memory per agent for an hour (docs/SPEC.md, "The
Responses surface"; docs/TRANSLATION.md, "The Responses API"; docs/CLIENTS.md, "Codex CLI").
