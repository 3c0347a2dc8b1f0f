"""The numba decoder of nexus.decode against the full forward and the PyTorch step: logits
at every position, greedy bytes, seeded sampling, stale weights, and the fallback."""

from __future__ import annotations

import pytest
import torch

from nexus import decode
from nexus.config import ModelConfig, preset
from nexus.generation import generate
from nexus.model import NexusLM

pytestmark = pytest.mark.skipif(not decode.FAST_DECODE_ENABLED, reason="numba is not available")

CONFIGS = {
    "nexus-tiny": preset("nexus-tiny"),
    # Mamba-2 with two B/C groups, attention first with a single KV head.
    "mamba2": ModelConfig(
        d_model=64, n_layers=3, attention_layers=(0,), n_heads=4, n_kv_heads=1, ssm="mamba2",
        d_state=8, ssm_head_dim=16, n_groups=2, mlp_hidden=96,
    ),
    # Tied and smaller vocabulary, dt_rank != d_state, a short conv, attention last.
    "odd-sizes": ModelConfig(
        vocab_size=128, d_model=48, n_layers=3, attention_layers=(2,), n_heads=4, n_kv_heads=2,
        d_state=4, dt_rank=3, d_conv=2, mlp_hidden=40, tie_embeddings=True,
    ),
}  # fmt: skip


def model_of(name: str, seed: int = 0) -> NexusLM:
    torch.manual_seed(seed)
    return NexusLM(CONFIGS[name]).eval()


def recomputed_greedy(model: NexusLM, prompt: bytes, count: int) -> bytes:
    """Argmax decoding with the full forward over the whole sequence at every byte."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(count):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return bytes(ids[len(prompt) :])


def torch_step_generate(monkeypatch: pytest.MonkeyPatch, *args, **kwargs) -> bytes:
    with monkeypatch.context() as patch:
        patch.setattr(decode, "FAST_DECODE_ENABLED", False)
        assert not decode.supported(args[0])
        return generate(*args, **kwargs)


@pytest.mark.parametrize("name", list(CONFIGS))
# Prefilled by the kernel (3 bytes, shorter than d_conv) and by PyTorch (longer prompts).
@pytest.mark.parametrize("prompt_length", [3, decode.KERNEL_PREFILL_MAX + 4])
def test_decoder_steps_match_the_full_forward(name: str, prompt_length: int) -> None:
    model = model_of(name)
    length = prompt_length + 37
    ids = torch.randint(
        0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(3)
    )
    with torch.no_grad():
        full = model(ids)[0]
    decoder = decode.Decoder(model, length)
    stepped = [decoder.prefill(ids[0, :prompt_length].tolist()).clone()]
    for position in range(prompt_length, length):
        stepped.append(decoder.step(int(ids[0, position])).clone())
    torch.testing.assert_close(
        torch.stack(stepped[:-1]), full[prompt_length - 1 : -1], atol=1e-4, rtol=1e-4
    )
    with pytest.raises(ValueError, match=f"holds {length} positions"):
        decoder.step(0)
    # A second prefill starts from empty caches again.
    torch.testing.assert_close(
        decoder.prefill(ids[0, :prompt_length].tolist()), stepped[0], atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fast_greedy_generation_equals_recomputation_and_the_torch_step(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = model_of(name, seed=1)
    prompt = b"To be, or not"
    fast = generate(model, prompt, 64, temperature=0)
    assert fast == recomputed_greedy(model, prompt, 64)
    assert fast == torch_step_generate(monkeypatch, model, prompt, 64, temperature=0)


def test_fast_sampling_equals_the_torch_step_with_a_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    model = model_of("nexus-tiny")
    options = {"temperature": 0.9, "top_k": 20, "top_p": 0.95, "seed": 7}
    threads = torch.get_num_threads()
    fast = generate(model, b"ROMEO:", 48, **options)
    assert fast == generate(model, b"ROMEO:", 48, **options)
    assert fast == torch_step_generate(monkeypatch, model, b"ROMEO:", 48, **options)
    assert generate(model, b"", 5, temperature=0) == generate(model, b"\n", 5, temperature=0)
    assert generate(model, b"ROMEO:", 0) == b""
    assert torch.get_num_threads() == threads  # one thread while generating, then restored


def test_reference_preset_fast_greedy_generation_equals_recomputation() -> None:
    torch.manual_seed(0)
    model = NexusLM(preset("nexus-6m")).eval()
    assert generate(model, b"ROMEO:", 64, temperature=0) == recomputed_greedy(model, b"ROMEO:", 64)


def test_changed_weights_are_used() -> None:
    model = model_of("nexus-tiny")
    before = generate(model, b"To be", 16, temperature=0)
    with torch.no_grad():
        model.lm_head.weight.data.mul_(-1.0)  # in place, behind autograd's version counter
    after = generate(model, b"To be", 16, temperature=0)
    assert after != before and after == recomputed_greedy(model, b"To be", 16)


def test_models_off_the_fast_path_use_the_torch_step() -> None:
    model = model_of("nexus-tiny").double()
    assert not decode.supported(model)
    with pytest.raises(ValueError, match="float32 model on the CPU"):
        decode.Decoder(model, 8)
    assert generate(model, b"To be", 24, temperature=0) == recomputed_greedy(model, b"To be", 24)


def test_moe_models_use_the_torch_step() -> None:
    torch.manual_seed(0)
    model = NexusLM(preset("nexus-tiny-moe")).eval()
    assert not decode.supported(model)
    assert generate(model, b"To be", 24, temperature=0) == recomputed_greedy(model, b"To be", 24)


def test_parallel_matrix_products_give_the_same_logits_on_any_thread_count() -> None:
    # nexus-6m's matrices are large enough to be split across threads (the tiny ones are not).
    torch.manual_seed(0)
    model = NexusLM(preset("nexus-6m")).eval()
    assert model.model.layers[0].mamba.in_proj.weight.numel() >= decode._PARALLEL_MIN_WEIGHTS
    ids = torch.randint(0, 256, (12,), generator=torch.Generator().manual_seed(5)).tolist()
    runs = []
    for threads in (1, 2):
        decoder = decode.Decoder(model, len(ids), threads=threads)
        logits = [decoder.prefill(ids[:4]).clone()]
        logits += [decoder.step(token).clone() for token in ids[4:]]
        runs.append(torch.stack(logits))
    assert torch.equal(runs[0], runs[1])
    with torch.no_grad():
        full = model(torch.tensor([ids]))[0, 3:]
    torch.testing.assert_close(runs[0], full, atol=1e-4, rtol=1e-4)
