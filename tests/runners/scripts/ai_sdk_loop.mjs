// A tool-calling loop with the Vercel AI SDK, configured only by its
// documented environment variables (OPENAI_BASE_URL/OPENAI_API_KEY or
// ANTHROPIC_BASE_URL/ANTHROPIC_API_KEY): generateText with one tool that
// really writes a file, at most two steps.
// Usage: node ai_sdk_loop.mjs <openai|openai-responses|anthropic> <model id> <prompt>
import { writeFileSync } from "node:fs";
import { generateText, isStepCount, jsonSchema, tool } from "ai";
import { openai } from "@ai-sdk/openai";
import { anthropic } from "@ai-sdk/anthropic";

const [which, modelId, prompt] = process.argv.slice(2);
// openai.chat: the Chat Completions API; openai(id) alone means the Responses API.
const model =
  which === "anthropic" ? anthropic(modelId) : which === "openai-responses" ? openai(modelId) : openai.chat(modelId);

const writeFile = tool({
  description: "Write text to a file in the working directory",
  inputSchema: jsonSchema({
    type: "object",
    properties: { path: { type: "string" }, text: { type: "string" } },
    required: ["path", "text"],
  }),
  execute: async ({ path, text }) => {
    writeFileSync(path, text);
    return `wrote ${text.length} bytes to ${path}: ${text}`;
  },
});

const result = await generateText({
  model,
  tools: { write_file: writeFile },
  stopWhen: isStepCount(2),
  maxRetries: 0,
  prompt,
});
console.log(result.text);
