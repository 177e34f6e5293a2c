"""Choosing the next token: pure functions over logits, in the order transformers applies them."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``do_sample=False`` is greedy (argmax after the repetition penalty)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filtering
    top_p: float = 1.0  # 1.0: no nucleus filtering
    repetition_penalty: float = 1.0  # 1.0: none; >1 discourages tokens already in the sequence
    seed: int | None = None

    @classmethod
    def from_temperature(
        cls,
        temperature: float,
        *,
        top_p: float | None = None,
        top_k: int | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
    ) -> SamplingParams:
        """OpenAI-style settings: temperature 0 means greedy (the temperature itself then plays no part);
        ``None`` means no nucleus or top-k filtering and no repetition penalty.

        Every face that takes a temperature (the OpenAI API, LangChain, LlamaIndex) builds its settings
        here; each decides only what an absent temperature means to its users.
        """
        do_sample = temperature > 0
        return cls(
            do_sample=do_sample,
            temperature=float(temperature) if do_sample else 1.0,
            top_k=int(top_k or 0),
            top_p=1.0 if top_p is None else float(top_p),
            repetition_penalty=1.0 if repetition_penalty is None else float(repetition_penalty),
            seed=seed,
        )

    def __post_init__(self) -> None:
        if self.temperature <= 0 and self.do_sample:
            raise ValueError("temperature must be > 0 when sampling (use do_sample=False for greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def sampling_params(
    sampling: SamplingParams | None,
    do_sample: bool,
    temperature: float,
    top_k: int,
    top_p: float,
    repetition_penalty: float,
    seed: int | None,
) -> SamplingParams:
    """The one place where the keyword arguments of ``generate`` and ``stream_text`` (transformers' names)
    become a :class:`SamplingParams`; a given ``sampling`` wins over them."""
    if sampling is not None:
        return sampling
    return SamplingParams(do_sample, temperature, top_k, top_p, repetition_penalty, seed)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive / multiply negative logits of tokens in ``seen`` [batch, n] by ``penalty``."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = torch.gather(logits, 1, seen)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits.scatter(1, seen, picked)


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` highest logits of each row."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches ``p`` (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop = cumulative - sorted_logits.softmax(-1) >= p  # mass before this token already reaches p
    drop[..., 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter(-1, order, sorted_logits)


def token_probs(logits: torch.Tensor, seen: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution sampling draws from: [batch, vocab] logits, [batch, n] ids so far → [batch, vocab] probs
    (repetition penalty, temperature, top-k, top-p, softmax)."""
    logits = apply_repetition_penalty(logits.float(), seen, params.repetition_penalty)
    logits = logits / params.temperature
    logits = filter_top_p(filter_top_k(logits, params.top_k), params.top_p)
    return logits.softmax(-1)


def next_tokens(
    logits: torch.Tensor, seen: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Pick one token per row. logits: [batch, vocab] float; seen: [batch, n] ids so far → [batch]."""
    if not params.do_sample:
        return apply_repetition_penalty(logits.float(), seen, params.repetition_penalty).argmax(-1)
    probs = token_probs(logits, seen, params)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
