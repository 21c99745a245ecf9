"""Tests for glora_jax.train.setup: the adapter family a config asks for, the fingerprint a
checkpoint must match, and load_trained, which restores a run's trainable params from a
template of shapes alone (no data iterator, no optimizer state allocated)."""
import jax
import numpy as np
import pytest

from helpers import tiny_config, trainable_of
from glora_jax import data, errors
from glora_jax.adapters import glora, lora, surm
from glora_jax.train import loop, setup


def test_adapter_family_is_the_one_the_config_names():
  c = tiny_config()
  c.adapter.ranks = (2, 4)
  assert setup.adapter_family(c) == glora.GLoRA(ranks=(2, 4), structured_b=())
  c.method = 'lora'
  c.adapter.lora_rank, c.adapter.lora_alpha = 4, 8.0
  assert setup.adapter_family(c) == lora.LoRA(rank=4, alpha=8.0, mode='activation')
  c.adapter.lora_mode = 'weight'
  assert setup.adapter_family(c).mode == 'weight'
  c.method = 'surm'
  c.adapter.surm.kind = 'toeplitz'
  assert setup.adapter_family(c) == surm.SURM(kind='toeplitz', form='lora', scale=1.0, rank=None,
                                               block=None, product='auto', init_std=None,
                                               mode='activation')


def test_adapter_family_errors_are_config_errors():
  c = tiny_config()
  c.adapter.ranks = (0,)
  with pytest.raises(errors.ConfigError, match='^adapter: '):
    setup.adapter_family(c)
  c.method = 'full'
  with pytest.raises(errors.ConfigError, match="method 'full' has no adapter family"):
    setup.adapter_family(c)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('trained')
  loop.train_and_evaluate(tiny_config(), workdir, stop_after_steps=2, progress=False)
  return workdir


def test_load_trained_needs_no_batches_and_equals_the_training_state(trained, monkeypatch):
  config = tiny_config()
  run = setup.build(config)
  # The independent way: the state a training run starts from, as a restore template.
  expected = setup.restore_trainable(run, setup.make_training(run)[3], trained)

  def refuse(*args, **kwargs):
    raise AssertionError('load_trained built a training batch iterator')

  monkeypatch.setattr(data, 'BatchIterator', refuse)
  _, got = setup.load_trained(trained, config, run=run)
  jax.tree.map(np.testing.assert_array_equal, got, expected)
  rebuilt, again = setup.load_trained(trained)  # from the workdir's config.json
  as_json = lambda c: c.to_json_best_effort(sort_keys=True)  # noqa: E731
  assert as_json(rebuilt.config) == as_json(config)
  jax.tree.map(np.testing.assert_array_equal, again, expected)


def test_fingerprint_tells_another_adapter_configuration(trained):
  with pytest.raises(errors.CheckpointMismatchError):
    setup.load_trained(trained, tiny_config(**{'adapter.ranks': (2,)}))
  run = setup.build(tiny_config())
  same = setup.fingerprint(run.config, run.spec, run.trainable)
  assert same == setup.fingerprint(tiny_config(), run.spec, run.trainable)
  assert same['method'] == 'glora' and same['adapted_layers'] == len(run.spec.layers) == 12


def test_frozen_quant_errors_are_config_errors():
  with pytest.raises(errors.ConfigError, match="model.frozen_quant 'int4' is unknown"):
    setup.validate(tiny_config(**{'model.frozen_quant': 'int4'}))
  with pytest.raises(errors.ConfigError, match='model.frozen_quant_block: .*even'):
    setup.validate(tiny_config(**{'model.frozen_quant': 'nf4', 'model.frozen_quant_block': 7}))
  bad_block = tiny_config(**{'model.frozen_quant': 'nf4', 'model.frozen_quant_block': 100})
  with pytest.raises(errors.ConfigError, match=r"^model.frozen_quant_block: block 100 does not "
                     r"divide .* kernel 'encoder/layer_0/.*/kernel' of shape \(384, \d+\)"):
    setup.build(bad_block)
  padded = setup.build(tiny_config(**{'model.frozen_quant': 'nf4', 'model.frozen_quant_block': 100,
                                      'model.frozen_quant_pad': True}))
  q = padded.frozen['encoder']['layer_0']['attention']['query']['kernel']
  assert q.shape == (384, 384) and q.codes.shape == (384, 200)
  with pytest.raises(errors.ConfigError, match=r"method 'full' trains 'encoder/layer_0/"):
    setup.build(tiny_config(**{'model.frozen_quant': 'int8', 'method': 'full'}))


def test_quantized_base_is_quantized_on_load_one_kernel_at_a_time(monkeypatch):
  """A checkpoint's float kernels are never on the device together: the importer keeps
  them on the host, each is quantized on the device alone (setup.quantize_frozen),
  and what is not quantized stays on the host until training places it."""
  import gc
  from glora_jax import paths, quant
  gc.collect()
  before = sum(a.nbytes for a in jax.live_arrays())
  live, real_quantize = [], quant.quantize

  def quantize(x, *args, **kwargs):  # the device bytes alive as each kernel comes in
    live.append(sum(a.nbytes for a in jax.live_arrays()) - before)
    return real_quantize(x, *args, **kwargs)
  monkeypatch.setattr(quant, 'quantize', quantize)
  run = setup.build(tiny_config(**{'model.frozen_quant': 'nf4', 'method': 'lora'}))
  flat = paths.flatten(run.frozen)
  kernels = {p: x for p, x in flat.items() if quant.is_quantized(x)}
  float_bytes = sum(int(np.prod(x.shape)) * 4 for x in kernels.values())
  assert len(live) == len(kernels) >= 12
  # At most the codes so far and one float kernel: never the float model (two MiniLM
  # layers: 14 MB of float32 kernels, their NF4 codes an eighth of it).
  largest = max(int(np.prod(x.shape)) * 4 for x in kernels.values())
  assert max(live) < float_bytes / 8 + 2 * largest < float_bytes / 2, (max(live), float_bytes)
  assert all(isinstance(x, np.ndarray) for p, x in flat.items() if p not in kernels)


def test_int8_base_trains_and_resumes_bit_exact(tmp_path):
  """The tiny LoRA run over an int8 base: the adapted kernels (and only they) are
  quantized, and 2 + 2 resumed steps equal 4 straight ones (the frozen tree is never
  saved: it is rebuilt, quantized the same way, on resume)."""
  from glora_jax import paths, quant
  config = tiny_config(**{'model.frozen_quant': 'int8', 'method': 'lora', 'num_epochs': 1})
  run = setup.build(config)
  quantized = {p for p, x in paths.flatten(run.frozen).items() if quant.is_quantized(x)}
  assert quantized == {f'{p}/kernel' for p in run.spec.paths}
  loop.train_and_evaluate(config, tmp_path / 'straight', stop_after_steps=4, progress=False)
  loop.train_and_evaluate(config, tmp_path / 'split', stop_after_steps=2, progress=False)
  loop.train_and_evaluate(config, tmp_path / 'split', stop_after_steps=4, progress=False)
  a, b = (trainable_of(config, tmp_path / w) for w in ('straight', 'split'))
  jax.tree.map(np.testing.assert_array_equal, a, b)
  # A resume over another base would mix two recipes in one run.
  with pytest.raises(errors.CheckpointMismatchError, match="frozen_quant is 'int8, block 64'"):
    loop.train_and_evaluate(tiny_config(**{'model.frozen_quant': 'nf4', 'method': 'lora',
                                           'num_epochs': 1}), tmp_path / 'split', progress=False)
