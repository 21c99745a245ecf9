"""Tests for glora_jax.data.task_data through a run's config.data: BBC News as your own JSON
lines and CSV, MNIST as an image folder, tfds by name, GLUE with its metrics (STS-B's
regression head trained, searched and merged), k-shot and a validation split carved off train."""
import csv
import json
import pathlib

import jax
import numpy as np
import pytest
import scipy.stats
from PIL import Image

import helpers
from glora_jax.data import bbc_news, mnist, task_data, testing
from glora_jax.errors import DataError
from glora_jax.search import driver, evolution
from glora_jax.train import loop, setup, tasks

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'


def _bbc_files(root: pathlib.Path, data_dir) -> dict[str, str]:
  """BBC News's train, val and test written as JSON lines and CSV, labels by name."""
  names = bbc_news.class_names()
  assert list(names) == sorted(names)  # so the string labels encode to the bundled ints
  out = {}
  for split in ('train', 'val', 'test'):
    arrays = bbc_news.load_split(split, data_dir)
    rows = [{'text': t, 'label': names[y]} for t, y in zip(arrays['text'], arrays['label'])]
    (root / f'{split}.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    with open(root / f'{split}.csv', 'w', newline='', encoding='utf-8') as f:
      writer = csv.DictWriter(f, ['text', 'label'])
      writer.writeheader()
      writer.writerows(rows)
    out[split] = str(root / split)
  return out


def test_bbc_as_json_lines_and_csv_trains_as_the_bundled_dataset(tmp_path):
  data_dir = tmp_path / 'tfds'
  paths = _bbc_files(tmp_path, data_dir)
  common = {'data.data_dir': str(data_dir), 'num_epochs': 1, 'mesh.num_devices': 1,
            'data.limit': 32, 'method': 'lora'}  # LoRA: the quickest compile
  bundled = helpers.tiny_config(**common)
  files = {fmt: helpers.tiny_config(**common, **{
      'data.name': fmt, **{f'data.{role}_split': f'{paths[split]}.{ext}' for role, split in
                           (('train', 'train'), ('eval', 'val'), ('test', 'test'))}})
           for fmt, ext in (('json', 'jsonl'), ('csv', 'csv'))}
  want = task_data.open_task(bundled.data)
  for config in files.values():
    got = task_data.open_task(config.data)
    assert got.class_names == bbc_news.class_names() and got.kind == 'classification'
    for role in ('train', 'eval', 'test'):
      for key, value in want.splits[role].items():
        np.testing.assert_array_equal(got.splits[role][key], value, err_msg=f'{role}/{key}')
  a = loop.train_and_evaluate(bundled, tmp_path / 'bundled', progress=False)
  b = loop.train_and_evaluate(files['json'], tmp_path / 'json', progress=False)
  assert (a['val_accuracy'], a['val_loss']) == (b['val_accuracy'], b['val_loss'])
  jax.tree.map(np.testing.assert_array_equal, helpers.trainable_of(bundled, tmp_path / 'bundled'),
               helpers.trainable_of(files['json'], tmp_path / 'json'))
  assert json.loads((tmp_path / 'json' / 'data.json').read_text())['kind'] == 'classification'


def test_mnist_as_an_image_folder_reads_as_mnist5k(tmp_path):
  arrays = mnist.load_split('val', tmp_path / 'tfds')
  picked = np.concatenate([np.flatnonzero(arrays['label'] == d)[:3] for d in range(10)])
  for i in picked:
    folder = tmp_path / 'digits' / str(arrays['label'][i])
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arrays['image'][i][..., 0]).save(folder / f'{i:04d}.png')
  dc = helpers.tiny_config(**{'data.name': 'imagefolder', 'data.train_split': str(tmp_path / 'digits'),
                              'data.eval_split': '', 'data.test_split': '', 'data.limit': 0}).data
  data = task_data.open_task(dc)
  assert (data.modality, data.class_names) == ('image', tuple(str(d) for d in range(10)))
  order = picked[np.lexsort((picked, arrays['label'][picked]))]  # by class, then file name
  examples = data.splits['train'].__getitems__(range(len(order)))
  np.testing.assert_array_equal(np.stack([e['image'] for e in examples]), arrays['image'][order])
  np.testing.assert_array_equal([e['label'] for e in examples], arrays['label'][order])


def test_k_shot_takes_k_of_each_class_per_seed_and_leaves_eval_alone(tmp_path):
  dc = helpers.tiny_config(**{'data.data_dir': str(tmp_path), 'data.limit': 0}).data
  plain = task_data.open_task(dc)
  picks = {}
  for seed in (0, 0, 1):
    dc.shots, dc.shots_seed = 2, seed
    data = task_data.open_task(dc)
    labels = data.splits['train']['label']
    assert np.bincount(labels).tolist() == [2] * 5
    kept = np.asarray(data.record['shots']['indices'])
    np.testing.assert_array_equal(data.splits['train']['text'], plain.splits['train']['text'][kept])
    np.testing.assert_array_equal(data.splits['eval']['text'], plain.splits['eval']['text'])
    picks.setdefault(seed, []).append(kept.tolist())
  assert picks[0][0] == picks[0][1] and picks[0][0] != picks[1][0]
  dc.shots = 200  # BBC's train has fewer than 200 documents of some class
  with pytest.raises(DataError, match='data.shots=200 needs 200 training examples of every class'):
    task_data.open_task(dc)


def test_val_fraction_carves_a_stratified_eval_split_off_train(tmp_path):
  dc = helpers.tiny_config(**{'data.data_dir': str(tmp_path), 'data.limit': 0,
                              'data.eval_split': '', 'data.val_fraction': 0.1}).data
  data = task_data.open_task(dc)
  whole = bbc_news.load_split('train', tmp_path)
  carved = np.asarray(data.record['val_from_train']['indices'])
  np.testing.assert_array_equal(data.splits['eval']['text'], whole['text'][carved])
  kept = np.setdiff1d(np.arange(len(whole['text'])), carved)  # BBC repeats some texts: by index
  np.testing.assert_array_equal(data.splits['train']['text'], whole['text'][kept])
  np.testing.assert_array_equal(np.bincount(whole['label'][carved]),
                                np.round(0.1 * np.bincount(whole['label'])))


STSB = {  # GLUE's STS-B: sentence pairs scored 0 to 5
    'train': [{'sentence1': f'the {a} sat on the {b}', 'sentence2': f'a {b} held the {a}',
               'label': float((3 * i) % 11) / 2} for i, (a, b) in enumerate(
                   (a, b) for a in ('cat', 'dog', 'bird', 'man') for b in ('mat', 'rug', 'sofa', 'bed'))],
    'validation': [{'sentence1': f'the {a} runs', 'sentence2': f'the {a} walks', 'label': float(i % 6)}
                   for i, a in enumerate(('cat', 'dog', 'bird', 'man', 'fox', 'owl', 'ant', 'elk'))],
}


def test_glue_stsb_trains_a_regression_head_scored_by_pearson_searched_and_merged(tmp_path):
  data_dir = tmp_path / 'tfds'
  testing.write_prepared('glue/stsb', data_dir, STSB)
  config = helpers.tiny_config(**{
      'model.checkpoint': str(FIXTURES / 'hf_bert'), 'mesh.num_devices': 1, 'num_epochs': 1,
      'data.name': 'glue/stsb', 'data.data_dir': str(data_dir), 'data.train_split': 'train',
      'data.eval_split': '', 'data.val_fraction': 0.25, 'data.test_split': 'validation',
      'data.limit': 0, 'batch_size': 4, 'eval_batch_size': 4, 'checkpoint.every_steps': 0})
  summary = loop.train_and_evaluate(config, tmp_path / 'run', progress=False)
  assert summary['val_metric'] == 'pearson' and 'val_accuracy' not in summary
  run, trainable = setup.load_trained(tmp_path / 'run', config)
  assert run.model_data.model.num_classes == 1
  train = run.model_data.splits['train']
  assert train['token_type_ids'].max() == 1  # BERT's second segment
  assert train['label'].dtype == np.float32
  # The evaluator's Pearson is scipy's of the plain model's outputs on the carved val split.
  val = run.model_data.splits['eval']
  params = tasks.peft.combine(run.frozen, trainable['model'])
  adapters = tasks.peft.Adapters(params=trainable['adapters'], spec=run.spec)
  outputs = run.model_data.forward_loss.forward(params, adapters, setup.eval_subnet(run),
                                                {k: v for k, v in val.items()}, False, None)
  preds = np.asarray(outputs)[:, 0]
  assert summary['val_pearson'] == pytest.approx(scipy.stats.pearsonr(preds, val['label'])[0], abs=1e-5)
  np.testing.assert_allclose(summary['val_loss'], np.mean((preds - val['label']) ** 2), rtol=1e-4)

  cfg = evolution.SearchConfig(population=2, generations=1, parents=2, mutations=1, crossovers=1,
                               param_limit=1e9, seed=0)
  s = driver.search_and_export(tmp_path / 'run', cfg, out=tmp_path / 'search', chunk=2,
                               export_formats=('flax',), log=lambda m: None)
  assert s['val_metric'] == 'pearson'
  assert abs(s['test_pearson'] - s['test_pearson_merged']) < 1e-4
  assert s['merged_prediction_agreement'] == 1.0
  assert json.loads((tmp_path / 'search' / 'labels.json').read_text())['kind'] == 'regression'


def test_glue_cola_and_mrpc_name_their_metrics_and_pairs(tmp_path):
  testing.write_prepared('glue/cola', tmp_path, {
      'train': [{'sentence': s, 'label': y} for s, y in (('ok it is', 1), ('is it ok', 1), ('it ok is', 0))],
      'validation': [{'sentence': 'ok', 'label': 1}]})
  testing.write_prepared('glue/mrpc', tmp_path, {
      'train': [{'sentence1': 'one', 'sentence2': 'uno', 'label': 1}, {'sentence1': 'two', 'sentence2': 'tres', 'label': 0}],
      'validation': [{'sentence1': 'three', 'sentence2': 'tres', 'label': 0}]})
  dc = helpers.tiny_config(**{'data.data_dir': str(tmp_path), 'data.train_split': 'train',
                              'data.eval_split': 'validation', 'data.test_split': ''}).data
  for name, metrics in (('glue/cola', ('matthews_corrcoef',)), ('tfds:glue/mrpc', ('f1', 'accuracy'))):
    dc.name = name
    data = task_data.open_task(dc)
    assert (data.metrics, data.kind, data.num_classes) == (metrics, 'classification', 2)
  assert sorted(data.splits['train']['text_pair']) == ['tres', 'uno']
  dc.name = 'glue/nosuch'
  with pytest.raises(DataError, match="unknown GLUE task 'glue/nosuch'"):
    task_data.open_task(dc)


def test_an_image_dataset_by_tfds_name_reads_lazily_sliced_and_resized(tmp_path):
  testing.write_fake_prepared('oxford_flowers102', tmp_path, {'train': 12, 'validation': 3, 'test': 3})
  dc = helpers.tiny_config(**{'data.name': 'tfds:oxford_flowers102', 'data.data_dir': str(tmp_path),
                              'data.train_split': 'train[:10]', 'data.eval_split': 'validation',
                              'data.test_split': 'test', 'data.image_size': 16, 'data.limit': 0}).data
  data = task_data.open_task(dc)
  assert (data.modality, data.num_classes, len(data.splits['train'])) == ('image', 102, 10)
  example = data.splits['eval'][0]
  assert example['image'].shape == (16, 16, 3) and example['image'].dtype == np.float32
  labels = task_data.labels_of(data.splits['train'])
  np.testing.assert_array_equal(labels, [data.splits['train'][i]['label'] for i in range(10)])


@pytest.mark.parametrize('directory', ['hf_bert', 'hf_roberta'])
def test_sentence_pairs_are_encoded_as_each_checkpoint_expects(directory):
  """BERT: [CLS] a [SEP] b [SEP], token types 0 then 1; RoBERTa: <s> a </s></s> b </s>,
  no token types (REFERENCE.md §4), from each checkpoint's own tokenizer.json."""
  import tokenizers
  from glora_jax.data import text
  path = FIXTURES / directory / 'tokenizer.json'
  tok = tokenizers.Tokenizer.from_file(str(path))  # the file as written: no padding set
  a, b = 'the cat sat', 'a dog ran far'
  ids = lambda s: tok.encode(s, add_special_tokens=False).ids
  got = text.tokenize([a], path, 64, pairs=[b])
  n = int(got['attention_mask'].sum())
  if directory == 'hf_bert':
    cls, sep = tok.token_to_id('[CLS]'), tok.token_to_id('[SEP]')
    want = [cls, *ids(a), sep, *ids(b), sep]
    types = [0] * (len(ids(a)) + 2) + [1] * (len(ids(b)) + 1)
  else:
    bos, eos = tok.token_to_id('<s>'), tok.token_to_id('</s>')
    want = [bos, *ids(a), eos, eos, *ids(b), eos]
    types = [0] * len(want)
  assert got['input_ids'][0, :n].tolist() == want
  assert got['token_type_ids'][0, :n].tolist() == types
