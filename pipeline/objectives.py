"""The two families' objectives: the whole ARM/MDM difference besides the attention mask.

Both losses take a block of seq_len + 1 tokens and return one value per sequence, so training
(mean over the batch) and validation (mean over sequences and Monte Carlo draws) share one path.
The MDM also takes its noise explicitly — a time t per sequence and a uniform u per token — so every
draw is a pure function of a seed and a resumed or re-evaluated run sees the very same masks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.model import Transformer


def arm_loss(model: Transformer, block: torch.Tensor, t=None, u=None, eps: float = 0.0) -> torch.Tensor:
    """Next-token cross-entropy per sequence (nats/token)."""
    logits = model(block[:, :-1])
    ce = F.cross_entropy(logits.float().transpose(1, 2), block[:, 1:], reduction="none")
    return ce.mean(dim=1)


def mdm_loss(model: Transformer, block: torch.Tensor, t: torch.Tensor, u: torch.Tensor,
             eps: float = 1e-3) -> torch.Tensor:
    """SMDM's masked-diffusion bound per sequence: Σ_masked CE / p over all L tokens, p = (1 − ε)t + ε.

    Its expectation over t ~ U(0,1) and the masks upper-bounds the NLL per token.
    """
    x = block[:, 1:]
    p = ((1 - eps) * t + eps).unsqueeze(1)                      # [B, 1] mask probability
    masked = u < p                                              # [B, L] each token masked with prob p
    logits = model(torch.where(masked, model.mask_token_id, x), only=masked)  # [M, V], masked positions only
    ce = F.cross_entropy(logits.float(), x[masked], reduction="none")
    ce = torch.zeros(x.shape, dtype=ce.dtype, device=ce.device).masked_scatter(masked, ce)  # [B, L], 0 if unmasked
    return (ce / p).sum(dim=1) / x.shape[1]


@dataclass(frozen=True)
class Objective:
    causal: bool                 # the attention mask
    loss: Callable[..., torch.Tensor]
    stochastic: bool             # whether the loss draws noise (and validation needs Monte Carlo draws)


FAMILIES: dict[str, Objective] = {
    "arm": Objective(causal=True, loss=arm_loss, stochastic=False),
    "mdm": Objective(causal=False, loss=mdm_loss, stochastic=True),
}


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


@torch.no_grad()
def sequence_losses(family: str, model: Transformer, blocks: torch.Tensor, indices: list[int] | None = None, *,
                    samples: int = 128, seed: int = 0, batch_size: int = 16, eps: float = 1e-3,
                    stratified: bool = True) -> torch.Tensor:
    """Held-out loss (nats/token) of each sequence in `indices` (default all), float64.

    ARM: cross-entropy. MDM: the bound averaged over `samples` draws of (t, mask), the draws of sequence i
    seeded by (seed, i), so a checkpoint always evaluates to the same number however the sequences are
    split across ranks or batches.
    """
    objective = FAMILIES[family]
    draws = samples if objective.stochastic else 1
    indices = list(range(len(blocks))) if indices is None else indices
    device = blocks.device
    rows = [(i, k) for i in indices for k in range(draws)]
    noise = {}
    for i in indices if objective.stochastic else ():
        g = generator(seed, i, device=device)
        noise[i] = (diffusion_times(draws, g, stratified), torch.rand(draws, blocks.shape[1] - 1, generator=g, device=device))
    totals = torch.zeros(len(indices), dtype=torch.float64)
    position = {i: n for n, i in enumerate(indices)}
    was_training = model.training
    model.eval()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        t = u = None
        if objective.stochastic:
            t = torch.stack([noise[i][0][k] for i, k in chunk])
            u = torch.stack([noise[i][1][k] for i, k in chunk])
        values = objective.loss(model, blocks[[i for i, _ in chunk]], t, u, eps).double().cpu()
        totals.index_add_(0, torch.tensor([position[i] for i, _ in chunk]), values)
    model.train(was_training)
    return totals / draws


def mean_and_stderr(values: torch.Tensor) -> tuple[float, float]:
    stderr = values.std().item() / len(values) ** 0.5 if len(values) > 1 else float("nan")
    return values.mean().item(), stderr
