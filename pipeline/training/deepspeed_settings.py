"""A sweep file's `deepspeed:` block: DeepSpeed settings passed through to the engine config.

Settings that only change speed or what is logged (bucket sizes, overlap, profilers) stay out of a run's
identity, so tuning them never orphans finished runs; settings that can change the numbers (communication
dtypes, quantised ZeRO, gradient pre-division) are part of it. What the recipe already decides (batch layout,
clipping, precision, optimizer, schedule, ZeRO stage) cannot be set here.
"""
from __future__ import annotations

from typing import Any

OWNED = {
    "train_batch_size": "train.batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.batch_size and train.micro_batch_size",
    "gradient_clipping": "train.grad_clip",
    "bf16": "train.precision",
    "fp16": "train.precision",
    "optimizer": "the recipe's AdamW (train.lr, beta1, beta2, weight_decay)",
    "scheduler": "the recipe's schedule (train.warmup_*, min_lr_ratio)",
    "zero_optimization.stage": "train.zero_stage",
}
SPEED_ONLY = {"steps_per_print", "wall_clock_breakdown", "memory_breakdown", "dump_state", "flops_profiler",
              "comms_logger", "activation_checkpointing", "aio", "tensorboard", "wandb", "csv_monitor", "comet",
              "timers", "disable_allgather"}
CHANGES_NUMBERS = {"communication_data_type", "seq_parallel_communication_data_type", "gradient_predivide_factor",
                   "prescale_gradients", "data_types", "sparse_gradients"}
ZERO_SPEED_ONLY = {"overlap_comm", "contiguous_gradients", "reduce_bucket_size", "allgather_bucket_size", "reduce_scatter",
                   "allgather_partitions", "round_robin_gradients", "sub_group_size", "offload_optimizer",
                   "offload_param", "elastic_checkpoint", "ignore_unused_parameters", "use_multi_rank_bucket_allreduce",
                   "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold", "stage3_max_live_parameters",
                   "stage3_max_reuse_distance", "stage3_model_persistence_threshold", "stage3_gather_16bit_weights_on_model_save",
                   "stage3_module_granularity_threshold", "stage3_use_all_reduce_for_fetch_params",
                   "stage3_allgather_sequential", "prefetch_bucket_size", "param_persistence_threshold",
                   "max_live_parameters", "max_reuse_distance", "gather_16bit_weights_on_model_save"}


def validate(block: dict[str, Any]) -> dict[str, Any]:
    """The block as given; ValueError naming the first key the recipe owns or DeepSpeed does not know."""
    for key, value in block.items():
        if key in OWNED:
            raise ValueError(f"{key} is set by {OWNED[key]}, not in the deepspeed block")
        if key == "zero_optimization":
            _validate_zero(value)
        elif key not in SPEED_ONLY | CHANGES_NUMBERS:
            known = ", ".join(sorted(SPEED_ONLY | CHANGES_NUMBERS | {"zero_optimization"}))
            raise ValueError(f"{key!r} is not a DeepSpeed setting isoflop passes through (known: {known})")
    return block


def numeric_part(block: dict[str, Any]) -> dict[str, Any]:
    """The settings that can change a run's numbers: what enters the run hash."""
    out = {k: v for k, v in block.items() if k in CHANGES_NUMBERS}
    zero = {k: v for k, v in block.get("zero_optimization", {}).items() if k not in ZERO_SPEED_ONLY}
    return {**out, **({"zero_optimization": zero} if zero else {})}


def merged(base: dict[str, Any], block: dict[str, Any]) -> dict[str, Any]:
    """The engine config: isoflop's own settings with the block's added (zero_optimization merged key by key)."""
    zero = {**base.get("zero_optimization", {}), **block.get("zero_optimization", {})}
    return {**base, **block, "zero_optimization": zero}


def _validate_zero(value: Any) -> None:
    if not isinstance(value, dict):
        raise ValueError(f"zero_optimization must be a mapping of ZeRO settings, got {value!r}")
    if "stage" in value:
        raise ValueError(f"zero_optimization.stage is set by {OWNED['zero_optimization.stage']}, not in the deepspeed block")
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig  # DeepSpeed's own schema knows every ZeRO key
    from pydantic import ValidationError

    try:
        DeepSpeedZeroConfig(**value)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"zero_optimization.{where}: {first['msg']}") from None
