"""The GPU path, where a CUDA GPU is present (skipped otherwise): bf16 autocast training with
fp32 weights and optimizer state, the SSD (Mamba-2) model and the compiled training step on CUDA
against the CPU, and greedy generation on the GPU against the CPU's bytes.

The Triton scan kernels themselves are tested in test_triton_scan.py (on the GPU there, in
Triton's interpreter elsewhere). `benchmarks/gpu_check.sh` runs this file on a GPU machine."""

from __future__ import annotations

import pytest
import torch

from nexus.config import ModelConfig, TrainConfig, preset
from nexus.generation import generate
from nexus.model import NexusLM
from nexus.optim import build_optimizer
from nexus.training import next_byte_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SSD = ModelConfig(
    d_model=128, n_layers=3, attention_layers=(1,), n_heads=4, n_kv_heads=2, ssm="mamba2",
    d_state=32, ssm_head_dim=32, mlp_hidden=256, seq_len=64,
)  # fmt: skip


def batch_of(config: ModelConfig, size: int = 4, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (size, config.seq_len + 1), generator=generator)


@pytest.mark.parametrize("config", [preset("nexus-tiny"), SSD], ids=["mamba1", "ssd"])
def test_cuda_forward_and_gradients_match_the_cpu(config: ModelConfig) -> None:
    torch.manual_seed(0)
    cpu_model = NexusLM(config)
    gpu_model = NexusLM(config).cuda()
    gpu_model.load_state_dict(cpu_model.state_dict())
    ids = batch_of(config)
    losses = []
    for model, device in ((cpu_model, "cpu"), (gpu_model, "cuda")):
        logits = model(ids[:, :-1].to(device))  # fp32: no autocast outside next_byte_loss
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), ids[:, 1:].flatten().to(device)
        )
        loss.backward()
        losses.append(loss.item())
    # fp32 on both; TF32 matmuls are off by default for float32 in PyTorch.
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    for name, param in cpu_model.named_parameters():
        gpu_grad = dict(gpu_model.named_parameters())[name].grad.cpu()
        torch.testing.assert_close(gpu_grad, param.grad, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_bf16_autocast_training_keeps_fp32_weights_and_learns(compiled: bool) -> None:
    torch.manual_seed(0)
    config = preset("nexus-tiny")
    model = NexusLM(config).cuda()
    optimizer = build_optimizer(model, TrainConfig())
    loss_fn = torch.compile(next_byte_loss, dynamic=False) if compiled else next_byte_loss
    text = torch.tensor(list(b"to be or not to be, that is the question. " * 40))
    starts = torch.arange(0, len(text) - config.seq_len - 1, 7)[:16]
    windows = torch.stack([text[s : s + config.seq_len + 1] for s in starts]).cuda()
    losses = []
    for _ in range(60):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model, windows[:, :-1], windows[:, 1:])  # autocast inside, on CUDA
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    moments = [t for state in optimizer.state.values() for t in state.values() if t.dim() > 0]
    assert moments and all(t.dtype == torch.float32 for t in moments)
    assert losses[-1] < 0.5 * losses[0]  # a repeated sentence is learnt in 60 steps


def test_greedy_generation_on_the_gpu_equals_the_cpu() -> None:
    """Byte for byte, except where the CPU's logits had a near tie: float differences between
    the devices may then pick the other byte, and from there the texts differ. Such a point is
    accepted when the CPU's two best logits there are within 1e-3."""
    torch.manual_seed(0)
    model = NexusLM(preset("nexus-6m")).eval()
    cpu_bytes = generate(model, b"ROMEO:", 200, temperature=0)
    gpu_bytes = generate(model.cuda(), b"ROMEO:", 200, temperature=0)
    if cpu_bytes == gpu_bytes:
        return
    first = next(i for i, (a, b) in enumerate(zip(cpu_bytes, gpu_bytes, strict=True)) if a != b)
    with torch.no_grad():
        logits = model.cpu()(torch.tensor([list(b"ROMEO:" + cpu_bytes[:first])]))[0, -1]
    best_two = logits.topk(2).values
    assert best_two[0] - best_two[1] < 1e-3, f"bytes differ at {first} without a near tie"
