"""Orbax checkpoints of what training changes: trainable params, optimizer state,
step, keys, fixed subnet and data-iterator position (never the frozen backbone).

Saves are atomic (orbax writes a temporary directory and renames it when done);
leftover temporary directories from a killed run are cleaned on open. Each
checkpoint carries a fingerprint of the model and adapter configuration, and
restoring a checkpoint that does not match fails with one line naming the field.
"""
from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation_lib
from orbax.checkpoint.checkpoint_managers import save_decision_policy as save_decision_lib

from glora_jax.errors import CheckpointMismatchError


def manager(directory, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
  """Saves whenever `save` is called (the loop decides when); keeps the latest `keep`."""
  directory = pathlib.Path(directory).absolute()
  options = ocp.CheckpointManagerOptions(
      save_decision_policy=save_decision_lib.FixedIntervalPolicy(1),
      preservation_policy=preservation_lib.LatestN(keep),
      cleanup_tmp_directories=True,
      enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(directory, options=options, item_names=('state', 'extra'))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, extra: dict, force: bool = False) -> bool:
  """`extra` is JSON: data-iterator state, fingerprint, metrics."""
  return mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                 extra=ocp.args.JsonSave(extra)), force=force)


# Fingerprint keys of how a run trains, not of what it holds: compared when both the
# checkpoint and the run name them (resuming a training run), skipped otherwise (a
# trained run read by search or retraining; checkpoints written before the key existed).
TRAINING_KEYS = ('supernet', 'frozen_quant')


def _compare(found: dict, expected: dict, where: str) -> None:
  # The fingerprint's own order: the coarsest difference (task, model, method) first.
  for key in list(expected) + sorted(set(found) - set(expected)):
    if key in TRAINING_KEYS and (key not in found or key not in expected):
      continue
    if found.get(key) != expected.get(key):
      raise CheckpointMismatchError(
          f'checkpoint {where} does not match this run: {key} is {found.get(key)!r} in the '
          f'checkpoint but {expected.get(key)!r} here')


def restore(mngr: ocp.CheckpointManager, abstract_state: Any, fingerprint: dict,
            step: int | None = None) -> tuple[int, Any, dict] | None:
  """Restores the latest (or given) step into `abstract_state`'s structure and
  shardings; None when there is no checkpoint. Fails with one line when the
  checkpoint is from another configuration or is damaged."""
  step = mngr.latest_step() if step is None else step
  if step is None:
    return None
  where = f'{mngr.directory}/{step}'
  try:
    extra = mngr.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))['extra']
  except Exception as e:  # a truncated or foreign directory
    raise CheckpointMismatchError(f'checkpoint {where} cannot be read ({type(e).__name__}: '
                                  f'{str(e).splitlines()[0][:200]})') from None
  _compare(extra.get('fingerprint', {}), fingerprint, where)
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))['state']
  except Exception as e:
    raise CheckpointMismatchError(f'checkpoint {where} cannot be restored into this run '
                                  f'({type(e).__name__}: {str(e).splitlines()[0][:200]})') from None
  return step, restored, extra


def abstract(tree: Any, shardings: Any = None) -> Any:
  """ShapeDtypeStructs (with shardings) describing `tree`."""
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
