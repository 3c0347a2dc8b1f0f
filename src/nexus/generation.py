"""Text generation with the recurrent cache: temperature, top-k, top-p and a seed."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from nexus import decode
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
    """The prompt's continuation (new bytes only), one cached step per byte.

    A float32 model on the CPU decodes with the numba kernel of `nexus.decode` (greedy
    decoding entirely inside it, its large matrix-vector products on the caller's torch thread
    count), any other with `NexusLM.step`. On the CPU, PyTorch runs one intra-op thread
    meanwhile (restored after): its batch-1 operations are too small to share, and a second
    thread only adds synchronisation, which costs whole time slices on a busy machine."""
    if not prompt:
        prompt = b"\n"  # the model needs one byte to condition on
    if max_new_tokens <= 0:
        return b""
    generator = torch.Generator(device="cpu")
    if seed is not None:
        generator.manual_seed(seed)

    def pick(logits: Tensor) -> int:
        token = sample_next(
            logits.cpu(), temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
        )
        return int(token[0])

    was_training, threads = model.training, torch.get_num_threads()
    on_cpu = next(model.parameters()).device.type == "cpu"
    model.eval()
    if on_cpu:
        torch.set_num_threads(1)
    try:
        if decode.supported(model):
            return _generate_fast(
                model, prompt, max_new_tokens, pick, greedy=temperature == 0, threads=threads
            )
        return _generate_stepwise(model, prompt, max_new_tokens, pick)
    finally:
        model.train(was_training)
        if on_cpu:
            torch.set_num_threads(threads)


def _generate_fast(
    model: NexusLM,
    prompt: bytes,
    count: int,
    pick: Callable[[Tensor], int],
    greedy: bool,
    threads: int,
) -> bytes:
    decoder = decode.Decoder(model, len(prompt) + count, threads=threads)
    new_bytes = [pick(decoder.prefill(list(prompt))[None])]
    if greedy:
        return bytes(new_bytes + decoder.greedy(new_bytes[0], count - 1))
    while len(new_bytes) < count:  # no step for the last byte: nothing reads its logits
        new_bytes.append(pick(decoder.step(new_bytes[-1])[None]))
    return bytes(new_bytes)


def _generate_stepwise(
    model: NexusLM, prompt: bytes, count: int, pick: Callable[[Tensor], int]
) -> bytes:
    device = next(model.parameters()).device
    logits, cache = model.prefill(torch.tensor([list(prompt)], dtype=torch.long, device=device))
    new_bytes = [pick(logits[:, -1])]
    while len(new_bytes) < count:
        token = torch.tensor([new_bytes[-1]], dtype=torch.long, device=device)
        logits, cache = model.step(token, cache)
        new_bytes.append(pick(logits))
    return bytes(new_bytes)
