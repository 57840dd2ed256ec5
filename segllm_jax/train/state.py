"""``TrainState``: the whole of what a training run carries from step to step (and checkpoints).

A plain pytree (no NNX objects): parameters are flat ``{"a/b/c": array}`` dicts, split into the
trainable ones (float32 master weights, with Adam moments in ``opt_state``) and the frozen ones
(architecture.md §T12; no moments, never updated). The model graph is static and lives in
``step.ModelStructure``. ``rng`` is a raw ``uint32[2]`` key; step ``s`` uses ``fold_in(rng, s)``,
so a resumed run draws exactly the gates an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    step: jax.Array  # [] int32: optimizer steps done
    params: dict[str, jax.Array]  # trainable parameters, float32
    frozen: dict[str, jax.Array]  # frozen parameters (embed_tokens, lm_head, CLIP, HIPIE stem/res2/FrozenBN)
    opt_state: Any  # optax state over ``params``
    rng: jax.Array  # [2] uint32 base key
