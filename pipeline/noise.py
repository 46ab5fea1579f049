"""Seeded randomness of the masked-diffusion objective: generators keyed by integers, diffusion times, masks.

Every draw is a pure function of integer keys (seed, step, rank, sequence ...), so a resumed run, a
re-evaluated checkpoint or a rescored task sees the very same masks (docs/method.md §2).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def generator(*keys: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator seeded by a well-mixed hash of integer keys (seed, step, rank, ...)."""
    state = np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(2, dtype=np.uint64)
    return torch.Generator(device=device).manual_seed(int(state[0] >> 1))


def diffusion_times(total: int, generator: torch.Generator, stratified: bool = True) -> torch.Tensor:
    """`total` times in (0, 1): one shared offset u, t_i = (i + u) / total (stratified), or iid uniform.

    Every rank calls this with the same generator state and takes its own slice, so the stratification
    spans the global batch.
    """
    device = generator.device
    if stratified:
        offset = torch.rand((), generator=generator, device=device, dtype=torch.float64)
        return ((torch.arange(total, device=device, dtype=torch.float64) + offset) / total).float()
    return torch.rand(total, generator=generator, device=device)


@dataclass(frozen=True)
class Masking:
    """Which tokens of each row are masked, and the probability p each was masked with (the 1/p weight)."""
    masked: torch.Tensor   # bool [B, L]
    p: torch.Tensor        # float32 [B]

    def to(self, device: torch.device) -> "Masking":
        return Masking(self.masked.to(device), self.p.to(device))


def masking(t: torch.Tensor, u: torch.Tensor, eps: float) -> Masking:
    """Times t [B] and uniforms u [B, L] to masks: p = (1 − ε)t + ε, token j of row i masked when u_ij < p_i."""
    p = (1 - eps) * t + eps
    return Masking(u < p.unsqueeze(1), p)


@dataclass(frozen=True)
class MonteCarlo:
    """How an MDM's likelihood bound is estimated: K seeded draws of (t, mask), evaluated batch_size at a time.

    An ARM's likelihood is exact, so it reads only batch_size.
    """
    samples: int = 128         # K draws per sequence
    seed: int = 0
    eps: float = 1e-3          # the training loss's mask floor
    stratified: bool = True    # t stratified over the K draws
    batch_size: int = 32       # rows per forward
    cfg: float = 0.0           # unsupervised classifier-free guidance weight W (scoring with a prompt)


def draws(mc: MonteCarlo, length: int, *keys: int, device: str | torch.device = "cpu") -> Masking:
    """mc.samples maskings of `length` tokens, seeded by (mc.seed, *keys)."""
    g = generator(mc.seed, *keys, device=device)
    t = diffusion_times(mc.samples, g, mc.stratified)
    return masking(t, torch.rand(mc.samples, length, generator=g, device=device), mc.eps)
