"""The Transformer both families share: a Llama-style decoder stack.

RMSNorm pre-norm, SwiGLU MLP, rotary position embeddings, no biases, untied LM head (docs/method.md §1).
A family (`pipeline.model.family`) sets the two switches: `causal` attention (ARM) or not, and `mask_token`,
one extra input embedding row whose id is vocab_size (MDM). Nothing here knows about losses or data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.shapes import Shape


@dataclass(frozen=True)
class ModelConfig:
    shape: Shape
    vocab_size: int
    seq_len: int
    causal: bool              # the attention mask
    mask_token: bool          # an extra input id, vocab_size, that stands for a masked token
    rope_base: float = 10000.0
    init: Literal["smdm", "normal_0.02"] = "smdm"

    @property
    def mask_token_id(self) -> int | None:
        return self.vocab_size if self.mask_token else None

    @property
    def input_vocab_size(self) -> int:
        return self.vocab_size + int(self.mask_token)

    @property
    def llama_compatible(self) -> bool:
        """Whether a standard Llama decoder computes this model: causal attention and no mask token."""
        return self.causal and not self.mask_token

    def attention_fields(self) -> dict:
        """What sets this model apart from a Llama decoder, for a config written beside its weights."""
        return {"is_causal": self.causal, "mask_token_id": self.mask_token_id, "input_vocab_size": self.input_vocab_size}


def init_std(name: str, shape: Shape, scheme: str) -> float:
    """The initial std of the weight matrix `name` (a parameter name of Transformer).

    "smdm", the SMDM code's rule: N(0, sqrt(2 / (5d))) for embeddings, every linear and the head, and
    N(0, 1 / (sqrt(d) * n_layer)) for the two matrices that write into the residual stream (attention output,
    MLP down), so a deep stack starts with a residual stream of the same scale at any size.
    "normal_0.02": N(0, 0.02) everywhere, a scale that suits d ~ 768 only (runs made before `init` existed).
    """
    if scheme == "normal_0.02":
        return 0.02
    d = shape.d_model
    if name.endswith(("attn.proj.weight", "mlp.down.weight")):
        return 1 / (math.sqrt(d) * shape.n_layer)
    return math.sqrt(2 / (5 * d))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in fp32 whatever the compute precision, as under bf16 autocast (a no-op for fp32 runs)
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def rotary_tables(head_size: int, length: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / base ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, T, hs]; rotate the two halves of each head (the GPT-NeoX/Llama layout)
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@dataclass
class KVCache:
    """Keys and values of the positions decoded so far, one pair per layer (ARM decoding)."""
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0


class Attention(nn.Module):
    def __init__(self, shape: Shape, causal: bool):
        super().__init__()
        self.n_head, self.causal = shape.n_head, causal
        self.qkv = nn.Linear(shape.d_model, 3 * shape.d_model, bias=False)
        self.proj = nn.Linear(shape.d_model, shape.d_model, bias=False)

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        past = 0
        if cache is not None:
            if layer < len(cache.keys):
                past = cache.keys[layer].shape[2]
                k = torch.cat((cache.keys[layer], k), dim=2)
                v = torch.cat((cache.values[layer], v), dim=2)
                cache.keys[layer], cache.values[layer] = k, v
            else:
                cache.keys.append(k)
                cache.values.append(v)
        if self.causal and past and T > 1:
            # new queries see every cached position and the causal part of themselves
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal and not past)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    def __init__(self, shape: Shape):
        super().__init__()
        self.gate = nn.Linear(shape.d_model, shape.d_ff, bias=False)
        self.up = nn.Linear(shape.d_model, shape.d_ff, bias=False)
        self.down = nn.Linear(shape.d_ff, shape.d_model, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, shape: Shape, causal: bool):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(shape.d_model), Attention(shape, causal)
        self.mlp_norm, self.mlp = RMSNorm(shape.d_model), SwiGLU(shape)

    def forward(self, x, cos, sin, cache=None, layer=0):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        shape = config.shape
        self.embed = nn.Embedding(config.input_vocab_size, shape.d_model)
        self.blocks = nn.ModuleList(Block(shape, config.causal) for _ in range(shape.n_layer))
        self.norm = RMSNorm(shape.d_model)
        self.head = nn.Linear(shape.d_model, config.vocab_size, bias=False)
        cos, sin = rotary_tables(shape.head_size, config.seq_len, config.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    def init_weights(self) -> None:
        """Every weight matrix from N(0, init_std); RMSNorm gains stay at 1."""
        for name, weight in self.named_parameters():
            if weight.dim() == 2:
                nn.init.normal_(weight, mean=0.0, std=init_std(name, self.config.shape, self.config.init))

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, only: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, vocab_size] for token ids [B, T]; with a cache, idx continues the cached prefix.

        `only` (bool [B, T]) returns the logits of the selected positions alone, [M, vocab_size]: the
        output head is the largest layer of a small model, and the MDM scores masked positions only.
        """
        start = cache.length if cache is not None else 0
        end = start + idx.shape[1]
        if end > self.config.seq_len:
            raise ValueError(f"sequence of {end} tokens exceeds the model context seq_len={self.config.seq_len}")
        cos, sin = self.rope_cos[start:end], self.rope_sin[start:end]
        x = self.embed(idx)
        for layer, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, layer)
        x = self.norm(x)
        return self.head(x if only is None else x[only])

    @property
    def mask_token_id(self) -> int | None:
        return self.config.mask_token_id

    def non_embedding_params(self) -> int:
        """Counted from the modules, so a test can hold it to the shape's formula."""
        excluded = {id(self.embed.weight), id(self.head.weight)}
        return sum(p.numel() for p in self.parameters() if id(p) not in excluded)

    def total_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
