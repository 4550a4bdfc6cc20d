"""`hybridd plan --peer PROFILE`: where a reference request would run, and each option's speed (pure).

The reference request is `prompt_tokens` + `max_tokens` when given (`hybridd plan --prompt-tokens N --max-tokens
N`); otherwise it fills half the planned context with prompt and asks for 1024 tokens (at most a quarter of the
context). Every node is idle and nothing is loaded, so each option pays its load time. Each option reports decode
tok/s at the start of the completion and averaged over it (decode slows as the cache fills).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hybridd.model.memory import RunSettings
from hybridd.model.spec import ModelSpec
from hybridd.place.hardware import Hardware
from hybridd.place.scheduler import LocalState, Option, PeerState, RequestNeed, decide, ledger_for
from hybridd.place.speed import Calibration

REFERENCE_COMPLETION_TOKENS = 1024


def reference_request(ctx: int, prompt_tokens: int | None = None, max_tokens: int | None = None) -> tuple[int, int]:
    """(prompt, completion) tokens of the reference request at `ctx`: the given counts, the rest by default."""
    completion = max_tokens or min(REFERENCE_COMPLETION_TOKENS, max(1, ctx // 4))
    prompt = prompt_tokens if prompt_tokens is not None else max(1, min(ctx // 2, ctx - completion))
    return prompt, completion


def plan_options(spec: ModelSpec, settings: RunSettings, local: Hardware, peers: Sequence[Hardware],
                 calibration: Calibration | None = None, prompt_tokens: int | None = None,
                 max_tokens: int | None = None) -> dict[str, Any]:
    """{"placement", "placement_reason", "options": [...]} to merge into the plan JSON."""
    prompt, completion = reference_request(settings.ctx, prompt_tokens, max_tokens)
    model = spec.name or spec.architecture
    need = RequestNeed(model, spec, prompt, completion, settings.type_k, settings.type_v, settings.flash_attn,
                       min_ctx=settings.ctx, n_outputs=settings.n_outputs)
    state = LocalState(local, ledger_for(local))
    peer_states = [PeerState(hw.name, hw, frozenset({model})) for hw in peers]
    decision = decide(need, state, peer_states, now=0.0, calibration=calibration)
    return {
        "placement": decision.placement,
        "placement_reason": decision.reason,
        "reference_request": {"prompt_tokens": prompt, "max_tokens": completion},
        "options": [
            {"placement": o.placement, "feasible": o.feasible, "why_not": o.why_not, "ctx": o.ctx,
             "predicted_tok_s": round(o.predicted_tok_s, 1), **_decode_span(o, prompt, completion),
             "prefill_tok_s": round(o.prefill_tok_s, 1),
             "total_s": round(o.total_s, 2) if o.feasible else None, "load_s": round(o.load_s, 2),
             "offload_layers": o.offload_layers, "n_cpu_moe": o.n_cpu_moe}
            for o in decision.options
        ],
    }


def _decode_span(option: Option, prompt: int, completion: int) -> dict[str, float | None]:
    """Decode tok/s when the first completion token is made, and over the whole completion."""
    if option.speed is None or not option.feasible:
        return {"decode_tok_s_start": None, "decode_tok_s_mean": None}
    return {"decode_tok_s_start": round(option.speed.decode_tok_s(prompt, option.factor), 1),
            "decode_tok_s_mean": round(option.speed.mean_decode_tok_s(prompt, completion, option.factor), 1)}
