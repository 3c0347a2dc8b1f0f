"""Text generation with the recurrent cache: temperature, top-k, top-p and a seed."""

from __future__ import annotations

import torch
from torch import Tensor

from nexus.model import NexusLM


def sample_next(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick the next byte for each row of logits (B, vocab); temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_best = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a byte when the bytes ranked above it already reach top_p; the best always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(
    model: NexusLM,
    prompt: bytes,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
) -> bytes:
    """The prompt's continuation (new bytes only), one cached step per byte."""
    if not prompt:
        prompt = b"\n"  # the model needs one byte to condition on
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu")
    if seed is not None:
        generator.manual_seed(seed)
    was_training = model.training
    model.eval()
    input_ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    logits, cache = model.prefill(input_ids)
    next_logits = logits[:, -1]
    new_bytes: list[int] = []
    for _ in range(max_new_tokens):
        token = sample_next(
            next_logits.cpu(),
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=generator,
        )
        new_bytes.append(int(token[0]))
        next_logits, cache = model.step(token.to(device), cache)
    model.train(was_training)
    return bytes(new_bytes)
