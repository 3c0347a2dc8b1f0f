"""The Jamba-style hybrid: RMSNorm, Mamba mixers (Mamba-1, or Mamba-2 with `ssm="mamba2"`),
grouped-query attention, SwiGLU MLP or Jamba's sparse mixture of SwiGLU experts, the decoder
layers and the stack, with a recurrent cache for generation.

Module and parameter names match Hugging Face's `JambaForCausalLM` exactly
(`model.layers.3.self_attn.q_proj.weight`, `model.layers.0.mamba.A_log`, ...): they are the
export contract, so do not rename them. An MoE layer's experts are stacked in 3-D tensors, as
in transformers 5's module (`feed_forward.experts.gate_up_proj`); the export splits them into
the per-expert tensors that `save_pretrained` writes. The Mamba-2 mixer's names follow Hugging
Face's `BambaForCausalLM` mixer (`mamba.in_proj`, `mamba.dt_bias`, `mamba.norm.weight`, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nexus.config import ModelConfig
from nexus.scan import selective_scan, selective_scan_step
from nexus.ssd import ssd_scan, ssd_step

# Mamba's Δ initialisation: softplus(dt_proj.bias) log-uniform in [DT_MIN, DT_MAX], so each
# channel starts with a memory between ~10 and ~1000 steps. Hugging Face's Jamba leaves the bias
# at 0 (Δ ≈ 0.69, a memory of a few bytes), which makes small models learn slowly.
DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 1e-1, 1e-4
INIT_STD = 0.02
# Mamba-2's A initialisation: A = -uniform(A_MIN, A_MAX) per head.
A_MIN, A_MAX = 1.0, 16.0


class RMSNorm(nn.Module):
    """x / rms(x) · weight, computed in fp32 as Jamba does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class GatedRMSNorm(nn.Module):
    """Mamba-2's output norm: rms-normalise y · silu(z) over groups of `group_size` channels
    (one group per B/C group, as in Mamba-2), then scale by weight; in fp32."""

    def __init__(self, dim: int, eps: float, group_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.group_size = group_size

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        gated = (y * F.silu(z)).float().unflatten(-1, (-1, self.group_size))  # (..., G, E/G)
        normed = gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.flatten(-2).to(y.dtype)


@dataclass
class MambaState:
    """Cache of one Mamba layer: the last d_conv inputs of the conv and the SSM state."""

    conv: Tensor  # (B, E, K)
    ssm: Tensor  # (B, E, N)


@dataclass
class Mamba2State:
    """Cache of one Mamba-2 layer: the last d_conv conv inputs (x, B and C channels) and the
    SSM state of every head."""

    conv: Tensor  # (B, E + 2·G·N, K)
    ssm: Tensor  # (B, H, P, N)


@dataclass
class AttentionState:
    """Cache of one attention layer: keys and values of every position so far."""

    keys: Tensor  # (B, kv_heads, T, head_dim)
    values: Tensor  # (B, kv_heads, T, head_dim)


LayerState = MambaState | Mamba2State | AttentionState


def causal_conv(conv1d: nn.Conv1d, padded: Tensor, T: int) -> Tensor:
    """Depthwise causal conv of padded (B, K-1+T, C) -> (B, T, C) with conv1d's weight/bias."""
    # K shifted multiply-adds in (B, T, C) layout: no transposes, and on CPU several times
    # faster than Conv1d(groups=C), forward and backward.
    weight = conv1d.weight[:, 0, :]  # (C, K)
    out = conv1d.bias + padded[:, :T] * weight[:, 0]
    for k in range(1, weight.shape[1]):
        out = out + padded[:, k : k + T] * weight[:, k]
    return out


class MambaMixer(nn.Module):
    """Mamba-1 selective SSM with Jamba's RMSNorms on Δ, B and C."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        E, N, R, K = config.d_inner, config.d_state, config.dt_rank, config.d_conv
        self.d_inner, self.d_state, self.dt_rank, self.d_conv = E, N, R, K
        self.in_proj = nn.Linear(config.d_model, 2 * E, bias=False)  # rows: [x branch; gate z]
        self.conv1d = nn.Conv1d(E, E, K, groups=E, padding=K - 1, bias=True)
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)  # rows: [Δ; B; C]
        self.dt_layernorm = RMSNorm(R, config.norm_eps)
        self.b_layernorm = RMSNorm(N, config.norm_eps)
        self.c_layernorm = RMSNorm(N, config.norm_eps)
        self.dt_proj = nn.Linear(R, E, bias=True)
        self.A_log = nn.Parameter(torch.empty(E, N))
        self.D = nn.Parameter(torch.empty(E))
        self.out_proj = nn.Linear(E, config.d_model, bias=False)

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        # S4D-real: A = -(1..N) per channel, a spread of decay rates from the start.
        arange = torch.arange(1, self.d_state + 1, dtype=torch.float32)
        self.A_log.copy_(torch.log(arange).expand(self.d_inner, -1))
        self.D.fill_(1.0)
        bound = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        log_dt = torch.rand(self.d_inner) * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN)
        dt = log_dt.exp().clamp(min=DT_FLOOR)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus

    def _ssm_inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Δ before its softplus (the scan applies it), A, and the normalised B and C."""
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = self.dt_proj(self.dt_layernorm(dt))  # (B, T, E)
        A = -torch.exp(self.A_log.float())  # (E, N)
        return dt, A, self.b_layernorm(B), self.c_layernorm(C)

    def _causal_conv(self, padded: Tensor, T: int) -> Tensor:
        return causal_conv(self.conv1d, padded, T)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.prefill(hidden)[0]

    def prefill(self, hidden: Tensor) -> tuple[Tensor, MambaState]:
        T = hidden.shape[1]
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (B, T, E) each
        padded = F.pad(x, (0, 0, self.d_conv - 1, 0))  # (B, K-1+T, E): causal left padding
        x = F.silu(self._causal_conv(padded, T))  # (B, T, E)
        # The cache keeps the last d_conv conv inputs (zeros before the prompt).
        conv_state = padded[:, -self.d_conv :].transpose(1, 2)  # (B, E, K)
        dt, A, B, C = self._ssm_inputs(x)
        y, ssm_state = selective_scan(x, dt, A, B, C, self.D, return_state=True, dt_softplus=True)
        y = y * F.silu(z)
        return self.out_proj(y), MambaState(conv=conv_state.contiguous(), ssm=ssm_state)

    def step(self, hidden: Tensor, state: MambaState) -> tuple[Tensor, MambaState]:
        """One new position: hidden (B, 1, d_model)."""
        x, z = self.in_proj(hidden[:, 0]).chunk(2, dim=-1)  # (B, E) each
        conv = torch.cat([state.conv[:, :, 1:], x.unsqueeze(-1)], dim=-1)  # (B, E, K)
        x = (conv * self.conv1d.weight[:, 0, :]).sum(-1) + self.conv1d.bias
        x = F.silu(x)
        dt, A, B, C = self._ssm_inputs(x)
        y, ssm = selective_scan_step(state.ssm, x, F.softplus(dt), A, B, C, self.D)
        y = y * F.silu(z)
        return self.out_proj(y).unsqueeze(1), MambaState(conv=conv, ssm=ssm)


class Mamba2Mixer(nn.Module):
    """Mamba-2 (SSD): one scalar decay per head, B and C shared by groups of heads, computed
    by the chunked SSD scan. Layout of Hugging Face Bamba's mixer."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        E, N, G, K = config.d_inner, config.d_state, config.n_groups, config.d_conv
        H, P = config.ssm_heads, config.ssm_head_dim
        self.d_inner, self.d_state, self.n_groups, self.d_conv = E, N, G, K
        self.n_heads, self.head_dim = H, P
        self.conv_dim = E + 2 * G * N  # the conv runs over x, B and C together
        # One projection for everything, rows: [gate z (E); x (E); B (G·N); C (G·N); Δ (H)].
        self.in_proj = nn.Linear(config.d_model, E + self.conv_dim + H, bias=False)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, K, groups=self.conv_dim, padding=K - 1, bias=True
        )
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.A_log = nn.Parameter(torch.empty(H))
        self.D = nn.Parameter(torch.empty(H))
        self.norm = GatedRMSNorm(E, config.norm_eps, group_size=E // G)
        self.out_proj = nn.Linear(E, config.d_model, bias=False)

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        # Mamba-2's init: decay rates A spread over [1, 16] across heads; Δ as in Mamba-1.
        self.A_log.copy_(torch.empty(self.n_heads).uniform_(A_MIN, A_MAX).log())
        self.D.fill_(1.0)
        log_dt = torch.rand(self.n_heads) * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN)
        dt = log_dt.exp().clamp(min=DT_FLOOR)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus

    def _split(self, projected: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """in_proj output (..., ·) -> z (..., E), conv input xBC (..., E+2GN), Δ (..., H)."""
        return projected.split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)

    def _ssm_inputs(self, xbc: Tensor, dt: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Conv output (..., E+2GN) and raw Δ (..., H) -> x (..., H, P), Δ, A, B, C (..., G, N)."""
        x, B, C = xbc.split(
            [self.d_inner, self.n_groups * self.d_state, self.n_groups * self.d_state], dim=-1
        )
        x = x.unflatten(-1, (self.n_heads, self.head_dim))
        B = B.unflatten(-1, (self.n_groups, self.d_state))
        C = C.unflatten(-1, (self.n_groups, self.d_state))
        dt = F.softplus(dt + self.dt_bias)
        A = -torch.exp(self.A_log.float())  # (H,)
        return x, dt, A, B, C

    def forward(self, hidden: Tensor) -> Tensor:
        return self.prefill(hidden)[0]

    def prefill(self, hidden: Tensor) -> tuple[Tensor, Mamba2State]:
        T = hidden.shape[1]
        z, xbc, dt = self._split(self.in_proj(hidden))  # (B, T, E), (B, T, E+2GN), (B, T, H)
        padded = F.pad(xbc, (0, 0, self.d_conv - 1, 0))  # (B, K-1+T, E+2GN): causal padding
        xbc = F.silu(causal_conv(self.conv1d, padded, T))
        conv_state = padded[:, -self.d_conv :].transpose(1, 2)  # (B, E+2GN, K)
        x, dt, A, B, C = self._ssm_inputs(xbc, dt)
        y, ssm_state = ssd_scan(x, dt, A, B, C, self.D, return_state=True)  # (B, T, H, P)
        y = self.norm(y.flatten(-2), z)  # (B, T, E)
        return self.out_proj(y), Mamba2State(conv=conv_state.contiguous(), ssm=ssm_state)

    def step(self, hidden: Tensor, state: Mamba2State) -> tuple[Tensor, Mamba2State]:
        """One new position: hidden (B, 1, d_model)."""
        z, xbc, dt = self._split(self.in_proj(hidden[:, 0]))  # (B, E), (B, E+2GN), (B, H)
        conv = torch.cat([state.conv[:, :, 1:], xbc.unsqueeze(-1)], dim=-1)  # (B, E+2GN, K)
        xbc = F.silu((conv * self.conv1d.weight[:, 0, :]).sum(-1) + self.conv1d.bias)
        x, dt, A, B, C = self._ssm_inputs(xbc, dt)
        y, ssm = ssd_step(state.ssm, x, dt, A, B, C, self.D)  # (B, H, P)
        y = self.norm(y.flatten(-2), z)  # (B, E)
        return self.out_proj(y).unsqueeze(1), Mamba2State(conv=conv, ssm=ssm)


class Attention(nn.Module):
    """Causal grouped-query attention without positional encoding, as in Jamba."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.n_heads,
            config.n_kv_heads,
            config.head_dim,
        )
        kv_dim = config.n_kv_heads * config.head_dim
        self.q_proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.k_proj = nn.Linear(config.d_model, kv_dim, bias=False)
        self.v_proj = nn.Linear(config.d_model, kv_dim, bias=False)
        self.o_proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def _heads(self, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, T, _ = hidden.shape
        q = self.q_proj(hidden).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v  # (B, heads, T, head_dim)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        B, _, T, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def forward(self, hidden: Tensor) -> Tensor:
        q, k, v = self._heads(hidden)
        return self._attend(q, k, v, causal=True)

    def prefill(self, hidden: Tensor) -> tuple[Tensor, AttentionState]:
        q, k, v = self._heads(hidden)
        return self._attend(q, k, v, causal=True), AttentionState(keys=k, values=v)

    def step(self, hidden: Tensor, state: AttentionState) -> tuple[Tensor, AttentionState]:
        q, k, v = self._heads(hidden)
        keys = torch.cat([state.keys, k], dim=2)
        values = torch.cat([state.values, v], dim=2)
        # The single new query may see every cached position, so no mask is needed.
        return self._attend(q, keys, values, causal=False), AttentionState(keys, values)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) · up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(config.mlp_hidden, config.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class RoutingStats:
    """What the load-balancing loss needs of one MoE layer's forward."""

    assignments: Tensor  # (experts,) how many (token, top-k slot) pairs chose each expert
    probability_sum: Tensor  # (experts,) router probabilities summed over tokens (with grad)
    tokens: int


class Experts(nn.Module):
    """num_experts SwiGLU MLPs, stacked: gate_up_proj (experts, 2·hidden, d_model) holds each
    expert's gate rows then up rows, down_proj (experts, d_model, hidden)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        E, d, hidden = config.num_experts, config.d_model, config.mlp_hidden
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * hidden, d))
        self.down_proj = nn.Parameter(torch.empty(E, d, hidden))

    def forward(self, tokens: Tensor, counts: list[int]) -> Tensor:
        """tokens (n, d_model) sorted by expert, counts[e] of them for expert e -> (n, d_model)."""
        outputs = []
        for expert, rows in enumerate(tokens.split(counts)):
            gate, up = F.linear(rows, self.gate_up_proj[expert]).chunk(2, dim=-1)
            outputs.append(F.linear(F.silu(gate) * up, self.down_proj[expert]))
        return torch.cat(outputs)


class SparseMoE(nn.Module):
    """Jamba's sparse mixture of experts: the router's softmax picks each token's top-k
    experts, whose outputs are summed weighted by their (not renormalised) probabilities.

    Tokens are gathered per expert, so each expert runs one matrix product over its tokens.
    The routing of the last forward is kept in `last_routing` for the load-balancing loss."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_experts, self.top_k = config.num_experts, config.experts_per_token
        self.router = nn.Linear(config.d_model, config.num_experts, bias=False)
        self.experts = Experts(config)
        self.last_routing: RoutingStats | None = None

    def route(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """tokens (n, d_model) -> probabilities (n, experts) in fp32, and the top-k weights
        (n, k) and expert indices (n, k), largest weight first."""
        probabilities = F.softmax(self.router(tokens), dim=-1, dtype=torch.float32)
        weights, chosen = probabilities.topk(self.top_k, dim=-1)
        return probabilities, weights.to(tokens.dtype), chosen

    def forward(self, hidden: Tensor) -> Tensor:
        tokens = hidden.reshape(-1, hidden.shape[-1])  # (n, d_model)
        probabilities, weights, chosen = self.route(tokens)
        expert_of_pair = chosen.flatten()  # (n·k,): pair j is token j // k's (j % k)-th choice
        order = expert_of_pair.argsort(stable=True)
        counts = torch.bincount(expert_of_pair, minlength=self.num_experts)
        token_of_pair = order // self.top_k
        outputs = self.experts(tokens[token_of_pair], counts.tolist())  # (n·k, d_model)
        outputs = outputs * weights.flatten()[order].unsqueeze(-1)
        mixed = outputs.new_zeros(tokens.shape).index_add_(0, token_of_pair, outputs)
        self.last_routing = RoutingStats(counts, probabilities.sum(0), tokens.shape[0])
        return mixed.view(hidden.shape)


def load_balancing_loss(stats: list[RoutingStats], num_experts: int) -> Tensor:
    """Switch Transformer's auxiliary loss as Hugging Face Jamba computes it: the tokens of all
    MoE layers pooled, num_experts · Σ_e f_e · P_e with f_e the top-k assignments to expert e
    per token and P_e its mean router probability. Balanced routing gives top_k."""
    tokens = sum(s.tokens for s in stats)
    assigned = torch.stack([s.assignments for s in stats]).sum(0).float() / tokens
    probability = torch.stack([s.probability_sum for s in stats]).sum(0) / tokens
    return num_experts * (assigned * probability).sum()


class DecoderLayer(nn.Module):
    """Pre-norm residual block: h += mixer(norm(h)); h += mlp(norm(h))."""

    def __init__(self, config: ModelConfig, layer: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = dropout  # on each branch before it joins the residual stream (training)
        self.is_attention = config.is_attention(layer)
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        if self.is_attention:
            self.self_attn = Attention(config)
        elif config.ssm == "mamba2":
            self.mamba = Mamba2Mixer(config)
        else:
            self.mamba = MambaMixer(config)
        self.pre_ff_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.is_moe = config.is_moe(layer)
        self.feed_forward = SparseMoE(config) if self.is_moe else MLP(config)

    @property
    def mixer(self) -> Attention | MambaMixer | Mamba2Mixer:
        return self.self_attn if self.is_attention else self.mamba

    def forward(self, hidden: Tensor) -> Tensor:
        mixed = self.mixer(self.input_layernorm(hidden))
        hidden = hidden + F.dropout(mixed, self.dropout, self.training)
        fed = self.feed_forward(self.pre_ff_layernorm(hidden))
        return hidden + F.dropout(fed, self.dropout, self.training)

    def prefill(self, hidden: Tensor) -> tuple[Tensor, LayerState]:
        mixed, state = self.mixer.prefill(self.input_layernorm(hidden))
        hidden = hidden + mixed
        return hidden + self.feed_forward(self.pre_ff_layernorm(hidden)), state

    def step(self, hidden: Tensor, state: LayerState) -> tuple[Tensor, LayerState]:
        mixed, state = self.mixer.step(self.input_layernorm(hidden), state)
        hidden = hidden + mixed
        return hidden + self.feed_forward(self.pre_ff_layernorm(hidden)), state


class HybridStack(nn.Module):
    """Embedding, the decoder layers and the final norm (Jamba's `model.*`)."""

    def __init__(self, config: ModelConfig, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, dropout) for i in range(config.n_layers)
        )
        self.final_layernorm = RMSNorm(config.d_model, config.norm_eps)


Cache = list[LayerState]


class NexusLM(nn.Module):
    """The hybrid language model over bytes: input ids (B, T) -> logits (B, T, vocab).

    `dropout` regularises training only (the embeddings and every branch into the residual
    stream, as GPT-2); it is a setting of the run, not of the weights, and inference ignores it.
    """

    def __init__(self, config: ModelConfig, dropout: float = 0.0) -> None:
        super().__init__()
        self.config = config
        self.dropout = dropout
        self.model = HybridStack(config, dropout)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # GPT-2 style: N(0, 0.02) everywhere, and the projections that write into the residual
        # stream scaled by 1/sqrt(2·layers) so the stream's variance does not grow with depth.
        residual_std = INIT_STD / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_residual = name.endswith(("out_proj", "o_proj", "down_proj"))
                nn.init.normal_(module.weight, 0.0, residual_std if is_residual else INIT_STD)
            elif isinstance(module, nn.Conv1d):
                module.reset_parameters()
            elif isinstance(module, (RMSNorm, GatedRMSNorm)):
                module.weight.fill_(1.0)
            elif isinstance(module, Experts):
                nn.init.normal_(module.gate_up_proj, 0.0, INIT_STD)
                nn.init.normal_(module.down_proj, 0.0, residual_std)
        for layer in self.model.layers:
            if not layer.is_attention:
                layer.mamba.reset_ssm_parameters()

    def forward(self, input_ids: Tensor) -> Tensor:
        hidden = self.model.embed_tokens(input_ids)  # (B, T, d_model)
        hidden = F.dropout(hidden, self.dropout, self.training)
        for layer in self.model.layers:
            hidden = layer(hidden)
        return self.lm_head(self.model.final_layernorm(hidden))  # (B, T, vocab)

    @torch.no_grad()
    def prefill(self, input_ids: Tensor) -> tuple[Tensor, Cache]:
        """Logits for every prompt position and the cache to continue from."""
        hidden = self.model.embed_tokens(input_ids)
        cache: Cache = []
        for layer in self.model.layers:
            hidden, state = layer.prefill(hidden)
            cache.append(state)
        return self.lm_head(self.model.final_layernorm(hidden)), cache

    @torch.no_grad()
    def step(self, token_ids: Tensor, cache: Cache) -> tuple[Tensor, Cache]:
        """Logits (B, vocab) for one new byte per sequence; costs the same at any length."""
        hidden = self.model.embed_tokens(token_ids).unsqueeze(1)  # (B, 1, d_model)
        new_cache: Cache = []
        for layer, state in zip(self.model.layers, cache, strict=True):
            hidden, state = layer.step(hidden, state)
            new_cache.append(state)
        return self.lm_head(self.model.final_layernorm(hidden))[:, 0], new_cache

    @property
    def has_moe(self) -> bool:
        return bool(self.config.moe_layers)

    def aux_loss(self) -> Tensor:
        """The load-balancing loss of the routing in the last forward (MoE models only)."""
        stats = [layer.feed_forward.last_routing for layer in self.model.layers if layer.is_moe]
        if not stats or any(s is None for s in stats):
            raise RuntimeError("aux_loss() needs a forward of a model with MoE layers first")
        return load_balancing_loss(stats, self.config.num_experts)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once
