"""How long completions run, learned online per model (pure).

max_tokens is a budget, not a length: coding agents often ask for 8k-32k tokens and stop after a few hundred.
Memory must hold the budget (the context is sized for it), but predicting time from it would make every queue
look many times longer than it is. So predictions use the EWMA of the completion lengths streams of the model
really ran to, capped by the request's budget; a model with none observed yet is predicted at its full budget.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

EWMA_ALPHA = 0.3


@dataclass(frozen=True, slots=True)
class CompletionLengths:
    """EWMA of completion tokens per model."""

    tokens: Mapping[str, float] = field(default_factory=dict)
    alpha: float = EWMA_ALPHA

    def expect(self, model: str, budget: int) -> int:
        """Tokens a completion of `model` with max_tokens `budget` is expected to run to."""
        seen = self.tokens.get(model)
        return budget if seen is None else max(1, min(budget, round(seen)))

    def observe(self, model: str, tokens: int) -> CompletionLengths:
        """A new estimate with one finished completion of `tokens` folded in."""
        if tokens <= 0:
            return self
        old = self.tokens.get(model)
        new = tokens if old is None else (1 - self.alpha) * old + self.alpha * tokens
        return CompletionLengths({**self.tokens, model: new}, self.alpha)
