"""Tests for glora_jax.cli through the real command lines: a bad config argument, an
unknown config field, a missing config file or export format is one 'error:' line naming
what is allowed, exit code 2, and nothing written."""
import dataclasses
import json
import pathlib
import subprocess
import sys

import pytest
from PIL import Image

from configs import bbc_minilm_glora

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(script, *args):
  proc = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
  return proc.returncode, proc.stdout, proc.stderr.strip().splitlines()


@pytest.mark.parametrize('args,expected', [
    (['--config', 'configs/bbc_minilm_glora.py:nosuch'],
     "error: --config configs/bbc_minilm_glora.py:nosuch: unknown argument 'nosuch' for "
     'bbc_minilm_glora; use 8shot or quick'),
    (['--config=configs/nosuch.py'], 'error: --config configs/nosuch.py: no such file; configs '
     'in configs/: bbc_minilm_full.py, bbc_minilm_glora.py'),
    (['--config', 'configs/bbc_minilm_glora.py', '--config.optim.lr=abc'],
     "error: flag --config.optim.lr=abc: could not convert string to float: 'abc'"),
    (['--config', 'configs/bbc_minilm_glora.py', "--config.optim.lr_multipliers=(('x', -1),)"],
     "error: optim.lr_multipliers: each rule is a (path regex, multiplier > 0) pair, got ('x', -1)"),
    (['--config', 'configs/tiny_bbc_glora.py', "--config.optim.lr_multipliers=(('adapters/.*/Cx', 0.1),)"],
     "error: optim.lr_multipliers: lr multiplier pattern 'adapters/.*/Cx' matched no parameter; "
     "paths look like 'adapters/encoder/layer_0/attention/key/Ad'"),
])
def test_config_errors_are_one_line(tmp_path, args, expected):
  code, out, err = run('train.py', *args, '--workdir', str(tmp_path / 'run'))
  assert code == 2 and out == ''
  assert len(err) == 1 and err[0].startswith(expected), err
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('field,where', [('nosuch', ''), ('optim.nosuch', 'optim'),
                                         ('data.max_len.x', 'data.max_len')])
def test_unknown_config_field_lists_the_fields_there(tmp_path, field, where):
  code, out, err = run('train.py', '--config', 'configs/bbc_minilm_glora.py',
                       f'--config.{field}=3', '--workdir', str(tmp_path / 'run'))
  assert code == 2 and out == '' and len(err) == 1, err
  node = bbc_minilm_glora.get_config()
  for part in where.split('.') if where else []:
    node = node[part]
  said = f"'{where}'" if where else 'the config'
  allowed = ', '.join(sorted(node.keys())) if hasattr(node, 'keys') else 'none (it is a int)'
  assert err[0] == (f"error: unknown config field '{field}' in --config.{field}=3: {said} has no "
                    f"field '{field.split('.')[-1]}'; its fields: {allowed}")
  assert not (tmp_path / 'run').exists()


def test_search_refuses_an_unknown_export_format(tmp_path):
  code, out, err = run('search.py', '--ckpt', str(tmp_path), '--export_formats=flax,onnx')
  assert code == 2 and out == ''
  assert err == ["error: unknown export formats ['onnx']; choose one or more of ['flax', "
                 "'torch'] (flax: merged_params and model_config.json; torch: the HF "
                 'transformers or timm layout)']
  assert list(tmp_path.iterdir()) == []
  code, _, err = run('search.py', '--ckpt', str(tmp_path), '--population=many')
  assert code == 2 and len(err) == 1 and err[0].startswith('error: flag --population=many:')
  code, out, err = run('search.py', '--ckpt', str(tmp_path), '--requantize=int4')
  assert code == 2 and out == ''
  assert err == ["error: --requantize 'int4' is unknown; expected one of ['int8', 'nf4'] (or "
                 'nothing)']
  assert list(tmp_path.iterdir()) == []


def test_search_flags_are_searchconfig_fields_with_its_defaults():
  """search.py defines one flag per SearchConfig field (the dataclass's default; the
  parameter limits in millions), listed among search.py's own flags."""
  code = ('import dataclasses, json, search; from absl import flags; '
          'print(json.dumps({"defaults": {f.name: flags.FLAGS[f.name].default '
          'for f in dataclasses.fields(search.SearchConfig)}, "own": sorted('
          'f.name for f in flags.FLAGS.get_flags_for_module("search"))}))')
  proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  got = json.loads(proc.stdout)
  from glora_jax.search.evolution import SearchConfig
  expected = {f.name: f.default / 1e6 if f.name.endswith('param_limit') else f.default
              for f in dataclasses.fields(SearchConfig)}
  assert got['defaults'] == expected
  assert set(expected) <= set(got['own'])


def _checkpoint(tmp_path, name, **config_changes):
  """A copy of a fixture checkpoint with config.json fields replaced (None: removed)."""
  src = ROOT / 'tests' / 'fixtures' / name
  out = tmp_path / f'ckpt_{name}'
  out.mkdir()
  for file in src.iterdir():
    (out / file.name).write_bytes(file.read_bytes())
  config = json.loads((src / 'config.json').read_text())
  config.update(config_changes)
  (out / 'config.json').write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
  return out


def _without(directory, name):
  (directory / name).unlink()
  return directory


@pytest.mark.parametrize('config_file, make, expected', [
    ('tiny_bbc_glora', lambda tmp: tmp / 'nothing_here',
     'error: config: checkpoint {ckpt} does not exist'),
    ('tiny_bbc_glora', lambda tmp: _checkpoint(tmp, 'hf_bert', model_type='gpt2'),
     "error: config: {ckpt}/config.json: model_type 'gpt2' is not a known model family; known: "
     "HF model_type ['bert', 'llama', 'mistral', 'qwen2', 'roberta']"),
    ('tiny_bbc_glora', lambda tmp: _checkpoint(tmp, 'hf_qwen2'),
     "error: config: model family 'qwen2' serves causal_lm; task is text_classification"),
    ('llama_glora', lambda tmp: _checkpoint(tmp, 'hf_llama3', rope_parameters={
        'rope_type': 'yarn', 'factor': 4.0, 'rope_theta': 10000.0}),
     "error: config: {ckpt}/config.json: rope type 'yarn' is not supported; supported: "
     "['default', 'linear', 'llama3']"),
    ('llama_glora', lambda tmp: _without(_checkpoint(tmp, 'hf_llama3'), 'tokenizer.json'),
     'error: config: {ckpt} has no tokenizer.json'),
])
def test_a_checkpoint_that_cannot_be_read_is_one_line(tmp_path, config_file, make, expected):
  ckpt = make(tmp_path)
  code, out, err = run('train.py', '--config', f'configs/{config_file}.py:tiny'
                       if config_file == 'llama_glora' else f'configs/{config_file}.py',
                       f'--config.model.checkpoint={ckpt}', '--workdir', str(tmp_path / 'run'))
  assert code == 2 and out == ''
  assert len(err) == 1 and err[0].startswith(expected.format(ckpt=ckpt)), err
  assert not (tmp_path / 'run').exists()


def _bad_data(tmp_path, case):
  """(train.py arguments, what the error line says) of one bad-data case."""
  tiny = ['--config', 'configs/tiny_bbc_glora.py']
  if case == 'max_len':
    return tiny + ['--config.data.max_len=1000'], ('error: config: data.max_len=1000 is more than '
                                                    'the 512 positions of the model')
  if case == 'not_prepared':
    return tiny + ['--config.data.name=tfds:food101', f'--config.data.data_dir={tmp_path}'], (
        "error: dataset 'food101' (version *) is not prepared in data_dir")
  if case == 'image':
    good = tmp_path / 'images' / 'cat'
    good.mkdir(parents=True)
    Image.new('L', (4, 4)).save(good / 'a.png')
    (good / 'b.png').write_bytes(b'not an image')
    return tiny + ['--config.data.name=imagefolder', f'--config.data.train_split={good.parent}',
                   '--config.data.eval_split=', '--config.data.test_split=', '--config.task=image_classification'], (
        f'error: data: image {good / "b.png"} does not decode')
  if case.startswith('subnet'):
    text = {'subnet_json': '{"encoder": ', 'subnet_layers': '{}',
            'subnet_option': '{"encoder/layer_0/attention/key": {"A": "lora_99"}}'}[case]
    (tmp_path / 'subnet.json').write_text(text)
    said = {'subnet_json': 'not valid JSON', 'subnet_layers': 'subnet has no entry for adapted layer',
            'subnet_option': "unknown option 'lora_99' for support 'A'"}[case]
    return tiny + [f'--config.subnet={tmp_path / "subnet.json"}'], (
        f'error: subnet file {tmp_path / "subnet.json"}: ', said)
  if case.startswith('lm_'):
    data = tmp_path / 'alpaca.jsonl'
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    ckpt = ROOT / 'tests' / 'fixtures' / ('hf_llama_linear' if case == 'lm_chat_template' else 'hf_llama3')
    args = ['--config', 'configs/instruct.py:tiny,format=' + ('chat' if case == 'lm_chat_template'
                                                               else 'alpaca'),
            f'--config.model.checkpoint={ckpt}', f'--config.data.train_split={data}',
            f'--config.data.test_split={data}']
    return args, {'lm_chat_template': f'error: data: tokenizer dir {ckpt} has no chat template',
                  'lm_field': f"error: data: {data}:2 has no field 'output'"}[case]
  lines = {'json_line': ['{"text": "a", "label": "x"}', '{"text": "b", "label": '],
           'field': ['{"text": "a", "label": "x"}', '{"txt": "b", "label": "y"}'],
           'empty': [],
           'unseen': ['{"text": "a", "label": "x"}']}[case]
  train = tmp_path / 'train.jsonl'
  train.write_text(''.join(line + '\n' for line in lines))
  test = tmp_path / 'test.jsonl'
  test.write_text('{"text": "c", "label": "z"}\n' if case == 'unseen' else lines[0] + '\n' if lines else '')
  said = {'json_line': f'error: data: {train}:2 is not valid JSON',
          'field': f"error: data: {train}:2 has no field 'text'",
          'empty': f'error: data: {train} holds no examples',
          'unseen': "error: data: test split has label 'z' that the train split never has"}[case]
  return ['--config', 'configs/tiny_bbc_glora.py', '--config.data.name=json',
          f'--config.data.train_split={train}', '--config.data.eval_split=',
          f'--config.data.test_split={test}'], said


@pytest.mark.parametrize('case', ['json_line', 'field', 'empty', 'unseen', 'image', 'not_prepared',
                                  'max_len', 'subnet_json', 'subnet_layers', 'subnet_option',
                                  'lm_chat_template', 'lm_field'])
def test_bad_data_and_subnets_are_one_line_before_the_workdir(tmp_path, case):
  """Each bad input: one 'error:' line naming the file (and line) and what was expected,
  exit code 2, nothing written to the workdir."""
  args, said = _bad_data(tmp_path, case)
  code, out, err = run('train.py', *args, '--workdir', str(tmp_path / 'run'))
  assert code == 2 and out == '' and len(err) == 1, err
  for part in (said,) if isinstance(said, str) else said:
    assert part in err[0], err
  assert err[0].startswith('error: ')
  assert not (tmp_path / 'run').exists()


def test_search_refuses_an_output_directory_it_cannot_write(tmp_path):
  (tmp_path / 'config.json').write_text(bbc_minilm_glora.get_config().to_json())
  (tmp_path / 'a_file').write_text('')
  code, out, err = run('search.py', '--ckpt', str(tmp_path), '--out', str(tmp_path / 'a_file' / 'x'))
  assert code == 2 and out == ''
  assert err == [f"error: output directory {tmp_path / 'a_file' / 'x'}: {tmp_path / 'a_file'} is a "
                 'file; expected a directory (or a path that can be created)']
  assert sorted(p.name for p in tmp_path.iterdir()) == ['a_file', 'config.json']
