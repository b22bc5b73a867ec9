"""Text decoding (greedy, temperature, top-p) and teacher-forced scoring of candidate answers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from srum.generation.context import ContextBatch


@dataclass(frozen=True)
class DecodingConfig:
    max_new_tokens: int = 1024
    """Tokens decoded at most per context (the end token not counted)."""
    do_sample: bool = False
    """Sample instead of taking the most likely token."""
    temperature: float = 1.0
    """Softmax temperature when sampling."""
    top_p: float = 1.0
    """Nucleus: sample among the most likely tokens whose probabilities sum to at least top_p."""
    stop_token_ids: tuple[int, ...] = ()
    """Tokens that end an answer besides ``<|im_end|>`` (not included in it)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected at least 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature: expected a positive number when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: expected a number in (0, 1], got {self.top_p}")


def pick_tokens(logits: Tensor, config: DecodingConfig, generator: torch.Generator | None = None) -> Tensor:
    """Next token per row of logits (B, vocab)."""
    if not config.do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / config.temperature, dim=-1)
    if config.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= config.top_p  # tokens after the nucleus is full
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate_text(contexts: ContextBatch, config: DecodingConfig, generator: torch.Generator | None = None,
                  on_logits: Callable[[Tensor], None] | None = None) -> list[list[int]]:
    """Decode one answer per context, BAGEL's way: from ``<|im_start|>`` at each context's next position,
    on a copy of the contexts (which stay unchanged), until ``<|im_end|>`` (or a stop token) or
    ``max_new_tokens``.

    Returns the decoded ids of each context, without the start and end tokens. Each context stops on its own.
    """
    work = contexts.fork()
    special = contexts.special
    tokens = torch.full((work.batch_size,), special.bos_token_id, dtype=torch.long, device=work.device)
    finished = torch.zeros(work.batch_size, dtype=torch.bool, device=work.device)
    answers: list[list[int]] = [[] for _ in range(work.batch_size)]
    stops = {special.eos_token_id, *config.stop_token_ids}
    for _ in range(config.max_new_tokens):
        logits = work.decode_step(tokens)
        if on_logits is not None:
            on_logits(logits)
        tokens = pick_tokens(logits, config, generator)
        for row in (~finished).nonzero().flatten().tolist():
            if int(tokens[row]) in stops:
                finished[row] = True
            else:
                answers[row].append(int(tokens[row]))
        if bool(finished.all()):
            break
    return answers


def candidate_logprobs(contexts: ContextBatch, candidates: list[list[list[int]]]) -> list[Tensor]:
    """Log-probability of each candidate continuation under the model, in one teacher-forced pass.

    ``candidates[b]`` lists token-id continuations for context b; each is scored as an answer that starts with
    ``<|im_start|>`` at the context's next position (as ``generate_text`` would produce it). The candidates of a
    context share its cache (no copy per candidate: a judge scoring 21 options of a 5,000-token context holds
    one context, not 21). Returns one (K_b,) float32 tensor of summed token log-probabilities per context.
    """
    runs = [[[contexts.special.bos_token_id, *option] for option in options] for options in candidates]
    logits = contexts.score_runs(runs)
    predicting = torch.cat([run_logits[:-1] for own in logits for run_logits in own])  # each next token's logits
    device = predicting.device
    targets = torch.tensor([token for own in runs for run in own for token in run[1:]], device=device)
    owner = torch.tensor([index for index, run in enumerate(run for own in runs for run in own)
                          for _ in run[1:]], device=device)
    token_logprobs = torch.log_softmax(predicting.float(), dim=-1).gather(1, targets[:, None])[:, 0]
    totals = torch.zeros(sum(len(own) for own in runs), device=device).index_add_(0, owner, token_logprobs)
    return list(totals.split([len(own) for own in runs]))
