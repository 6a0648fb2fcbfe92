"""A GPT decoder from scratch, in the shapes and names of GPT-2.

Radford et al., "Language Models are Unsupervised Multitask Learners" (2019):
token + learned position embeddings, pre-LayerNorm blocks of causal
self-attention and a GELU MLP, a final LayerNorm and a (tied) output head.
The attention projections are separate ``q_proj, k_proj, v_proj, o_proj`` and
the MLP's ``fc_in, fc_out`` so that LoRA can target each by name; GPT-2's fused
``c_attn`` splits into q/k/v key for key.

This module depends on torch only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# the keys and values of earlier tokens, one (k, v) per layer, each (B, nh, T_past, hs)
KeyValueCache = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linears and LayerNorms, as GPT-2
    tie_weights: bool = True  # lm_head shares the token embedding, as GPT-2

    def __post_init__(self):
        check_transformer_config(self, ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"))


def check_transformer_config(config, positive_ints: tuple[str, ...]) -> None:
    """One ValueError naming the bad field of a GPT-style config (also the ViT's): sizes are
    positive integers, the heads divide the width, dropout is in [0, 1)."""
    kind = type(config).__name__
    for name in positive_ints:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{kind} {name}={value!r} is invalid: expected a positive integer")
    if config.n_embd % config.n_head:
        raise ValueError(f"{kind} n_embd={config.n_embd} is not divisible by n_head={config.n_head}")
    if not 0 <= config.dropout < 1:
        raise ValueError(f"{kind} dropout={config.dropout!r} is invalid: expected a number in [0, 1)")


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention; ``causal=False`` lets every position see every other
    (a ViT's patches, which have no order to respect)."""

    def __init__(self, config: GPTConfig, causal: bool = True):
        super().__init__()
        self.n_head, self.dropout, self.causal = config.n_head, config.dropout, causal
        self.q_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.k_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.v_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.o_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None):
        B, T, C = x.size()
        q, k, v = (proj(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))  # (B, nh, T, hs)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, nh, T_past + T, hs)
        T_past = k.size(2) - T
        if T_past == 0 or T == 1:  # plain causal mask, or one new token that sees everything
            mask, is_causal = None, self.causal and T_past == 0
        else:  # new queries sit after T_past cached keys
            mask = torch.ones(T, T_past + T, dtype=torch.bool, device=x.device).tril(diagonal=T_past)
            is_causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.o_proj(y)), (k, v)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc_in = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.fc_out = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc_out(F.gelu(self.fc_in(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, causal: bool = True):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, causal)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, past=None):
        a, present = self.attn(self.ln_1(x), past)
        x = x + a
        return x + self.mlp(self.ln_2(x)), present


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith(("o_proj.weight", "fc_out.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / (2 * config.n_layer) ** 0.5)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KeyValueCache | None = None):
        """idx (B, T) token ids -> logits (B, T, vocab), and the mean cross-entropy when
        ``targets`` (B, T) are given (index -1 is ignored). With ``cache`` (a list, empty
        at first), keys and values of earlier calls are reused and extended in place."""
        B, T = idx.size()
        T_past = cache[0][0].size(2) if cache else 0
        if T_past + T > self.config.block_size:
            raise ValueError(f"sequence of length {T_past + T} exceeds block_size={self.config.block_size}")
        pos = torch.arange(T_past, T_past + T, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x, present = block(x, cache[i] if T_past else None)
            if cache is not None:
                cache[i:i + 1] = [present]  # append on the first call, replace after
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, use_cache: bool = True) -> torch.Tensor:
        """Append ``max_new_tokens`` tokens to idx (B, T). temperature=0 is greedy.

        With ``use_cache`` each step feeds only the newest token; once the context
        outgrows ``block_size`` it is cropped and the cache rebuilt from the crop.
        """
        cache: KeyValueCache | None = None
        for _ in range(max_new_tokens):
            if cache and idx.size(1) <= self.config.block_size:
                logits, _ = self(idx[:, -1:], cache=cache)  # only the newest token is new
            else:
                cache = [] if use_cache else None
                logits, _ = self(idx[:, -self.config.block_size:], cache=cache)
            idx = torch.cat([idx, self._sample(logits[:, -1, :], temperature, top_k)], dim=1)
        return idx

    @staticmethod
    def _sample(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
        if temperature == 0:
            return logits.argmax(dim=-1, keepdim=True)
        logits = logits / temperature
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
