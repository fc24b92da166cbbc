"""Drives kandle-server with the official `openai` client, unchanged.

Usage: python openai_client.py CHAT_BASE_URL CHAT_MODEL EMBED_BASE_URL EMBED_MODEL API_KEY
Exits non-zero on the first failed check; run by tests/openai_client.rs.
"""
import base64
import json
import struct
import sys
from typing import Literal

import openai
from openai import OpenAI
from pydantic import BaseModel, Field

chat_url, chat_model, embed_url, embed_model, key = sys.argv[1:6]
chat = OpenAI(base_url=chat_url + "/v1", api_key=key, max_retries=0)
embed = OpenAI(base_url=embed_url + "/v1", api_key="unused", max_retries=0)

assert [m.id for m in chat.models.list()] == [chat_model]

r = chat.chat.completions.create(
    model=chat_model, messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0
)
assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
assert r.choices[0].finish_reason in ("stop", "length")
assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
whole = r.choices[0].message.content

stream = chat.chat.completions.create(
    model=chat_model, messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0,
    stream=True, stream_options={"include_usage": True},
)
parts, usage = [], None
for chunk in stream:
    if chunk.usage:
        usage = chunk.usage
    for choice in chunk.choices:
        parts.append(choice.delta.content or "")
assert "".join(parts) == whole, ("".join(parts), whole)
assert usage is not None and usage.completion_tokens == r.usage.completion_tokens

# Structured outputs: random weights still give documents the Pydantic model parses,
# because each step only allows tokens that keep the text a valid prefix.
class Pet(BaseModel):
    kind: Literal["cat", "dog", "fish"]
    name: str = Field(max_length=8)


class Owner(BaseModel):
    name: str = Field(min_length=1, max_length=10)
    age: int = Field(ge=0, le=120)
    pets: list[Pet] = Field(max_length=3)
    verified: bool


for i, prompt in enumerate(["Describe an owner", "Who owns a fish?", "{", "Say nothing"]):
    parsed = chat.chat.completions.parse(
        model=chat_model, messages=[{"role": "user", "content": prompt}], response_format=Owner,
        temperature=1, seed=i, max_tokens=600,
    )
    owner = parsed.choices[0].message.parsed
    assert isinstance(owner, Owner) and 0 <= owner.age <= 120, parsed
    assert parsed.choices[0].finish_reason == "stop"

obj = chat.chat.completions.create(
    model=chat_model, messages=[{"role": "user", "content": "JSON please"}], temperature=1, seed=7,
    response_format={"type": "json_object"}, max_tokens=600,
)
# Any object; random weights may nest deep before closing, so only a complete one is checked.
if obj.choices[0].finish_reason == "stop":
    assert isinstance(json.loads(obj.choices[0].message.content), dict)

try:
    chat.chat.completions.parse(
        model=chat_model, messages=[{"role": "user", "content": "x"}],
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 3, "maximum": 1}}},
    )
    raise AssertionError("expected BadRequestError")
except openai.BadRequestError as e:
    assert e.body["param"] == "response_format" and "minimum" in e.body["message"], e.body

# Tool calls: a demanded call is a valid call even from random weights; whole and streamed
# alike; the assistant message and a tool result go back into the conversation.
tools = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
                   "required": ["city"], "additionalProperties": False}}}]
messages = [{"role": "user", "content": "Weather in Oslo?"}]
asked = dict(model=chat_model, messages=messages, tools=tools, tool_choice="required", temperature=1, seed=1,
             max_tokens=200)
r = chat.chat.completions.create(**asked)
assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.tool_calls, r
for call in r.choices[0].message.tool_calls:
    assert call.function.name == "get_weather", r
    assert isinstance(json.loads(call.function.arguments)["city"], str)
calls = {}
for chunk in chat.chat.completions.create(**asked, stream=True):
    for choice in chunk.choices:
        for delta in choice.delta.tool_calls or []:
            entry = calls.setdefault(delta.index, {"name": "", "arguments": ""})
            entry["name"] += delta.function.name or ""
            entry["arguments"] += delta.function.arguments or ""
assert calls == {i: {"name": c.function.name, "arguments": c.function.arguments}
                 for i, c in enumerate(r.choices[0].message.tool_calls)}, calls
messages += [r.choices[0].message] + [{"role": "tool", "tool_call_id": c.id, "content": "sunny, 21 C"}
                                      for c in r.choices[0].message.tool_calls]
single = chat.chat.completions.create(**asked, parallel_tool_calls=False)
assert len(single.choices[0].message.tool_calls) == 1, single
follow = chat.chat.completions.create(model=chat_model, messages=messages, tools=tools, max_tokens=4, temperature=0)
assert follow.choices[0].message.role == "assistant"

# Several choices with log-probabilities, whole and streamed.
r = chat.chat.completions.create(
    model=chat_model, messages=[{"role": "user", "content": "Hello"}], max_tokens=6, temperature=1, seed=3,
    n=2, logprobs=True, top_logprobs=2,
)
assert [c.index for c in r.choices] == [0, 1]
for choice in r.choices:
    for t in choice.logprobs.content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.logprob - 1e-6
        assert t.token == bytes(t.bytes).decode(errors="replace")
streamed = {0: [], 1: []}
for chunk in chat.chat.completions.create(
    model=chat_model, messages=[{"role": "user", "content": "Hello"}], max_tokens=6, temperature=1, seed=3,
    n=2, logprobs=True, top_logprobs=2, stream=True,
):
    for choice in chunk.choices:
        streamed[choice.index].append(choice.delta.content or "")
assert ["".join(streamed[i]) for i in (0, 1)] == [c.message.content for c in r.choices]
lc = chat.completions.create(model=chat_model, prompt="Once upon", max_tokens=4, temperature=0, logprobs=3)
assert len(lc.choices[0].logprobs.tokens) == len(lc.choices[0].logprobs.token_logprobs) == len(lc.choices[0].logprobs.text_offset)
assert all(len(alternatives) <= 3 for alternatives in lc.choices[0].logprobs.top_logprobs)
# How lm-evaluation-harness scores a text: the prompt echoed with its log-probabilities.
scored = chat.completions.create(model=chat_model, prompt="Once upon a time", max_tokens=1, temperature=0,
                                 logprobs=1, echo=True)
lp = scored.choices[0].logprobs
assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None, lp
assert len(lp.tokens) >= scored.usage.prompt_tokens and all(v <= 0 for v in lp.token_logprobs[1:]), lp
assert scored.choices[0].text.startswith("Once upon a time"), scored

c = chat.completions.create(model=chat_model, prompt="Once upon", max_tokens=5, temperature=0)
assert c.object == "text_completion" and c.usage.completion_tokens <= 5
streamed = "".join(
    ch.choices[0].text
    for ch in chat.completions.create(model=chat_model, prompt="Once upon", max_tokens=5, temperature=0, stream=True)
    if ch.choices
)
assert streamed == c.choices[0].text

try:
    chat.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    raise AssertionError("expected NotFoundError")
except openai.NotFoundError as e:
    assert e.body["code"] == "model_not_found", e.body

try:
    OpenAI(base_url=chat_url + "/v1", api_key="wrong", max_retries=0).models.list()
    raise AssertionError("expected AuthenticationError")
except openai.AuthenticationError:
    pass

e = embed.embeddings.create(model=embed_model, input=["a cat", "a kitten", "stock markets"])
vectors = [d.embedding for d in e.data]
assert len(vectors) == 3 and len(vectors[0]) == 384
dot = lambda a, b: sum(x * y for x, y in zip(a, b))
assert dot(vectors[0], vectors[1]) > dot(vectors[0], vectors[2]), "similar sentences are closer"
# The client asks for base64 by default when numpy is absent or present; decode explicitly too.
raw = embed.embeddings.create(model=embed_model, input="a cat", encoding_format="base64")
floats = raw.data[0].embedding
if isinstance(floats, str):
    data = base64.b64decode(floats)
    floats = list(struct.unpack(f"<{len(data) // 4}f", data))
assert max(abs(x - y) for x, y in zip(floats, vectors[0])) < 1e-5

print("openai client: all checks passed")
