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
  return steps.ForwardLoss(forward, steps.classification_loss)


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
  model, params, x, adapters = mlp_setup(glora.family(ranks=(2, 4)))
  adapters = perturbed(adapters)
  spec = adapters.spec
  trainable = {'model': {'head': params['head']}, 'adapters': adapters.params}
  frozen = {k: v for k, v in params.items() if k != 'head'}

  def forward(p, a, subnet, batch, train, rng):
    del train, rng
    return peft.forward(model, p, a, subnet, batch['x'])

  optimizer = optax.sgd(0.0)
  step = jax.jit(steps.make_train_step(steps.ForwardLoss(forward, steps.classification_loss), spec,
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


# --------------------------------------------------------------------------- #
# Supernet options: sandwich, in-place distillation, fair sampling, progressive
# shrinking, each against an independent computation
# --------------------------------------------------------------------------- #


def supernet_setup():
  """The small adapted MLP (random adapters, no dropout), as trainable / frozen trees,
  with a batch whose last row is padding."""
  model, params, x, adapters = mlp_setup(glora.family(ranks=(2, 4)))
  adapters = perturbed(adapters, scale=0.3)
  trainable = {'model': {'head': params['head']}, 'adapters': adapters.params}
  frozen = {k: v for k, v in params.items() if k != 'head'}
  traces = []

  def forward(p, a, subnet, batch, train, rng):
    del train, rng
    traces.append(1)
    return peft.forward(model, p, a, subnet, batch['x'])

  batch = {'x': x, 'label': jnp.array([0, 1, 2, 0]), 'mask': jnp.array([1.0, 1.0, 1.0, 0.0])}
  return adapters.spec, steps.ForwardLoss(forward, steps.classification_loss), trainable, frozen, batch, traces


def np_logits(task, trainable, frozen, spec, subnet, batch):
  out = task.forward(peft.combine(frozen, trainable['model']),
                     peft.Adapters(params=trainable['adapters'], spec=spec), jnp.asarray(subnet),
                     batch, True, None)
  return np.asarray(out, np.float64)


def np_cross_entropy(logits, labels, mask):
  nll = -np_log_softmax(logits)[np.arange(len(labels)), labels]
  return (nll * mask).sum() / mask.sum()


def np_kl(teacher, student, mask, temperature):
  t, s = np_log_softmax(teacher / temperature), np_log_softmax(student / temperature)
  return temperature ** 2 * ((np.exp(t) * (t - s)).sum(-1) * mask).sum() / mask.sum()


def test_sandwich_loss_and_update_are_the_mean_over_independent_subnets():
  spec, task, trainable, frozen, batch, _ = supernet_setup()
  options = steps.SupernetOptions(num_random=2, sandwich='largest_smallest')
  assert options.num_subnets == 4 and options.backbone_passes() == 4
  lr = 0.5
  optimizer = optax.sgd(lr)
  state = steps.init_state(trainable, optimizer, seed=5, subnet=np.zeros(spec.num_options.shape))
  step = jax.jit(steps.make_train_step(task, spec, optimizer, options))
  new_state, metrics, subnets = step(state, frozen, batch)
  subnets = np.asarray(subnets)
  cheapest, _ = subnet_lib.cheapest_and_largest(spec.num_options, spec.option_costs)
  assert subnets.shape == (4,) + spec.num_options.shape
  np.testing.assert_array_equal(subnets[0], subnet_lib.largest(spec))
  np.testing.assert_array_equal(subnets[1], cheapest)
  assert not np.array_equal(subnets[2], subnets[3])
  assert np.all((subnets >= 0) & (subnets < spec.num_options))

  labels, mask = np.asarray(batch['label']), np.asarray(batch['mask'])
  want = np.mean([np_cross_entropy(np_logits(task, trainable, frozen, spec, s, batch), labels, mask)
                  for s in subnets])
  np.testing.assert_allclose(float(metrics['loss']), want, rtol=1e-5)
  # The update is the mean of the four gradients, each taken on its own.
  def single_loss(t, s):
    total, n, _ = task.loss(task.forward(peft.combine(frozen, t['model']),
                                         peft.Adapters(params=t['adapters'], spec=spec), s,
                                         batch, True, None), batch)
    return total / n
  grads = [jax.grad(single_loss)(trainable, jnp.asarray(s)) for s in subnets]
  mean_grad = jax.tree.map(lambda *g: sum(np.asarray(x, np.float64) for x in g) / 4, *grads)
  jax.tree.map(lambda new, old, g: np.testing.assert_allclose(new, old - lr * g, rtol=1e-4, atol=1e-6),
               new_state['trainable'], trainable, mean_grad)
  want_params = np.mean([int(subnet_lib.count_params(spec, s)) for s in subnets])
  assert int(metrics['subnet_params']) == int(np.round(want_params))


def test_in_place_distillation_loss_is_kl_to_the_largest_subnets_soft_labels():
  spec, task, trainable, frozen, batch, _ = supernet_setup()
  labels, mask = np.asarray(batch['label']), np.asarray(batch['mask'])
  optimizer = optax.sgd(0.0)
  largest = subnet_lib.largest(spec)
  teacher = np_logits(task, trainable, frozen, spec, largest, batch)
  for options in (steps.SupernetOptions(num_random=2, sandwich='largest', distill=0.7, temperature=2.0),
                  steps.SupernetOptions(num_random=2, distill=1.0, temperature=1.0)):
    state = steps.init_state(trainable, optimizer, seed=1, subnet=np.zeros(spec.num_options.shape))
    _, metrics, subnets = jax.jit(steps.make_train_step(task, spec, optimizer, options))(
        state, frozen, batch)
    subnets = np.asarray(subnets)
    a, temp = options.distill, options.temperature
    per_subnet = []
    for i, s in enumerate(subnets):
      logits = np_logits(task, trainable, frozen, spec, s, batch)
      ce = np_cross_entropy(logits, labels, mask)
      if options.sandwich == 'largest' and i == 0:  # the teacher learns from the labels
        np.testing.assert_array_equal(s, largest)
        per_subnet.append(ce)
      else:
        per_subnet.append((1 - a) * ce + a * np_kl(teacher, logits, mask, temp))
    np.testing.assert_allclose(float(metrics['loss']), np.mean(per_subnet), rtol=1e-5)
  # Without a sandwich the teacher is an extra forward: 2 + 1/3 passes.
  assert options.teacher_forwards == 1 and options.backbone_passes() == 2 + 1 / 3


def test_anchor_takes_the_largest_subnets_roles(tmp_path):
  """supernet.anchor: the given subnet heads the sandwich, learns from the labels,
  and is the teacher whose soft labels the others learn from (numpy losses)."""
  spec, task, trainable, frozen, batch, _ = supernet_setup()
  labels, mask = np.asarray(batch['label']), np.asarray(batch['mask'])
  anchor = np.asarray(subnet_lib.sample(jax.random.key(3), spec))
  assert not np.array_equal(anchor, subnet_lib.largest(spec))
  path = tmp_path / 'anchor.json'
  path.write_text(subnet_lib.dumps(spec, anchor))
  teacher = np_logits(task, trainable, frozen, spec, anchor, batch)
  optimizer = optax.sgd(0.0)
  for options in (steps.SupernetOptions(num_random=1, sandwich='largest', distill=0.6, anchor=str(path)),
                  steps.SupernetOptions(num_random=2, distill=1.0, anchor=str(path))):
    state = steps.init_state(trainable, optimizer, seed=4, subnet=np.zeros(spec.num_options.shape))
    _, metrics, subnets = jax.jit(steps.make_train_step(task, spec, optimizer, options))(
        state, frozen, batch)
    subnets = np.asarray(subnets)
    want = []
    for i, s in enumerate(subnets):
      logits = np_logits(task, trainable, frozen, spec, s, batch)
      ce = np_cross_entropy(logits, labels, mask)
      if options.sandwich != 'none' and i == 0:
        np.testing.assert_array_equal(s, anchor)
        want.append(ce)
      else:
        want.append((1 - options.distill) * ce + options.distill * np_kl(teacher, logits, mask, 1.0))
    np.testing.assert_allclose(float(metrics['loss']), np.mean(want), rtol=1e-5)
  state = steps.init_state(trainable, optimizer, seed=4, subnet=np.zeros(spec.num_options.shape))
  both = steps.SupernetOptions(num_random=1, sandwich='largest_smallest', anchor=str(path))
  drawn = np.asarray(steps.draw_subnets(spec, both, state))
  np.testing.assert_array_equal(drawn[0], anchor)
  np.testing.assert_array_equal(drawn[1], subnet_lib.cheapest_and_largest(spec.num_options, spec.option_costs)[0])


def test_head_weight_weighs_the_sandwich_head_against_the_rest():
  """supernet.head_weight w: the step's loss is w x the head's (here the largest,
  which learns from the labels) + (1 - w) / 2 x each of the two distilled random
  subnets', and an SGD step moves every param by that weighted sum of the three
  gradients, each taken alone (numpy losses, jax.grad per subnet)."""
  spec, task, trainable, frozen, batch, _ = supernet_setup()
  labels, mask = np.asarray(batch['label']), np.asarray(batch['mask'])
  options = steps.SupernetOptions(num_random=2, sandwich='largest', distill=0.5, head_weight=0.8)
  np.testing.assert_allclose(options.loss_weights(), (0.8, 0.1, 0.1), rtol=1e-12)
  assert options.backbone_passes() == 3
  assert steps.SupernetOptions(num_random=2, sandwich='largest').loss_weights() == (1 / 3,) * 3
  lr = 0.5
  optimizer = optax.sgd(lr)
  state = steps.init_state(trainable, optimizer, seed=6, subnet=np.zeros(spec.num_options.shape))
  new_state, metrics, subnets = jax.jit(steps.make_train_step(task, spec, optimizer, options))(
      state, frozen, batch)
  subnets = np.asarray(subnets)
  np.testing.assert_array_equal(subnets[0], subnet_lib.largest(spec))
  teacher = np_logits(task, trainable, frozen, spec, subnets[0], batch)
  weights = (0.8, 0.1, 0.1)
  want = 0.0
  for i, (w, s) in enumerate(zip(weights, subnets)):
    logits = np_logits(task, trainable, frozen, spec, s, batch)
    ce, kl = np_cross_entropy(logits, labels, mask), np_kl(teacher, logits, mask, 1.0)
    want += w * (ce if i == 0 else 0.5 * ce + 0.5 * kl)
  np.testing.assert_allclose(float(metrics['loss']), want, rtol=1e-5)

  def single_loss(t, s, i):
    out = task.forward(peft.combine(frozen, t['model']), peft.Adapters(params=t['adapters'], spec=spec),
                       s, batch, True, None)
    total, n, _ = task.loss(out, batch)
    if i == 0:
      return total / n
    return 0.5 * total / n + 0.5 * steps.distillation_loss(out, jnp.asarray(teacher), batch, 1.0) / n
  grads = [jax.grad(single_loss)(trainable, jnp.asarray(s), i) for i, s in enumerate(subnets)]
  weighted = jax.tree.map(lambda *g: sum(w * np.asarray(x, np.float64) for w, x in zip(weights, g)), *grads)
  jax.tree.map(lambda new, old, g: np.testing.assert_allclose(new, old - lr * g, rtol=1e-4, atol=1e-6),
               new_state['trainable'], trainable, weighted)


def test_distillation_pulls_students_towards_the_teacher_only():
  """The KL term's gradient reaches the students, never the teacher: with distill=1
  and a sandwich of the largest alone plus one student equal to it, the KL is 0 and
  the update is half the largest's cross-entropy gradient."""
  spec, task, trainable, frozen, batch, _ = supernet_setup()
  student, teacher = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3))), jnp.zeros((4, 3))
  g_student = jax.grad(lambda s: steps.distillation_loss(s, teacher, batch, 1.0))(student)
  g_teacher = jax.grad(lambda t: steps.distillation_loss(student, t, batch, 1.0))(teacher)
  assert np.abs(np.asarray(g_student)[:3]).max() > 1e-3
  np.testing.assert_array_equal(np.asarray(g_student)[3], 0.0)  # padding row
  np.testing.assert_array_equal(np.asarray(g_teacher), 0.0)


def test_supernet_options_compile_once_while_steps_and_subnets_change():
  spec, task, trainable, frozen, batch, traces = supernet_setup()
  optimizer = optax.adamw(1e-3)
  options = steps.SupernetOptions(num_random=2, sandwich='largest_smallest', sampling='fair',
                                  distill=0.5, widen_steps=3)
  step = jax.jit(steps.make_train_step(task, spec, optimizer, options))
  state = steps.init_state(trainable, optimizer, seed=2, subnet=np.zeros(spec.num_options.shape))
  seen = []
  for i in range(6):
    state, metrics, subnets = step(state, frozen, batch)
    seen.append(np.asarray(subnets)[2:].tobytes())
    if i == 0:
      traced = len(traces)
  assert traced == 4  # one trace of each subnet's forward (the largest is the teacher)
  assert len(traces) == traced and step._cache_size() == 1
  assert len(set(seen)) == 6
  assert np.isfinite(float(metrics['loss']))


def test_draws_follow_fair_cycles_and_progressive_stages_from_the_step_alone():
  spec, *_ = supernet_setup()
  state = steps.init_state({'w': jnp.zeros(1)}, optax.sgd(0.1), seed=9,
                           subnet=np.zeros(spec.num_options.shape))
  at = lambda options, step: np.asarray(steps.draw_subnets(spec, options, dict(state, step=jnp.int32(step))))
  # Fair, 2 random subnets a step: draws 0..59 (30 steps) cover each option of a
  # support with n options 60 / n times, and each cycle of n draws once each.
  fair = steps.SupernetOptions(num_random=2, sampling='fair')
  draws = np.concatenate([at(fair, s) for s in range(30)])
  for (l, s), n in np.ndenumerate(spec.num_options):
    assert np.bincount(draws[:, l, s], minlength=n).tolist() == [60 // n] * n
  # Progressive shrinking over 8 steps: the largest subnet only at first, then wider.
  prog = steps.SupernetOptions(num_random=3, sandwich='largest_smallest', widen_steps=8)
  largest = subnet_lib.largest(spec)
  assert all(np.array_equal(s, largest) for s in at(prog, 0))  # smallest allowed = largest too
  order = subnet_lib.option_order(spec.num_options, spec.option_costs)
  mid = at(prog, 4)  # 5 options: 1 + 4*4//8 = 3 allowed; 3 options: 2 allowed
  allowed = np.asarray(subnet_lib.allowed_options(spec.num_options, 4, 8))
  np.testing.assert_array_equal(mid[1], np.take_along_axis(order, allowed[..., None] - 1, -1)[..., 0])
  for (l, s), m in np.ndenumerate(allowed):
    assert set(mid[:, l, s]) <= set(order[l, s, :m].tolist())
  cheapest, _ = subnet_lib.cheapest_and_largest(spec.num_options, spec.option_costs)
  np.testing.assert_array_equal(at(prog, 8)[1], cheapest)
  # Defaults: the authors' single uniform draw from the step's subnet key, unchanged.
  np.testing.assert_array_equal(at(steps.SupernetOptions(), 3)[0],
                                subnet_lib.sample(steps.step_keys(dict(state, step=jnp.int32(3)))[0], spec))
