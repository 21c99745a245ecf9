"""Tests for configs/: each config's argument through configs.common.parse_arg (the
spellings the README names, typed key=value items, refusals naming what is accepted)."""
import importlib

import pytest

from configs.common import parse_arg

BBC = ['bbc_minilm_full', 'bbc_minilm_glora', 'bbc_minilm_linear_probe', 'bbc_minilm_lora',
       'bbc_minilm_surm']


@pytest.mark.parametrize('name', BBC)
def test_bbc_configs_take_the_8shot_setting(name):
  get = importlib.import_module(f'configs.{name}').get_config
  assert (get().data.train_split, get().num_epochs) == ('train', 5)
  assert get(None).to_dict() == get('').to_dict() == get('full').to_dict() == get().to_dict()
  for arg in ('8shot', 'setting=8shot'):
    assert (get(arg).data.train_split, get(arg).num_epochs) == ('train_8shot', 20)
    assert get(arg).method == get().method
  with pytest.raises(ValueError, match=f"unknown argument 'nosuch' for {name}; use 8shot"):
    get('nosuch')


def test_glora_quick_and_both():
  from configs import bbc_minilm_glora
  quick = bbc_minilm_glora.get_config('quick')
  assert (quick.num_epochs, quick.data.max_len, quick.data.train_split) == (2, 64, 'train')
  both = bbc_minilm_glora.get_config('8shot,quick')
  assert (both.num_epochs, both.data.max_len, both.data.train_split) == (2, 64, 'train_8shot')


def test_free_value_configs():
  from configs import llama_glora, tiny_bbc_glora, tiny_mnist_vit_glora, vtab1k_vit_b16_glora
  assert tiny_bbc_glora.get_config('lora').method == 'lora'
  assert tiny_mnist_vit_glora.get_config().method == 'glora'
  assert vtab1k_vit_b16_glora.get_config('dtd').data.name == 'vtab/dtd'
  assert vtab1k_vit_b16_glora.get_config().data.name == 'vtab/cifar100'
  assert llama_glora.get_config('tiny').model.hidden == 64
  assert llama_glora.get_config().model.hidden == 256
  with pytest.raises(ValueError, match="unknown argument 'big' for llama_glora; use tiny"):
    llama_glora.get_config('big')


def test_parse_arg_types_and_refusals():
  arg = parse_arg('n=3,x=0.5,name=a,on', 'x/f.py', n=1, x=0.1, name='b', on=False, off=True)
  assert arg.to_dict() == {'n': 3, 'x': 0.5, 'name': 'a', 'on': True, 'off': True}
  assert parse_arg('off=false', 'f.py', off=True).off is False
  assert parse_arg('c', 'f.py', size=('a', 'b', 'c')).size == 'c'
  for bad in ('n=abc', 'm=1', 'on=maybe'):
    with pytest.raises(ValueError, match=f"unknown argument '{bad}' for f; use on .options: n, on."):
      parse_arg(bad, 'x/f.py', n=1, on=False)


def test_glue_and_fewshot_configs():
  from configs import fewshot_fgvc, glue
  rte = glue.get_config('task=rte,method=lora')
  assert (rte.data.name, rte.data.test_split, rte.num_epochs, rte.optim.lr) == (
      'glue/rte', 'validation', 80, 5e-4)
  assert glue.get_config('task=mnli').data.test_split == 'validation_matched'
  pets = fewshot_fgvc.get_config('dataset=oxford_iiit_pet,shots=4,seed=2')
  assert (pets.data.name, pets.data.shots, pets.data.shots_seed, pets.data.image_size) == (
      'tfds:oxford_iiit_pet', 4, 2, 224)
  with pytest.raises(ValueError, match=r'shots=3: the table has k in \(1, 2, 4, 8, 16\)'):
    fewshot_fgvc.get_config('shots=3')
