"""Seeded randomness of the masked-diffusion objective: keyed generators, diffusion times, mask counts, masks.

Every draw is a pure function of integer keys (seed, step, rank, sequence ...), so a resumed run, a
re-evaluated checkpoint or a rescored task sees the very same masks (docs/method.md §2).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
    """How an MDM's likelihood bound is estimated: K seeded draws of a mask, evaluated batch_size at a time.

    estimator "time" (SMDM): a time t per draw, each token masked independently with p = (1 − ε)t + ε.
    estimator "count" (LLaDA, Nie et al. 2025 eq. 6): a count l on 1..L per draw, exactly l tokens masked;
    its weight follows the tokens actually masked, which lowers the variance (docs/method.md §2).
    Validation seeds sequence i's draws by (seed, i) under "time", by (eval_seed, i) under "count": a fixed
    seed, not the run's, so every run of a sweep is scored on the same masks (common random numbers).
    An ARM's likelihood is exact, so it reads only batch_size.
    """
    samples: int = 128         # K draws per sequence
    seed: int = 0
    eps: float = 1e-3          # the training loss's mask floor ("time" only)
    stratified: bool = True    # t, or l, stratified over the K draws
    batch_size: int = 32       # rows per forward
    guidance: float = 0.0      # unsupervised classifier-free guidance weight W (scoring with a prompt)
    estimator: Literal["time", "count"] = "time"
    eval_seed: int = 0         # seeds "count" validation in place of seed, whatever the run's seed

    @property
    def validation_seed(self) -> int:
        # "time" keeps the run's seed so finished runs' validation numbers stay reproducible
        return self.eval_seed if self.estimator == "count" else self.seed


def mask_counts(samples: int, length: int, generator: torch.Generator, stratified: bool = True) -> torch.Tensor:
    """`samples` counts l on 1..length, each uniform; stratified: l_k = (floor(k·L/K) + r) mod L + 1.

    One shared rotation r, uniform on 0..L−1, moves every evenly spread floor(k·L/K) to a uniform
    position, so each draw alone is exactly uniform (unbiased for any K) while the K draws cover 1..L
    evenly (K = L: each count once).
    """
    device = generator.device
    if stratified:
        u = torch.rand((), generator=generator, device=device, dtype=torch.float64)
        rotation = torch.clamp((u * length).floor().long(), max=length - 1)
        return (torch.arange(samples, device=device) * length // samples + rotation) % length + 1
    u = torch.rand(samples, generator=generator, device=device, dtype=torch.float64)
    return torch.clamp((u * length).floor().long(), max=length - 1) + 1


def count_masking(counts: torch.Tensor, u: torch.Tensor) -> Masking:
    """Counts l [B] and uniforms u [B, L] to masks: the l positions of smallest u (a uniform l-subset), p = l/L.

    With p = l/L the loss kernel's Σ_masked CE / p / L is LLaDA's Σ_masked CE · (L/l) / L.
    """
    ranks = u.argsort(dim=1).argsort(dim=1)  # ranks, not a threshold on u: exactly l even on ties
    return Masking(ranks < counts.unsqueeze(1), counts.float() / u.shape[1])


def draws(mc: MonteCarlo, length: int, *keys: int, device: str | torch.device = "cpu") -> Masking:
    """mc.samples maskings of `length` tokens, seeded by (mc.seed, *keys), by mc.estimator."""
    g = generator(mc.seed, *keys, device=device)
    if mc.estimator == "count":
        counts = mask_counts(mc.samples, length, g, mc.stratified)
        return count_masking(counts, torch.rand(mc.samples, length, generator=g, device=device))
    t = diffusion_times(mc.samples, g, mc.stratified)
    return masking(t, torch.rand(mc.samples, length, generator=g, device=device), mc.eps)
