"""
A tool-calling loop with LangChain's chat models, configured only by their
documented constructor settings (C{base_url}, C{api_key}): the model calls
a tool that really writes a file, the result goes back, the final answer
is streamed.

Usage: python langchain_loop.py <openai|openai-responses|anthropic> <model> <base url> <prompt>
(the key comes from CLLAMA_RUNNER_KEY, not the command line).
"""

import os
import sys

from langchain_core.messages import HumanMessage
from langchain_core.tools import tool


@tool
def write_file(path: str, text: str) -> str:
    """Write text to a file in the working directory."""
    with open(path, "w") as f:
        f.write(text)
    return f"wrote {len(text)} bytes to {path}: {text}"


def main() -> None:
    which, model, base_url, prompt = sys.argv[1:5]
    key = os.environ["CLLAMA_RUNNER_KEY"]
    if which == "anthropic":
        from langchain_anthropic import ChatAnthropic

        llm = ChatAnthropic(model=model, base_url=base_url, api_key=key, max_retries=0)
    else:
        from langchain_openai import ChatOpenAI

        responses = which == "openai-responses"  # the Responses API, as LangChain documents it
        llm = ChatOpenAI(model=model, base_url=base_url, api_key=key, max_retries=0, use_responses_api=responses)
    with_tools = llm.bind_tools([write_file])
    messages = [HumanMessage(prompt)]
    answer = with_tools.invoke(messages)
    messages.append(answer)
    for call in answer.tool_calls:
        messages.append(write_file.invoke(call))
    final = None
    for chunk in with_tools.stream(messages):
        final = chunk if final is None else final + chunk
    print(_text(final))


def _text(message) -> str:
    """A message's text (a property in langchain-core 1.x, a method before)."""
    text = message.text
    return text if isinstance(text, str) else text()


if __name__ == "__main__":
    main()
