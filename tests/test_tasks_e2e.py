"""End to end for the image-classification and causal-LM tasks on bundled data and on
checkpoints' files: train a tiny supernet, search, merge, and rebuild the plain model
from the exported files alone."""
import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from configs import instruct, llama_glora, tiny_mnist_vit_glora
from glora_jax import errors, interop, peft
from glora_jax import subnet as subnet_lib
from glora_jax.data import multiple_choice
from glora_jax.models import registry
from glora_jax.search import driver, evolution, export
from glora_jax.train import loop, setup, tasks

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'
TINY_SEARCH = evolution.SearchConfig(population=4, generations=2, parents=2, mutations=2,
                                     crossovers=2, param_limit=1e9, seed=0)


def train(config, workdir):
  config.checkpoint.async_save = False
  # One device: the suite simulates 8 on this CPU, and a search chunk that does not
  # split over them would be evaluated 8 times over.
  config.mesh.num_devices = 1
  loop.train_and_evaluate(config, workdir, progress=False)
  return workdir


def test_vit_mnist_search_and_plain_model_from_files(tmp_path):
  workdir = train(tiny_mnist_vit_glora.get_config(), tmp_path / 'train')
  out = tmp_path / 'search'
  summary = driver.search_and_export(workdir, TINY_SEARCH, out=out, chunk=4, eval_batch_size=16,
                                     log=lambda s: None)
  assert summary['val_metric'] == 'accuracy'
  assert summary['merged_prediction_agreement'] == 1.0
  assert summary['test_accuracy'] == summary['test_accuracy_merged']
  assert json.loads((out / 'model_config.json').read_text())['model'] == 'vit'

  run, trainable = setup.load_trained(workdir)
  chosen = subnet_lib.loads(run.spec, (out / 'best_subnet.json').read_text())
  model, params = export.load_merged(out)
  batch = {k: jnp.asarray(v[:16]) for k, v in run.model_data.splits['test'].items()}
  plain = run.model_data.forward_with(model)(params, None, None, batch, False, None)
  adapted = run.model_data.forward_loss.forward(peft.combine(run.frozen, trainable['model']),
                                    peft.Adapters(params=trainable['adapters'], spec=run.spec),
                                    chosen, batch, False, None)
  np.testing.assert_allclose(plain, adapted, rtol=1e-4, atol=1e-4)


def bias_supports_active(spec, subnet) -> bool:
  """Whether some layer of `subnet` chose GLoRA's C or E, the supports that give
  a layer a bias."""
  return any(row.get(s, 'none') != 'none' for row in subnet_lib.to_dict(spec, subnet).values()
             for s in ('C', 'E'))


def test_llama_search_and_plain_model_with_gained_biases_from_files(tmp_path):
  workdir = train(llama_glora.get_config('tiny'), tmp_path / 'train')
  out = tmp_path / 'search'
  summary = driver.search_and_export(workdir, TINY_SEARCH, out=out, chunk=4, eval_batch_size=16,
                                     log=lambda s: None)
  # Fitness is the mean log-likelihood of the target tokens (every real token but the
  # first, data.format 'text'); the test report has it and next-token accuracy, for the
  # adapted supernet and the merged plain model alike.
  assert summary['val_metric'] == 'token_log_likelihood'
  assert summary['merged_prediction_agreement'] >= 0.99  # near-ties of a barely trained LM
  assert abs(summary['test_next_token_accuracy'] - summary['test_next_token_accuracy_merged']) <= 0.01
  assert abs(summary['test_loss'] - summary['test_loss_merged']) < 1e-4

  run, trainable = setup.load_trained(workdir)
  chosen = subnet_lib.loads(run.spec, (out / 'best_subnet.json').read_text())
  # The reported val fitness, recomputed with numpy from the chosen subnet's logits on
  # the whole val split: the mean log-probability of the real next tokens.
  val = run.model_data.splits['eval']
  adapters = peft.Adapters(params=trainable['adapters'], spec=run.spec)
  params_in = peft.combine(run.frozen, trainable['model'])
  logits = np.concatenate([np.asarray(peft.forward(
      run.model_data.model, params_in, adapters, chosen, jnp.asarray(val['input_ids'][i:i + 16]),
      jnp.asarray(val['attention_mask'][i:i + 16]))) for i in range(0, len(val['input_ids']), 16)])
  real = np.asarray(val['attention_mask'])[:, 1:] > 0
  logp = logits[:, :-1] - np.log(np.exp(logits[:, :-1]).sum(-1, keepdims=True))
  target_logp = np.take_along_axis(logp, np.asarray(val['input_ids'])[:, 1:, None], -1)[..., 0]
  assert summary['val_token_log_likelihood'] == pytest.approx(
      target_logp[real].sum() / real.sum(), abs=1e-5)
  if not bias_supports_active(run.spec, chosen):
    # The bias test must not be vacuous: export a subnet with E active in every layer.
    names = run.spec.support_names[0]
    chosen = chosen.copy()
    chosen[:, names.index('E')] = run.spec.layers[0].family.options('E').index('vector')
    out = tmp_path / 'forced'
    base = export.merged_params(run.model_data.params, trainable, run.spec, chosen)
    export.save_merged(out, *export.plain_model(run.model_data.model, base))
  model, params = export.load_merged(out)
  assert model.config.attention_bias or model.config.mlp_bias  # some layer really gained a bias
  described = json.loads((out / 'model_config.json').read_text())['config']
  assert described['attention_bias'] == model.config.attention_bias

  batch = {k: jnp.asarray(v[:8]) for k, v in run.model_data.splits['test'].items()}
  plain = model.apply({'params': params}, batch['input_ids'], batch['attention_mask'])
  adapted = peft.forward(run.model_data.model, peft.combine(run.frozen, trainable['model']),
                         peft.Adapters(params=trainable['adapters'], spec=run.spec), chosen,
                         batch['input_ids'], batch['attention_mask'])
  np.testing.assert_allclose(plain, adapted, rtol=1e-4, atol=1e-4)
  # Non-vacuous: the original bias-less model would ignore what the merge added.
  ignored = registry.unrolled(run.model_data.model).apply({'params': export.merged_params(
      run.model_data.params, trainable, run.spec, chosen)}, batch['input_ids'], batch['attention_mask'])
  assert np.abs(ignored - adapted).max() > 1e-3


ALPACA = [{'instruction': instruction, 'input': extra, 'output': output}
          for instruction, extra, output in [('Name a sport.', '', 'Football.'),
                                             ('Say hello', 'to the BBC', 'Hello BBC!'),
                                             ('Count to three.', '', 'One two three.'),
                                             ('Who won?', 'the league', 'Chelsea won it.')]]
CHOICES = [{'context': 'The league was won by', 'choices': ['Chelsea', 'a cat', 'Bolton'], 'gold': 0},
           {'context': 'One, two,', 'choices': ['three', 'blue'], 'gold': 0},
           {'context': 'Hello', 'choices': ['BBC!', 'world', 'there', 'you'], 'gold': 1}]


def _alpaca_run(tmp_path, directory):
  """configs/instruct.py (tiny) on Alpaca records in a JSON array, packed, a quarter of
  train carved off for validation; the tokens report checked."""
  data = tmp_path / 'alpaca.json'
  data.write_text(json.dumps(ALPACA * 3))
  config = instruct.get_config('method=glora,tiny')
  config.model.checkpoint = str(FIXTURES / directory)
  config.data.train_split = config.data.test_split = str(data)
  config.data.val_fraction = 0.25
  workdir = train(config, tmp_path / 'train')
  record = json.loads((workdir / 'data.json').read_text())
  assert record['format'] == 'alpaca' and record['packing'] is True
  assert record['tokens']['train']['examples'] == 9 and record['tokens']['eval']['examples'] == 3
  assert record['tokens']['train']['rows'] < 9  # packed
  trained = json.loads((workdir / 'summary.json').read_text())
  assert trained['val_metric'] == 'token_log_likelihood'
  assert trained['val_perplexity'] == pytest.approx(np.exp(-trained['val_token_log_likelihood']),
                                                    rel=1e-5)
  return workdir


def _check_multiple_choice_fitness(summary, workdir, out, choices):
  """The search's fitness of the chosen subnet is lm-eval-harness's acc_norm of the
  adapted model under it (multiple_choice.evaluate_file)."""
  assert summary['val_metric'] == 'mc_acc_norm' and 'test_token_log_likelihood' in summary
  run, trainable = setup.load_trained(workdir)
  chosen = subnet_lib.loads(run.spec, (out / 'best_subnet.json').read_text())
  forward = tasks.make_forward(run.model_data.family, run.model_data.model)
  adapted = lambda p, ids, mask: forward(p[0], p[1], p[2], {'input_ids': ids, 'attention_mask': mask},
                                         False, None)
  params = (peft.combine(run.frozen, trainable['model']),
            peft.Adapters(params=trainable['adapters'], spec=run.spec), jnp.asarray(chosen))
  reference = multiple_choice.evaluate_file(choices, run.model_data.model, params,
                                            run.config.model.checkpoint, batch_size=4,
                                            max_len=run.config.data.max_len, forward=adapted)
  assert summary['val_mc_acc_norm'] == pytest.approx(reference['acc_norm'])


@pytest.mark.parametrize('directory, family', [('hf_llama3', 'llama'), ('hf_qwen2', 'qwen2')])
def test_a_checkpoint_trains_searches_and_reloads_in_its_library_layout(directory, family, tmp_path):
  """A tiny checkpoint that transformers wrote (Llama 3 rope, GQA; Qwen2's q/k/v biases)
  fine-tuned on text its own tokenizer.json tokenises (Llama: Alpaca instructions, packed,
  searched by multiple-choice accuracy; Qwen2: layers under scan), searched, merged and
  exported; the export read
  back by interop.load_pretrained gives the adapted logits."""
  search = {}
  if directory == 'hf_llama3':
    workdir = _alpaca_run(tmp_path, directory)
    choices = tmp_path / 'mc.jsonl'
    choices.write_text('\n'.join(json.dumps(e) for e in CHOICES))
    with pytest.raises(errors.ConfigError, match="--fitness 'perplexity' is not a metric this "
                       'task ranks by'):
      driver.search_and_export(workdir, TINY_SEARCH, out=tmp_path / 'bad', fitness='perplexity')
    search = {'fitness': 'mc_acc_norm', 'mc_file': str(choices)}
  else:
    config = llama_glora.get_config('tiny')
    config.model.name = family
    config.model.checkpoint = str(FIXTURES / directory)
    config.model.scan_layers = True  # trained, searched and exported with stacked layers
    workdir = train(config, tmp_path / 'train')
  out = tmp_path / 'search'
  summary = driver.search_and_export(workdir, TINY_SEARCH, out=out, chunk=4, eval_batch_size=16,
                                     log=lambda s: None, **search)
  assert abs(summary['test_loss'] - summary['test_loss_merged']) < 1e-4
  if search:
    _check_multiple_choice_fitness(summary, workdir, out, search['mc_file'])

  run, trainable = setup.load_trained(workdir)
  test = run.model_data.splits['test']
  # The checkpoint's tokenizer, not MiniLM's: every id is inside its 400-token vocabulary.
  vocab = run.model_data.model.config.vocab_size
  assert vocab == 400 and 0 < test['input_ids'].max() < vocab
  chosen = subnet_lib.loads(run.spec, (out / 'best_subnet.json').read_text())
  model, params = interop.load_pretrained(out / 'hf')
  assert registry.of_model(model).name in (family, 'llama')  # llama: it gained o/MLP biases
  assert (out / 'hf' / 'tokenizer.json').is_file()
  batch = {k: jnp.asarray(v[:8]) for k, v in test.items()}
  plain = model.apply({'params': params}, batch['input_ids'], batch['attention_mask'])
  adapted = peft.forward(run.model_data.model, peft.combine(run.frozen, trainable['model']),
                         peft.Adapters(params=trainable['adapters'], spec=run.spec), chosen,
                         batch['input_ids'], batch['attention_mask'])
  np.testing.assert_allclose(plain, adapted, rtol=1e-4, atol=1e-4)
