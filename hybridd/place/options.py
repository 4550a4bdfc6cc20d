"""`hybridd plan --peer PROFILE`: where a reference request would run, and each option's speed (pure).

The reference request fills half the planned context with prompt and asks for 1024 tokens (at most a quarter of
the context); every node is idle and nothing is loaded, so each option pays its load time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hybridd.model.memory import RunSettings
from hybridd.model.spec import ModelSpec
from hybridd.place.hardware import Hardware
from hybridd.place.scheduler import LocalState, PeerState, RequestNeed, decide, ledger_for
from hybridd.place.speed import Calibration

REFERENCE_COMPLETION_TOKENS = 1024


def plan_options(spec: ModelSpec, settings: RunSettings, local: Hardware, peers: Sequence[Hardware],
                 calibration: Calibration | None = None) -> dict[str, Any]:
    """{"placement", "placement_reason", "options": [...]} to merge into the plan JSON."""
    completion = min(REFERENCE_COMPLETION_TOKENS, max(1, settings.ctx // 4))
    prompt = max(1, min(settings.ctx // 2, settings.ctx - completion))
    model = spec.name or spec.architecture
    need = RequestNeed(model, spec, prompt, completion, settings.type_k, settings.type_v, settings.flash_attn,
                       min_ctx=settings.ctx)
    state = LocalState(local, ledger_for(local))
    peer_states = [PeerState(hw.name, hw, frozenset({model})) for hw in peers]
    decision = decide(need, state, peer_states, now=0.0, calibration=calibration)
    return {
        "placement": decision.placement,
        "placement_reason": decision.reason,
        "reference_request": {"prompt_tokens": prompt, "max_tokens": completion},
        "options": [
            {"placement": o.placement, "feasible": o.feasible, "why_not": o.why_not, "ctx": o.ctx,
             "predicted_tok_s": round(o.predicted_tok_s, 1), "prefill_tok_s": round(o.prefill_tok_s, 1),
             "total_s": round(o.total_s, 2) if o.feasible else None, "load_s": round(o.load_s, 2),
             "offload_layers": o.offload_layers, "n_cpu_moe": o.n_cpu_moe}
            for o in decision.options
        ],
    }
