"""
Structured output through the proxy the ways OpenAI clients ask for it: the
OpenAI SDK's C{chat.completions.parse} with a Pydantic model, and
LangChain's C{ChatOpenAI(...).with_structured_output()} (its default
method, a JSON schema), each printing what it parsed as one JSON line.

Usage: python structured_output.py <model> <base url>
(the key comes from CLLAMA_RUNNER_KEY, not the command line).
"""

import json
import os
import sys

from langchain_openai import ChatOpenAI
from openai import OpenAI
from pydantic import BaseModel


class City(BaseModel):
    """A city and how many people live there."""

    name: str
    population: int
    coastal: bool


def main() -> None:
    model, base_url = sys.argv[1:3]
    key = os.environ["CLLAMA_RUNNER_KEY"]
    client = OpenAI(base_url=base_url, api_key=key, max_retries=0)
    completion = client.chat.completions.parse(
        model=model,
        messages=[{"role": "user", "content": "Name a city with its population."}],
        response_format=City,
    )
    parsed = completion.choices[0].message.parsed
    print(json.dumps({"via": "openai-parse", "city": parsed.model_dump()}))
    llm = ChatOpenAI(model=model, base_url=base_url, api_key=key, max_retries=0)
    city = llm.with_structured_output(City).invoke("Name a coastal city with its population.")
    print(json.dumps({"via": "langchain", "city": city.model_dump()}))


if __name__ == "__main__":
    main()
