"""Generating from trained models: the MDM's reverse-process samplers, KV-cached ARM decoding, and
unsupervised classifier-free guidance (docs/method.md §7). Each family's sampler entry
(`pipeline.model.family`) calls these.

MDM sampling runs the reverse process on the time grid linspace(1, 1e-5, steps + 1); the network has no
time input, so a step that reveals nothing leaves the logits valid and the next network call is skipped.
Every random draw comes from one generator seeded by the caller, so a seed fixes the sample.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from pipeline.errors import SamplingError
from pipeline.model.noise import generator
from pipeline.model.transformer import KVCache, Transformer

GRID_END = 1e-5  # the time grid stops short of 0, as in SMDM


# ----------------------------------------------------------------------------------------- building blocks

def gumbel(u: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise from uniforms in [0, 1), in u's precision."""
    return -torch.log(-torch.log(u))


def gumbel_argmax(logits: torch.Tensor, temperature: float, gen: torch.Generator,
                  dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """One draw per row of softmax(logits / temperature) by Gumbel-max; temperature 0 is argmax.

    float64 because float32 uniforms (multiples of 2^-24) bound the noise to [-2.8, 16.6]: the tail of a
    peaked distribution is under-drawn and the effective temperature drops (Zheng et al. 2024).
    """
    if temperature == 0:
        return logits.argmax(-1)
    u = torch.rand(logits.shape, generator=gen, device=logits.device, dtype=dtype)
    return (logits.to(dtype) / temperature + gumbel(u)).argmax(-1)


def guided_logits(model: Transformer, x: torch.Tensor, prompt_len: int, guidance: float = 0.0,
                  only: torch.Tensor | None = None) -> torch.Tensor:
    """The MDM's logits for x, with unsupervised classifier-free guidance when its weight W != 0:
    u + (W + 1)(c − u), c the output given x, u the output with its first prompt_len tokens masked.
    Both come from one forward on the doubled batch. `only` (bool, x's shape) keeps the selected positions."""
    select = {} if only is None else {"only": only}
    if guidance == 0 or prompt_len == 0:
        return model(x, **select)
    unconditional = x.clone()
    unconditional[:, :prompt_len] = model.mask_token_id
    if only is not None:
        select = {"only": torch.cat([only, only])}  # row-major selection: x's positions first, then u's
    c, u = model(torch.cat([x, unconditional]), **select).chunk(2)
    return u + (guidance + 1) * (c - u)


@dataclass
class Sample:
    tokens: torch.Tensor   # [B, prompt_len + length]: the prompt, then the generated answer
    prompt_len: int
    network_calls: int
    method: str            # how it was drawn, for people reading the output

    @property
    def answer(self) -> torch.Tensor:
        return self.tokens[:, self.prompt_len:]


def _check_generation(model: Transformer, prompt: torch.Tensor, length: int, temperature: float,
                      needs_mask_token: bool) -> None:
    if (model.mask_token_id is not None) != needs_mask_token:  # i.e. the sampler was given the other family
        raise SamplingError("this model " + ("has no mask token (it is an ARM); the sampler needs an MDM"
                                             if needs_mask_token else "is an MDM; left-to-right decoding needs an ARM"))
    if prompt.dim() != 2:
        raise SamplingError(f"prompt must be a [batch, tokens] tensor of ids, got shape {tuple(prompt.shape)}")
    if length <= 0:
        raise SamplingError(f"length must be positive, got {length}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise SamplingError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    check_fits(model, prompt.shape[1], length, "prompt", "length")
    check_ids(model, prompt, "prompt")


def check_fits(model: Transformer, prefix: int, length: int, prefix_name: str, length_name: str) -> None:
    context = model.config.seq_len
    if prefix >= context:
        raise SamplingError(f"{prefix_name} of {prefix} tokens is longer than the model context allows "
                            f"({context} tokens, with at least one left to generate or score)")
    if prefix + length > context:
        raise SamplingError(f"{prefix_name} ({prefix} tokens) + {length_name} {length} exceeds the model context "
                            f"of {context} tokens; use {length_name} <= {context - prefix}")


def check_ids(model: Transformer, ids: torch.Tensor, name: str) -> None:
    if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < model.config.vocab_size):
        raise SamplingError(f"{name} holds token ids outside 0..{model.config.vocab_size - 1}")


# ----------------------------------------------------------------------------------------------- MDM

Sampler = Literal["reverse", "confidence"]


@dataclass(frozen=True)
class MdmSampling:
    length: int                       # answer tokens, generated after the prompt
    steps: int | None = None          # default: one step per answer token
    sampler: Sampler = "reverse"
    temperature: float = 1.0
    guidance: float = 0.0             # unsupervised classifier-free guidance (CFG) weight W (0: none)
    seed: int = 0

    @property
    def n_steps(self) -> int:
        return self.length if self.steps is None else self.steps


def _reverse_step(logits, masked, t: float, s: float, last: bool, temperature: float, gen):
    """The reverse process: each masked token is revealed with prob 1 − s/t (all of them at the last step)."""
    reveal = masked
    if not last:
        reveal = masked & (torch.rand(masked.shape, generator=gen, device=masked.device, dtype=torch.float64) < 1 - s / t)
    return reveal, gumbel_argmax(logits[reveal], temperature, gen)


def _confidence_step(logits, masked, t: float, s: float, last: bool, temperature: float, gen):
    """Draw every masked token; reveal the k the model is surest of, so that round(length * s) stay masked.

    Every row has the same number masked, so k is one number."""
    draw = gumbel_argmax(logits[masked], temperature, gen)
    confidence = torch.full(masked.shape, -math.inf, dtype=torch.float64, device=masked.device)
    confidence[masked] = F.log_softmax(logits[masked].double(), dim=-1).gather(-1, draw[:, None]).squeeze(-1)
    k = int(masked[0].sum()) - (0 if last else round(masked.shape[1] * s))
    reveal = torch.zeros_like(masked).scatter_(1, confidence.topk(k, dim=1).indices, True)
    proposal = torch.zeros(masked.shape, dtype=torch.long, device=masked.device)
    proposal[masked] = draw
    return reveal, proposal[reveal]


STEPS = {"reverse": _reverse_step, "confidence": _confidence_step}


@torch.inference_mode()
def mdm_sample(model: Transformer, prompt: torch.Tensor, settings: MdmSampling) -> Sample:
    """Generate settings.length tokens after each row of prompt [B, P] (P may be 0); the prompt is never masked."""
    _check_generation(model, prompt, settings.length, settings.temperature, needs_mask_token=True)
    steps = settings.n_steps
    if settings.sampler not in STEPS:
        raise SamplingError(f"sampler must be one of {', '.join(STEPS)}, got {settings.sampler!r}")
    if steps <= 0:
        raise SamplingError(f"steps must be positive, got {steps}")
    if settings.sampler == "confidence" and steps > settings.length:
        raise SamplingError(f"the confidence sampler reveals at least one token per step: steps ({steps}) must be "
                            f"<= length ({settings.length})")
    if not math.isfinite(settings.guidance):
        raise SamplingError(f"guidance (--cfg) must be a finite number, got {settings.guidance}")
    B, P = prompt.shape
    x = torch.cat([prompt, prompt.new_full((B, settings.length), model.mask_token_id)], dim=1)
    answer = x[:, P:]  # a view: revealing writes into x
    gen = generator(settings.seed, device=prompt.device)
    times = torch.linspace(1, GRID_END, steps + 1, dtype=torch.float64).tolist()
    logits, stale, calls = None, torch.ones(B, dtype=torch.bool, device=prompt.device), 0
    for i in range(steps):
        if stale.any():  # only rows whose tokens changed since the last call need the network again
            fresh = guided_logits(model, x[stale], P, settings.guidance)[:, P:]
            if logits is None:
                logits = fresh
            else:
                logits[stale] = fresh
            calls += 1
        reveal, tokens = STEPS[settings.sampler](logits, answer == model.mask_token_id, times[i], times[i + 1],
                                            i == steps - 1, settings.temperature, gen)
        answer[reveal] = tokens
        stale = reveal.any(dim=1)
    return Sample(x, P, calls, f"{settings.sampler} sampler, {steps} steps, guidance {settings.guidance:g}")


# ----------------------------------------------------------------------------------------------- ARM

@dataclass(frozen=True)
class ArmSampling:
    length: int
    temperature: float = 1.0
    seed: int = 0
    cache: bool = True   # False re-runs the whole prefix for every token (the baseline the cache is measured against)


@torch.inference_mode()
def arm_sample(model: Transformer, prompt: torch.Tensor, settings: ArmSampling) -> Sample:
    """Left-to-right decoding of settings.length tokens after each row of prompt [B, P], P >= 1."""
    _check_generation(model, prompt, settings.length, settings.temperature, needs_mask_token=False)
    if prompt.shape[1] == 0:
        raise SamplingError("ARM decoding needs a prompt of at least one token (e.g. EOS)")
    gen = generator(settings.seed, device=prompt.device)
    cache = KVCache() if settings.cache else None
    x, new = prompt, prompt
    for _ in range(settings.length):
        logits = model(new if cache is not None else x, cache)[:, -1]
        new = gumbel_argmax(logits, settings.temperature, gen)[:, None]
        x = torch.cat([x, new], dim=1)
    return Sample(x, prompt.shape[1], settings.length, "KV-cached decoding" if settings.cache else "uncached decoding")
