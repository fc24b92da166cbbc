"""Drives kandle-server with the official `openai` client, unchanged.

Usage: python openai_client.py CHAT_BASE_URL CHAT_MODEL EMBED_BASE_URL EMBED_MODEL API_KEY
Exits non-zero on the first failed check; run by tests/openai_client.rs.
"""
import base64
import struct
import sys

import openai
from openai import OpenAI

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
