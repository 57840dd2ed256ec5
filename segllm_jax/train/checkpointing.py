"""Training checkpoints: orbax ``CheckpointManager``, asynchronous, keep-N, atomic.

One checkpoint (``WORKDIR/checkpoints/<step>/``) holds two items:

* ``state``: the :class:`TrainState` (trainable and frozen parameters, optimizer state, step, RNG
  key), written with each array's sharding, so every host writes only its shards and a restore
  lands directly in the target shardings.
* ``data``: JSON with the data iterator's state (``PipelineIterator.get_state()``) and bookkeeping.

Atomicity is orbax's: a step is written into a temporary folder and renamed when complete, so a
process killed mid-save leaves no folder that :meth:`Checkpointer.latest_step` would pick (the
partial temporary folder is ignored, and cleaned by the next manager). Saves run in a background
thread after the device-to-host copy; :meth:`wait` blocks until the last one is durable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import jax

from segllm_jax.train.state import TrainState


def _encode(key: str) -> str:
    return key.replace("/", ".")  # orbax nests on '/'; parameter paths never contain '.'


def _to_tree(state: TrainState) -> dict[str, Any]:
    """A plain nested dict orbax can store without knowing our types."""
    opt_leaves = jax.tree.leaves(state.opt_state)
    tree = {"step": state.step, "rng": state.rng,
            "params": {_encode(k): v for k, v in state.params.items()},
            "opt_state": {f"{i:05d}": v for i, v in enumerate(opt_leaves)}}
    if state.frozen:  # a LoRA run saves no frozen base (it is rebuilt from the init weights on resume)
        tree["frozen"] = {_encode(k): v for k, v in state.frozen.items()}
    return tree


def _from_tree(tree: Mapping[str, Any], like: TrainState) -> TrainState:
    opt_def = jax.tree.structure(like.opt_state)
    return TrainState(step=tree["step"], rng=tree["rng"],
                      params={k: tree["params"][_encode(k)] for k in like.params},
                      frozen={k: tree["frozen"][_encode(k)] for k in like.frozen},
                      opt_state=jax.tree.unflatten(opt_def, [tree["opt_state"][k] for k in sorted(tree["opt_state"])]))


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int = 2, async_save: bool = True):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options,
                                             item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: TrainState, data: Mapping[str, Any]) -> None:
        ocp = self._ocp
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_to_tree(state)),
                                                        data=ocp.args.JsonSave(dict(data))))

    def restore(self, step: int, abstract: TrainState) -> tuple[TrainState, dict[str, Any]]:
        """``abstract``: a TrainState of ``jax.ShapeDtypeStruct`` with shardings (where arrays go)."""
        ocp = self._ocp
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_to_tree(abstract)), data=ocp.args.JsonRestore()))
        return _from_tree(restored["state"], abstract), dict(restored["data"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
