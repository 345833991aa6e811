"""Typed fine-tuning configuration."""

from __future__ import annotations

from dataclasses import dataclass

from deltaserve.errors import InvalidArgumentError

# Which parameters train. Only the block linears: the embedding (tied to lm_head in
# SmolLM2) and the norms stay frozen, so a tenant's delta is made purely of the
# q/k/v/o/gate/up/down matrices that BitDelta compresses to 1 bit; a changed
# embedding would travel as a dense tensor (for SmolLM2 28M values, 5x the 1-bit part).
LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class FinetuneConfig:
    """steps of AdamW on batches of `batch_size` examples; lr warms up then decays linearly."""

    steps: int = 60
    lr: float = 1e-4
    batch_size: int = 16
    seed: int = 0
    warmup_steps: int = 5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise InvalidArgumentError("steps must be >= 1")
        if not (0.0 < self.lr < 1.0):
            raise InvalidArgumentError("lr must be in (0, 1)")
        if self.batch_size < 1:
            raise InvalidArgumentError("batch size must be >= 1")
        if self.warmup_steps < 0:
            raise InvalidArgumentError("warmup steps must be >= 0")
        if self.weight_decay < 0:
            raise InvalidArgumentError("weight decay must be >= 0")
        if self.max_grad_norm <= 0:
            raise InvalidArgumentError("max grad norm must be > 0")


def is_trainable(name: str) -> bool:
    """True for the weight of a block linear layer (`model.layers.N.*.<proj>.weight`)."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in LINEAR_SUFFIXES and ".layers." in name
