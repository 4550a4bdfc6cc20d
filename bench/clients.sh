#!/usr/bin/env bash
# Run the real coding agents against hybridd: Claude Code (Messages API) and Codex CLI (Responses API), each asked
# to write a proof file with its own shell tool. hybridd translates their APIs to chat completions for a scripted
# engine (bench/agent_engine.py) that answers at once, so the run checks the agents' protocol end to end (tool call,
# tool result, final answer) on a machine too slow to prefill their 20k-token prompts with a real model.
# The agents come from npm, pinned, installed once under $XDG_CACHE_HOME/hybridd/clients; results go to
# bench/results/clients.json.
#
#   bench/clients.sh            needs node/npm and .venv (scripts/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
CLAUDE_CODE=2.1.197
CODEX=0.171.0
cache="${XDG_CACHE_HOME:-$HOME/.cache}/hybridd/clients/claude-$CLAUDE_CODE-codex-$CODEX"
if [ ! -x "$cache/node_modules/.bin/codex" ] || [ ! -x "$cache/node_modules/.bin/claude" ]; then
    mkdir -p "$cache"
    npm install --prefix "$cache" --no-audit --no-fund --silent \
        "@anthropic-ai/claude-code@$CLAUDE_CODE" "@openai/codex@$CODEX" >/dev/null
fi
work="$(mktemp -d)"
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
free_port() { .venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
engine_port="$(free_port)"
port="$(free_port)"
.venv/bin/python bench/agent_engine.py "$engine_port" "$work/requests.jsonl" >"$work/engine.log" 2>&1 &
pids+=($!)
cat >"$work/config.toml" <<EOF
[server]
listen = "127.0.0.1:$port"
[[models]]
name = "agent"
base_url = "http://127.0.0.1:$engine_port"
EOF
XDG_STATE_HOME="$work/state" .venv/bin/hybridd serve --config "$work/config.toml" >"$work/hybridd.log" 2>&1 &
pids+=($!)
for _ in $(seq 300); do
    curl -sf "http://127.0.0.1:$port/v1/models" >/dev/null && curl -sf "http://127.0.0.1:$engine_port/v1/models" \
        >/dev/null && break
    sleep 0.1
done
mkdir -p "$work/home" "$work/claude" "$work/codex/project" "$work/codex/home"

# Claude Code, headless: its Bash tool allowed (root may not skip permissions).
started=$(date +%s.%N)
(cd "$work/claude" && HOME="$work/home" ANTHROPIC_BASE_URL="http://127.0.0.1:$port" ANTHROPIC_AUTH_TOKEN=unused \
    ANTHROPIC_MODEL=agent ANTHROPIC_SMALL_FAST_MODEL=agent DISABLE_TELEMETRY=1 \
    CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1 timeout 180 "$cache/node_modules/.bin/claude" \
    -p "Write the proof file" --allowedTools Bash --output-format json >"$work/claude.json" 2>"$work/claude.err") || true
claude_s=$(awk "BEGIN { print $(date +%s.%N) - $started }")
cp "$work/requests.jsonl" "$work/claude-requests.jsonl" 2>/dev/null || : >"$work/claude-requests.jsonl"
: >"$work/requests.jsonl"

# Codex CLI, headless, with hybridd as its Responses provider.
cat >"$work/codex/home/config.toml" <<EOF
model = "agent"
model_provider = "hybridd"
[model_providers.hybridd]
name = "hybridd"
base_url = "http://127.0.0.1:$port/v1"
wire_api = "responses"
EOF
started=$(date +%s.%N)
(cd "$work/codex/project" && CODEX_HOME="$work/codex/home" HOME="$work/home" timeout 180 \
    "$cache/node_modules/.bin/codex" exec --skip-git-repo-check --dangerously-bypass-approvals-and-sandbox \
    "Write the proof file" >"$work/codex.out" 2>"$work/codex.err") || true
codex_s=$(awk "BEGIN { print $(date +%s.%N) - $started }")

WORK="$work" CLAUDE_CODE="$CLAUDE_CODE" CODEX="$CODEX" CLAUDE_S="$claude_s" CODEX_S="$codex_s" \
    .venv/bin/python - <<'EOF'
import json, os, pathlib
work = pathlib.Path(os.environ["WORK"])
def requests(name):
    path = work / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
def proof(folder):
    path = work / folder / "proof.txt"
    return path.read_text().strip() if path.exists() else None
claude = {}
try:
    claude = json.loads((work / "claude.json").read_text())
except ValueError:
    pass
hybridd_lines = [line.split("hybridd.request: ", 1)[1] for line in (work / "hybridd.log").read_text().splitlines()
                 if "hybridd.request: " in line]
results = {
    "claude_code": {"version": os.environ["CLAUDE_CODE"], "api": "Messages (/v1/messages)",
                    "proof_file": proof("claude"), "result": claude.get("result"), "is_error": claude.get("is_error"),
                    "turns": claude.get("num_turns"), "seconds": round(float(os.environ["CLAUDE_S"]), 1),
                    "requests": requests("claude-requests.jsonl"),
                    "stderr": (work / "claude.err").read_text()[-500:]},
    "codex": {"version": os.environ["CODEX"], "api": "Responses (/v1/responses)", "proof_file": proof("codex/project"),
              "final": (work / "codex.out").read_text().strip()[-300:], "seconds": round(float(os.environ["CODEX_S"]), 1),
              "requests": requests("requests.jsonl"), "stderr": (work / "codex.err").read_text()[-500:]},
    "hybridd_request_lines": hybridd_lines,
}
for agent in ("claude_code", "codex"):
    results[agent]["passed"] = results[agent]["proof_file"] == "hybridd-agent-ok" and len(results[agent]["requests"]) >= 2
out = pathlib.Path("bench/results/clients.json")
out.write_text(json.dumps(results, indent=2) + "\n")
for agent in ("claude_code", "codex"):
    r = results[agent]
    print(f"{agent} {r['version']}: {'passed' if r['passed'] else 'FAILED'} in {r['seconds']} s "
          f"({len(r['requests'])} requests; proof file: {r['proof_file']!r})")
print(f"wrote {out}")
raise SystemExit(0 if all(results[a]["passed"] for a in ("claude_code", "codex")) else 1)
EOF
