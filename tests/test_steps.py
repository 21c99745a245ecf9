"""steps: the masked classification loss against numpy, step keys as a function of seed
and step only, and one train step against an SGD update computed by hand."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from glora_jax import peft
from glora_jax import subnet as subnet_lib
from glora_jax.adapters import glora
from glora_jax.train import steps
from test_peft import mlp_setup, perturbed  # the small adapted MLP the peft tests use


def np_log_softmax(logits):
  z = logits - logits.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_classification_loss_is_masked_cross_entropy():
  logits = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
  labels = np.array([2, 0, 3, 1, 1], np.int32)
  mask = np.array([1, 1, 1, 1, 0], np.float32)  # the last row is padding
  logits[4] = [-50.0, 50.0, 0.0, 0.0]  # padding that would dominate any unmasked sum
  logits[1] = [9.0, 0.0, 0.0, 0.0]  # a sure correct prediction
  logits[2] = [9.0, 0.0, 0.0, 0.0]  # a sure wrong one
  loss_sum, n, correct = steps.classification_loss(
      jnp.asarray(logits), {'label': jnp.asarray(labels), 'mask': jnp.asarray(mask)})
  nll = -np_log_softmax(logits.astype(np.float64))[np.arange(5), labels]
  np.testing.assert_allclose(float(loss_sum), nll[:4].sum(), rtol=1e-6)
  assert float(n) == 4.0
  want_correct = int((logits[:4].argmax(-1) == labels[:4]).sum())
  assert float(correct) == want_correct
  # Without a mask every row counts.
  loss_all, n_all, _ = steps.classification_loss(jnp.asarray(logits), {'label': jnp.asarray(labels)})
  np.testing.assert_allclose(float(loss_all), nll.sum(), rtol=1e-6)
  assert float(n_all) == 5.0


def test_step_keys_depend_only_on_seed_and_step():
  optimizer = optax.sgd(0.1)
  a = steps.init_state({'w': jnp.zeros(3)}, optimizer, seed=7, subnet=0)
  b = steps.init_state({'w': jnp.ones(5), 'v': jnp.ones(2)}, optimizer, seed=7, subnet=3)
  keys = lambda state, step: [np.asarray(jax.random.key_data(k))
                              for k in steps.step_keys(dict(state, step=jnp.int32(step)))]
  for step in (0, 1, 41):
    for x, y in zip(keys(a, step), keys(b, step)):
      np.testing.assert_array_equal(x, y)  # other params and subnet: the same keys
  other_step = keys(a, 2)
  other_seed = keys(steps.init_state({'w': jnp.zeros(3)}, optimizer, seed=8, subnet=0), 1)
  subnet_key, dropout_key = keys(a, 1)
  assert not np.array_equal(subnet_key, dropout_key)
  for k in other_step + other_seed:
    assert not np.array_equal(k, subnet_key) and not np.array_equal(k, dropout_key)


def linear_task():
  """logits = (x @ body) @ head_w + head_b; the body is frozen."""
  def forward(params, adapters, subnet, batch, train, rng):
    del adapters, subnet, train, rng
    return (batch['x'] @ params['body']) @ params['head']['w'] + params['head']['b']
  return steps.Task(forward, steps.classification_loss)


def test_train_step_applies_sgd_to_trainable_leaves_only():
  rng = np.random.default_rng(0)
  body = rng.standard_normal((6, 4)).astype(np.float32)
  head = {'w': rng.standard_normal((4, 3)).astype(np.float32),
          'b': rng.standard_normal(3).astype(np.float32)}
  x = rng.standard_normal((5, 6)).astype(np.float32)
  labels = np.array([0, 2, 1, 1, 2], np.int32)
  mask = np.array([1, 1, 1, 1, 0], np.float32)
  lr = 0.5
  optimizer = optax.sgd(lr)
  state = steps.init_state({'model': {'head': head}}, optimizer, seed=0, subnet=0)
  frozen = {'body': jnp.asarray(body)}
  step = jax.jit(steps.make_train_step(linear_task(), None, optimizer, supernet=False))
  new_state, metrics, subnet = step(state, frozen,
                                    {'x': jnp.asarray(x), 'label': jnp.asarray(labels),
                                     'mask': jnp.asarray(mask)})

  # By hand: mean cross-entropy over the 4 real rows; d loss / d logits = (p - onehot) / 4.
  h = x.astype(np.float64) @ body
  logits = h @ head['w'] + head['b']
  logp = np_log_softmax(logits)
  onehot = np.eye(3)[labels]
  d_logits = (np.exp(logp) - onehot) * mask[:, None] / mask.sum()
  grad_w, grad_b = h.T @ d_logits, d_logits.sum(0)
  np.testing.assert_allclose(float(metrics['loss']), -(logp * onehot).sum(-1)[:4].mean(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics['grad_norm']),
                             np.sqrt((grad_w ** 2).sum() + (grad_b ** 2).sum()), rtol=1e-5)
  new_head = new_state['trainable']['model']['head']
  np.testing.assert_allclose(new_head['w'], head['w'] - lr * grad_w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new_head['b'], head['b'] - lr * grad_b, rtol=1e-5, atol=1e-6)
  assert float(metrics['examples']) == 4.0
  assert float(metrics['accuracy']) == (logits[:4].argmax(-1) == labels[:4]).mean()
  # The frozen body is neither in the state nor changed; step advances, key and subnet stay.
  assert set(new_state) == {'step', 'key', 'trainable', 'opt_state', 'subnet'}
  np.testing.assert_array_equal(frozen['body'], body)
  assert int(new_state['step']) == 1 and int(subnet) == 0
  np.testing.assert_array_equal(new_state['key'], state['key'])


def test_supernet_step_draws_its_subnet_from_the_step_key():
  model, params, x, adapters = mlp_setup(glora.space(ranks=(2, 4)))
  adapters = perturbed(adapters)
  spec = adapters.spec
  trainable = {'model': {'head': params['head']}, 'adapters': adapters.params}
  frozen = {k: v for k, v in params.items() if k != 'head'}

  def forward(p, a, subnet, batch, train, rng):
    del train, rng
    return peft.forward(model, p, a, subnet, batch['x'])

  optimizer = optax.sgd(0.0)
  step = jax.jit(steps.make_train_step(steps.Task(forward, steps.classification_loss), spec,
                                       optimizer, supernet=True))
  state = steps.init_state(trainable, optimizer, seed=3, subnet=np.zeros(spec.num_options.shape))
  batch = {'x': x, 'label': jnp.array([0, 1, 2, 0])}
  seen = set()
  for i in range(3):
    want = subnet_lib.sample(steps.step_keys(state)[0], spec)
    state, metrics, subnet = step(state, frozen, batch)
    np.testing.assert_array_equal(subnet, want)
    assert int(metrics['subnet_params']) == int(spec.layer_params(np.asarray(want)).sum())
    seen.add(np.asarray(subnet).tobytes())
  assert len(seen) == 3
