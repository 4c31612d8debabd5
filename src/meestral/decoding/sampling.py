"""How a token is drawn from next-token logits: greedy, temperature, top-k, top-p.

Greedy is the one-hot of the argmax, so speculative verification (catchup.py) treats greedy and
sampled drafts with one rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch



@dataclass
class SamplingOptions:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def check(self):
        from meestral.validation import RULES

        for name in ("max_new_tokens", "temperature", "top_k", "top_p"):  # the CLI's rules (validation.py)
            RULES[name].check(getattr(self, name), name)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, device) -> torch.Generator | None:
        """The random stream of one generation (None: torch's global one)."""
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


def probabilities(logits: torch.Tensor, opts: SamplingOptions) -> torch.Tensor:
    """The distribution tokens are drawn from: temperature, then top-k, then top-p. Greedy
    (temperature 0) is the one-hot of the argmax, so verification treats both alike."""
    if opts.temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits.float() / opts.temperature
    if opts.top_k:
        kth = logits.topk(min(opts.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if opts.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        p = sorted_logits.softmax(-1)
        drop = p.cumsum(-1) - p >= opts.top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits.softmax(-1)


def draw(p: torch.Tensor, opts: SamplingOptions, gen: torch.Generator | None) -> torch.Tensor:
    """One token per row from distributions p [B, V] (greedy: the argmax)."""
    if opts.temperature == 0:
        return p.argmax(-1)
    return torch.multinomial(p, 1, generator=gen).squeeze(-1)


def sample(logits: torch.Tensor, opts: SamplingOptions, gen: torch.Generator | None) -> torch.Tensor:
    """Next token per row from logits [B, V]."""
    if opts.temperature == 0:
        return logits.argmax(-1)
    return draw(probabilities(logits, opts), opts, gen)
