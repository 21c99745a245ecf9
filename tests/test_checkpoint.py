"""checkpoint: a small state saved and restored exactly, the latest `keep` kept, a
fingerprint mismatch named in one line, and abstract() keeping shapes and dtypes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glora_jax.errors import CheckpointMismatchError
from glora_jax.train import checkpoint

FINGERPRINT = {'task': 'bbc_news', 'model': 'minilm', 'method': 'glora', 'ranks': [2, 4]}


def small_state(shift=0.0):
  rng = np.random.default_rng(0)
  return {
      'step': jnp.asarray(12, jnp.int32),
      'key': jax.random.key_data(jax.random.key(5)),
      'trainable': {'adapters': {'fc1': {'A': jnp.asarray(rng.standard_normal((2, 8)) + shift,
                                                          jnp.float32)}},
                    'head': {'kernel': jnp.asarray(rng.standard_normal((8, 3)), jnp.bfloat16)}},
      'subnet': jnp.asarray([[0, 3, 1, 2, 2]], jnp.int32),
  }


def assert_same_tree(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == w.dtype and g.shape == w.shape
    np.testing.assert_array_equal(np.asarray(g, np.float64), np.asarray(w, np.float64))


def test_save_restore_round_trip(tmp_path):
  state = small_state()
  extra = {'fingerprint': FINGERPRINT, 'data': {'epoch': 1, 'position': 40}, 'val_accuracy': 0.75}
  mngr = checkpoint.manager(tmp_path / 'ckpt', async_save=False)
  assert checkpoint.restore(mngr, checkpoint.abstract(state), FINGERPRINT) is None
  assert checkpoint.save(mngr, 12, state, extra)
  mngr.wait_until_finished()
  step, restored, got_extra = checkpoint.restore(mngr, checkpoint.abstract(state), FINGERPRINT)
  assert step == 12
  assert got_extra == extra
  assert_same_tree(restored, state)
  mngr.close()


def test_latest_of_several_is_restored_and_only_keep_are_kept(tmp_path):
  mngr = checkpoint.manager(tmp_path, keep=2, async_save=False)
  for step in (1, 2, 3):
    checkpoint.save(mngr, step, small_state(shift=float(step)), {'fingerprint': FINGERPRINT})
  mngr.wait_until_finished()
  assert list(mngr.all_steps()) == [2, 3]
  target = checkpoint.abstract(small_state())
  step, restored, _ = checkpoint.restore(mngr, target, FINGERPRINT)
  assert step == 3
  assert_same_tree(restored, small_state(shift=3.0))
  step, restored, _ = checkpoint.restore(mngr, target, FINGERPRINT, step=2)
  assert step == 2
  assert_same_tree(restored, small_state(shift=2.0))
  mngr.close()


def test_fingerprint_mismatch_is_one_line_naming_the_field(tmp_path):
  mngr = checkpoint.manager(tmp_path, async_save=False)
  checkpoint.save(mngr, 1, small_state(), {'fingerprint': FINGERPRINT})
  mngr.wait_until_finished()
  other = dict(FINGERPRINT, model='vit_b16', method='lora')
  with pytest.raises(CheckpointMismatchError) as info:
    checkpoint.restore(mngr, checkpoint.abstract(small_state()), other)
  message = str(info.value)
  assert '\n' not in message
  # The first differing field in the fingerprint's own order is the one named.
  assert message == (f"checkpoint {mngr.directory}/1 does not match this run: model is "
                     "'minilm' in the checkpoint but 'vit_b16' here")
  # A field only the checkpoint has is a mismatch too.
  fewer = {k: v for k, v in FINGERPRINT.items() if k != 'ranks'}
  with pytest.raises(CheckpointMismatchError, match=r"ranks is \[2, 4\] in the checkpoint but None"):
    checkpoint.restore(mngr, checkpoint.abstract(small_state()), fewer)
  mngr.close()


def test_abstract_keeps_shapes_dtypes_and_shardings():
  state = small_state()
  shapes = checkpoint.abstract(state)
  assert jax.tree.structure(shapes) == jax.tree.structure(state)
  for s, x in zip(jax.tree.leaves(shapes), jax.tree.leaves(state)):
    assert isinstance(s, jax.ShapeDtypeStruct)
    assert s.shape == x.shape and s.dtype == x.dtype
    assert s.sharding == x.sharding
  mesh = jax.make_mesh((len(jax.devices()),), ('data',))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  given = checkpoint.abstract(state, jax.tree.map(lambda _: replicated, state))
  for s, x in zip(jax.tree.leaves(given), jax.tree.leaves(state)):
    assert s.shape == x.shape and s.dtype == x.dtype and s.sharding == replicated
