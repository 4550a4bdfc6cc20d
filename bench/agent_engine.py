"""A scripted chat engine that plays a coding agent's model, so the real agents can be run against hybridd on a
machine too slow for their 20k-token prompts (bench/clients.sh).

Each request is answered at once, streamed or whole, as llama-server would: when the agent offers a shell tool and
no tool has run yet, a call to it that writes a proof file; once the tool's result is back, a text answer quoting
it; with no shell tool, a plain greeting. Every request's shape (messages, roles, tools, max_tokens) is appended to
requests.jsonl beside the proof, so the run shows what each agent sent through hybridd.

    python bench/agent_engine.py PORT LOGFILE
"""

from __future__ import annotations

import json
import sys
from typing import Any

from aiohttp import web

PROOF = "hybridd-agent-ok"
SHELL_TOOLS = ("Bash", "shell", "exec_command", "local_shell", "run_shell_command")


def _shell_tool(body: dict[str, Any]) -> str | None:
    names = [t.get("function", {}).get("name") for t in body.get("tools") or []]
    return next((name for name in SHELL_TOOLS if name in names), None)


def _arguments(tool: str, body: dict[str, Any]) -> dict[str, Any]:
    """Arguments in the shape each agent's shell tool takes, read from its schema."""
    schema = next(t["function"].get("parameters", {}) for t in body["tools"] if t["function"]["name"] == tool)
    command = f"echo {PROOF} > proof.txt && cat proof.txt"
    if schema.get("properties", {}).get("command", {}).get("type") == "array":
        return {"command": ["bash", "-lc", command]}  # Codex's shell tool takes argv
    if "cmd" in schema.get("properties", {}):
        return {"cmd": command}
    return {"command": command, "description": "write the proof file"}


def answer(body: dict[str, Any]) -> dict[str, Any]:
    """The assistant message for this request."""
    messages = body.get("messages") or []
    results = [m for m in messages if m.get("role") == "tool"]
    if results:
        return {"role": "assistant", "content": f"Done: the tool said {str(results[-1].get('content'))[:200]!r}"}
    tool = _shell_tool(body)
    if tool is None:
        return {"role": "assistant", "content": "Hello from hybridd."}
    call = {"id": "call_hybridd_1", "type": "function",
            "function": {"name": tool, "arguments": json.dumps(_arguments(tool, body))}}
    return {"role": "assistant", "content": None, "tool_calls": [call]}


def _chunks(message: dict[str, Any]) -> list[dict[str, Any]]:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"id": "chatcmpl-agent", "object": "chat.completion.chunk", "created": 0, "model": "agent",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    out = [chunk({"role": "assistant", "content": None})]
    if message.get("tool_calls"):
        call = message["tool_calls"][0]
        arguments = call["function"]["arguments"]
        out.append(chunk({"tool_calls": [{"index": 0, "id": call["id"], "type": "function",
                                          "function": {"name": call["function"]["name"], "arguments": ""}}]}))
        for i in range(0, len(arguments), 16):  # partial JSON, as engines stream it
            out.append(chunk({"tool_calls": [{"index": 0, "function": {"arguments": arguments[i:i + 16]}}]}))
        out.append(chunk({}, "tool_calls"))
    else:
        for word in message["content"].split(" "):
            out.append(chunk({"content": word + " "}))
        out.append(chunk({}, "stop"))
    usage = {"prompt_tokens": 100, "completion_tokens": len(out), "total_tokens": 100 + len(out)}
    out.append({"id": "chatcmpl-agent", "object": "chat.completion.chunk", "created": 0, "model": "agent",
                "choices": [], "usage": usage})
    return out


def make_app(log_path: str) -> web.Application:
    log = open(log_path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115  # one line per request, for the run

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        message = answer(body)
        shape = {"roles": [m.get("role") for m in body.get("messages", [])],
                 "tools": [t.get("function", {}).get("name") for t in body.get("tools") or []],
                 "max_tokens": body.get("max_tokens"), "stream": bool(body.get("stream")),
                 "answer": "tool_call" if message.get("tool_calls") else message["content"]}
        log.write(json.dumps(shape) + "\n")
        if not body.get("stream"):
            return web.json_response({"id": "chatcmpl-agent", "object": "chat.completion", "created": 0,
                                      "model": "agent", "choices": [{
                                          "index": 0, "message": message,
                                          "finish_reason": "tool_calls" if message.get("tool_calls") else "stop"}],
                                      "usage": {"prompt_tokens": 100, "completion_tokens": 5, "total_tokens": 105}})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for chunk in _chunks(message):
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "agent", "object": "model"}]})

    app = web.Application(client_max_size=64 * 2**20)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    return app


if __name__ == "__main__":
    web.run_app(make_app(sys.argv[2]), host="127.0.0.1", port=int(sys.argv[1]), print=None)
