"""What agents send that llama-cpp-python's server lacks, filled in by hybridd: a real daemon, the real tiny engine."""

from __future__ import annotations

import json
from pathlib import Path

from hybridd.api.translate.openai_fill import UsageFiller, for_llama_cpp_python
from tests.test_serve_e2e import NO_EOS, client, tiny_config


def test_the_body_is_mapped_to_what_llama_cpp_python_takes() -> None:
    body = {"model": "m", "max_completion_tokens": 7, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}, "strict": True}}}
    assert for_llama_cpp_python(body) == {"model": "m", "max_tokens": 7,
                                          "response_format": {"type": "json_object", "schema": {"type": "object"}}}
    assert for_llama_cpp_python({"max_tokens": 3, "max_completion_tokens": 9})["max_tokens"] == 3


def test_the_usage_chunk_is_added_only_when_the_engine_sent_none() -> None:
    filler = UsageFiller(prompt_tokens=12)
    filler.chunk({"id": "c1", "created": 5, "model": "m", "choices": [{"delta": {"role": "assistant"}}]})
    for text in ("a", "", "b"):  # an empty delta is a token whose character is not whole yet
        filler.chunk({"id": "c1", "created": 5, "model": "m", "choices": [{"delta": {"content": text}}]})
    filler.chunk({"id": "c1", "choices": [{"delta": {}, "finish_reason": "stop"}]})
    tail = filler.end().decode().split("\n\n")
    usage = json.loads(tail[0].removeprefix("data: "))
    assert usage["usage"] == {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
    assert usage["choices"] == [] and usage["id"] == "c1" and tail[1] == "data: [DONE]"
    sent = UsageFiller(1)
    sent.chunk({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}})
    assert sent.end() == b"data: [DONE]\n\n"


def test_agents_get_stream_usage_json_schema_and_max_completion_tokens(daemon_factory,  # type: ignore[no-untyped-def]
                                                                       tiny_model: Path) -> None:
    daemon = daemon_factory(tiny_config(tiny_model))
    api = client(daemon)
    stream = api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                         stream=True, stream_options={"include_usage": True},
                                         logit_bias=NO_EOS)  # type: ignore[arg-type]
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6  # as the whole answer counts it
    assert chunks[-1].usage.prompt_tokens > 0
    limited = api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                          max_completion_tokens=3, logit_bias=NO_EOS)  # type: ignore[arg-type]
    # The budget held: the engine's own default runs to the end of the context. (llama-cpp-python may finish the
    # bytes of a character past its max_tokens, and counts those tokens too.)
    assert limited.choices[0].finish_reason == "length"
    assert limited.usage is not None and 3 <= limited.usage.completion_tokens < 8
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    shaped = api.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "json"}], max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert shaped.choices[0].message.content is not None
    text = shaped.choices[0].message.content
    if shaped.choices[0].finish_reason == "stop":  # the grammar held the random model to the schema
        assert isinstance(json.loads(text)["a"], int)
    else:
        assert text.lstrip().startswith("{")  # cut at max_tokens, but still the schema's shape
    models = {m.id: m.model_extra["hybridd"]["capabilities"] for m in api.models.list().data}
    assert models["tiny"]["tool_choice_auto"] is False and models["tiny"]["parallel_slots"] == 1


def test_a_budget_beyond_the_trained_context_is_capped_not_refused(daemon_factory,  # type: ignore[no-untyped-def]
                                                                    tiny_model: Path) -> None:
    # Claude Code asks for max_tokens 32000 beside a 20k-token prompt whatever the model's context: a ceiling.
    daemon = daemon_factory(tiny_config(tiny_model))
    api = client(daemon)
    raw = api.chat.completions.with_raw_response.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                        max_tokens=100_000,
                                                        logit_bias={"2": 100})  # EOS at once
    reason = raw.headers["x-hybridd-reason"]
    assert "max_tokens 100000 capped at " in reason and "tiny was trained for 4096 tokens of context" in reason
    cap = int(reason.split("capped at ")[1].split(":")[0])
    reply = raw.parse()
    assert reply.usage is not None and 4096 - 64 < cap < 4096 and reply.usage.completion_tokens <= cap
    assert reply.usage.prompt_tokens + cap == 4096
