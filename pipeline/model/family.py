"""The two model families, each one object holding everything in which they differ (docs/method.md §2).

Both share one Transformer. An ARM attends causally and is trained on next-token cross-entropy; an
MDM attends both ways, has a mask token, and is trained on the masked-diffusion bound, which needs
noise (a time and a mask per sequence) and Monte Carlo draws wherever its likelihood is estimated.
Training, validation, scoring and sampling ask the family object; no other module branches on it.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import fields, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from pipeline.errors import SamplingError
from pipeline.model.noise import (Masking, MonteCarlo, count_masking, diffusion_times, draws, generator, mask_counts,
                                  masking)
from pipeline.model.sampling import ArmSampling, MdmSampling, Sample, arm_sample, guided_logits, mdm_sample
from pipeline.model.shapes import Shape
from pipeline.model.transformer import ModelConfig, Transformer

if TYPE_CHECKING:  # the recipe is pydantic; the model package stays free of it
    from pipeline.recipe import TrainConfig


class Family:
    name: str
    causal: bool               # the attention mask
    mask_token: bool           # whether its inputs may hold a mask token
    bound: str                 # what its validation loss is, for people reading numbers
    sampling: type             # its sampler's settings (a dataclass): their fields are the options `sample` takes
    score_options: tuple[str, ...] = ()

    def model_config(self, shape: Shape, vocab_size: int, seq_len: int, init: str = "smdm") -> ModelConfig:
        return ModelConfig(shape, vocab_size, seq_len, self.causal, self.mask_token, init=init)

    def training_noise(self, recipe: TrainConfig, step: int, shard: int, micro: int) -> Masking | None:
        """The noise of micro batch `shard` of global batch `step` (None when the loss needs none)."""
        return None

    def validation_passes(self, recipe: TrainConfig) -> int:
        """Forward passes over each validation sequence."""
        return 1

    def head_share(self, recipe: TrainConfig) -> float:
        """The share of a training sequence's positions whose logits the loss computes, on average: what the
        LM head spends (pipeline/model/flops.py)."""
        return 1.0

    def loss(self, model: Transformer, block: torch.Tensor, noise: Masking | None = None) -> torch.Tensor:
        """Loss per sequence (nats/token) of blocks [B, seq_len + 1]."""
        raise NotImplementedError

    def sequence_losses(self, model: Transformer, blocks: torch.Tensor, mc: MonteCarlo,
                        indices: list[int] | None = None) -> torch.Tensor:
        """Held-out loss (nats/token, float64) of each sequence in `indices` (default all)."""
        return self.sequence_losses_and_mc_var(model, blocks, mc, indices)[0]

    def sequence_losses_and_mc_var(self, model: Transformer, blocks: torch.Tensor, mc: MonteCarlo,
                                   indices: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequence_losses, the Monte Carlo variance of each given its sequence: 0 where the loss is exact)."""
        raise NotImplementedError

    def continuation_nll(self, model: Transformer, context: torch.Tensor, target: torch.Tensor,
                         mc: MonteCarlo) -> float:
        """−log p(target | context) in nats (for an MDM, an upper bound)."""
        raise NotImplementedError

    def sample(self, model: Transformer, prompt: torch.Tensor, **options) -> Sample:
        """Generate after `prompt` with this family's sampler; `options` are fields of `sampling`."""
        raise NotImplementedError

    @property
    def sample_options(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self.sampling))

    def __repr__(self) -> str:
        return self.name.upper()


class ARM(Family):
    name, causal, mask_token, bound = "arm", True, False, "cross-entropy"
    sampling = ArmSampling

    def loss(self, model, block, noise=None):
        logits = model(block[:, :-1])
        ce = F.cross_entropy(logits.float().transpose(1, 2), block[:, 1:], reduction="none")
        return ce.mean(dim=1)

    @torch.no_grad()
    def sequence_losses_and_mc_var(self, model, blocks, mc, indices=None):
        indices = list(range(len(blocks))) if indices is None else indices
        with _eval_mode(model):
            values = [self.loss(model, blocks[indices[s:s + mc.batch_size]]).double().cpu()
                      for s in range(0, len(indices), mc.batch_size)]
        losses = torch.cat(values) if values else torch.zeros(0, dtype=torch.float64)
        return losses, torch.zeros_like(losses)  # exact given the sequence: no draws, no Monte Carlo error

    def continuation_nll(self, model, context, target, mc):
        if mc.guidance:
            raise SamplingError("--cfg needs an MDM: the guidance masks the prompt, and an ARM has no mask token")
        if len(context) == 0:
            raise SamplingError("an ARM scores a continuation given at least one context token (e.g. EOS)")
        x = torch.cat([context, target])[None]
        logp = F.log_softmax(model(x[:, :-1]).double(), dim=-1)[0, len(context) - 1:]
        return -logp.gather(-1, target[:, None]).sum().item()

    def sample(self, model, prompt, **options):
        return arm_sample(model, prompt, ArmSampling(**options))


class MDM(Family):
    name, causal, mask_token, bound = "mdm", False, True, "diffusion upper bound on the NLL (negative ELBO)"
    sampling = MdmSampling
    score_options = ("samples", "guidance")

    def training_noise(self, recipe, step, shard, micro):
        # one stratified set of times (or counts) for the global batch, so every rank draws it and takes its slice
        stratified, rows = recipe.t_sampling == "stratified", slice(shard * micro, (shard + 1) * micro)
        u = torch.rand(micro, recipe.seq_len, generator=generator(recipe.seed, step, 1, shard))
        if recipe.mdm_masking == "count":
            counts = mask_counts(recipe.batch_size, recipe.seq_len, generator(recipe.seed, step, 0), stratified)
            return count_masking(counts[rows], u)
        times = diffusion_times(recipe.batch_size, generator(recipe.seed, step, 0), stratified)
        return masking(times[rows], u, recipe.mdm_eps)

    def validation_passes(self, recipe):
        return recipe.eval_samples  # one per Monte Carlo draw of the bound

    def head_share(self, recipe):
        # the masked positions alone: p = (1 - eps) t + eps with t uniform on [0, 1], or l/L with l uniform on 1..L
        if recipe.mdm_masking == "count":
            return (recipe.seq_len + 1) / (2 * recipe.seq_len)
        return (1 + recipe.mdm_eps) / 2

    def loss(self, model, block, noise):
        """SMDM's bound per sequence: Σ_masked CE / p over all L tokens; its expectation upper-bounds the NLL."""
        x = block[:, 1:]
        return masked_ce_over_p(model, x, noise) / x.shape[1]

    @torch.no_grad()
    def sequence_losses_and_mc_var(self, model, blocks, mc, indices=None):
        """The bound averaged over mc.samples draws (mc.estimator: "time" or "count"); sequence i's draws are
        seeded by (mc.validation_seed, i), so a checkpoint evaluates to the same number however the sequences are
        split across ranks or batches. Under "count" that seed is mc.eval_seed, not the run's: every run of a
        sweep, whatever its size or training seed, is scored on the same sequences with the same masks.
        The variance is that of each average over its draws (see `_mean_and_var_of_mean`)."""
        indices = list(range(len(blocks))) if indices is None else indices
        seeded = replace(mc, seed=mc.validation_seed)
        noise = {i: draws(seeded, blocks.shape[1] - 1, i, device=blocks.device) for i in indices}
        rows = [(i, k) for i in indices for k in range(mc.samples)]  # sequence by sequence, draw by draw
        per_draw = torch.zeros(len(rows), dtype=torch.float64)
        with _eval_mode(model):
            for start in range(0, len(rows), mc.batch_size):
                chunk = rows[start:start + mc.batch_size]
                batch = Masking(torch.stack([noise[i].masked[k] for i, k in chunk]),
                                torch.stack([noise[i].p[k] for i, k in chunk]))
                values = self.loss(model, blocks[[i for i, _ in chunk]], batch)
                per_draw[start:start + len(chunk)] = values.double().cpu()
        return _mean_and_var_of_mean(per_draw.view(len(indices), mc.samples))

    def continuation_nll(self, model, context, target, mc):
        """The bound with only the continuation noised; draws depend on (seed, len(target)) alone, so
        choices of equal length are compared on the same masks."""
        if mc.samples <= 0:
            raise SamplingError(f"samples must be positive, got {mc.samples}")
        noise = draws(mc, len(target), len(target), device=target.device)
        total = 0.0
        for s in range(0, mc.samples, mc.batch_size):
            rows = Masking(noise.masked[s:s + mc.batch_size], noise.p[s:s + mc.batch_size])
            batch = target.expand(len(rows.p), -1)
            total += masked_ce_over_p(model, batch, rows, context, mc.guidance).double().sum().item()
        return total / mc.samples

    def sample(self, model, prompt, **options):
        return mdm_sample(model, prompt, MdmSampling(**options))


def masked_ce_over_p(model: Transformer, x: torch.Tensor, noise: Masking, context: torch.Tensor | None = None,
                     guidance: float = 0.0) -> torch.Tensor:
    """Σ over the masked tokens of row i of CE / p_i, per row [B]; x [B, L] are the clean tokens.

    Only masked positions go through the output head (the largest layer of a small model). A context
    [P] is prepended unmasked to every row (scoring a continuation), with optional unsupervised CFG.
    """
    masked = noise.masked
    inputs = torch.where(masked, model.mask_token_id, x)
    if context is not None and len(context):
        inputs = torch.cat([context.expand(len(x), -1), inputs], dim=1)
        masked = torch.cat([torch.zeros_like(inputs[:, :len(context)], dtype=torch.bool), masked], dim=1)
    logits = guided_logits(model, inputs, inputs.shape[1] - x.shape[1], guidance, only=masked)  # [M, V]
    ce = F.cross_entropy(logits.float(), x[noise.masked], reduction="none")
    ce = torch.zeros(x.shape, dtype=ce.dtype, device=ce.device).masked_scatter(noise.masked, ce)  # [B, L]
    return (ce / noise.p.unsqueeze(1)).sum(dim=1)


def _mean_and_var_of_mean(per_draw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's mean over its K draws [n, K], and that mean's variance s²/K (NaN for K = 1: no spread to see).

    s²/K is the iid formula: for stratified draws (times or counts spread over the K draws) the mean's true
    variance is smaller, so this estimate is slightly conservative.
    """
    k = per_draw.shape[1]
    # summed draw by draw, in order, as validation always has: a vectorised sum moves val_loss's last bits
    mean = sum(per_draw.unbind(dim=1), torch.zeros(len(per_draw), dtype=torch.float64)) / k
    return mean, per_draw.var(dim=1) / k if k > 1 else torch.full_like(mean, math.nan)


@contextmanager
def _eval_mode(model):
    """Evaluate in eval mode, then restore the mode the model was in (training calls this mid-run)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


FAMILIES: dict[str, Family] = {f.name: f for f in (ARM(), MDM())}


def family_of(model: Transformer) -> Family:
    """The family a model was built for: its attention mask tells."""
    return FAMILIES["arm" if model.config.causal else "mdm"]


def mean_and_stderr(values: torch.Tensor) -> tuple[float, float]:
    stderr = values.std().item() / len(values) ** 0.5 if len(values) > 1 else math.nan
    return values.mean().item(), stderr


def mc_stderr(variances: torch.Tensor) -> float:
    """The Monte Carlo standard error of the mean of n sequence losses, given the sequences: √(Σ var_i) / n.

    Unlike mean_and_stderr's spread between sequences, which every run of a sweep shares (same sequences,
    same draws) and which cancels when runs are compared, this is the error left in such comparisons.
    """
    return variances.sum().sqrt().item() / len(variances)
