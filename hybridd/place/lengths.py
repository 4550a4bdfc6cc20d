"""How long completions run, learned online per model (pure).

max_tokens is a budget, not always a length: coding agents often ask for 8k-32k tokens and stop after a few
hundred, while other clients set max_tokens to about what they want back. Memory must hold the budget (the
context is sized for it), but predicting time from it alone would make every queue behind an agent look many times
longer than it is.

So each model keeps two predictors, both EWMAs of its finished completions: the tokens they ran to (right for
agents: the length does not follow the budget), and the share of the budget they used (right when the budget is
the length). A prediction takes the one whose recent predictions were closer, capped by the request's budget.

How long answers run depends on the client more than on the model, so the same two predictors are also kept over
every model's completions; a model with none observed yet is predicted from those. Before anything has ended,
the full budget is all there is to go on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

EWMA_ALPHA = 0.3


@dataclass(frozen=True, slots=True)
class ModelLengths:
    """One model's two predictors and the EWMA of each one's absolute error, in tokens."""

    tokens: float
    share: float
    tokens_err: float = 0.0
    share_err: float = 0.0

    def expect(self, budget: int) -> int:
        by_share = self.share * budget
        guess = by_share if self.share_err < self.tokens_err else self.tokens
        return max(1, min(budget, round(guess)))

    def observe(self, tokens: int, budget: int, alpha: float) -> ModelLengths:
        share = min(1.0, tokens / budget)
        return ModelLengths(
            (1 - alpha) * self.tokens + alpha * tokens,
            (1 - alpha) * self.share + alpha * share,
            (1 - alpha) * self.tokens_err + alpha * abs(min(budget, self.tokens) - tokens),
            (1 - alpha) * self.share_err + alpha * abs(self.share * budget - tokens),
        )


@dataclass(frozen=True, slots=True)
class CompletionLengths:
    """The learned lengths of every model seen."""

    models: Mapping[str, ModelLengths] = field(default_factory=dict)
    alpha: float = EWMA_ALPHA
    pooled: ModelLengths | None = None  # over every model: the prior of a model not seen yet

    @property
    def tokens(self) -> dict[str, float]:
        """Mean completion tokens per model (what `hybridd status` shows)."""
        return {model: m.tokens for model, m in self.models.items()}

    def expect(self, model: str, budget: int) -> int:
        """Tokens a completion of `model` with max_tokens `budget` is expected to run to."""
        seen = self.models.get(model) or self.pooled
        return budget if seen is None else seen.expect(budget)

    def observe(self, model: str, tokens: int, budget: int) -> CompletionLengths:
        """A new estimate with one finished completion of `tokens`, out of a budget of `budget`, folded in."""
        if tokens <= 0 or budget <= 0:
            return self
        return CompletionLengths({**self.models, model: self._fold(self.models.get(model), tokens, budget)},
                                 self.alpha, self._fold(self.pooled, tokens, budget))

    def _fold(self, old: ModelLengths | None, tokens: int, budget: int) -> ModelLengths:
        return ModelLengths(tokens, min(1.0, tokens / budget)) if old is None else old.observe(tokens, budget,
                                                                                               self.alpha)
