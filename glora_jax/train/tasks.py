"""From a config to a model, its parameters, its data and its loss: the only place
where the generic training loop meets specific models and datasets.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from glora_jax import peft
from glora_jax.train import steps

KNOWN_TASKS = ('text_classification', 'image_classification', 'causal_lm')


@dataclasses.dataclass
class Bundle:
  model: Any
  params: dict  # full model params: pretrained backbone + fresh head
  task: steps.Task
  partition_rules: list
  splits: dict[str, dict[str, np.ndarray]]  # name -> arrays with a leading example axis
  default_targets: str
  head_pattern: str
  metadata: dict
  plain_model: Callable[[dict], Any] | None = None  # the model for merged params


def _dtype(name: str):
  try:
    return jnp.dtype(name)
  except TypeError:
    raise ValueError(f"unknown dtype '{name}'; use float32 or bfloat16") from None


def _bert_forward(model):
  def forward(params, adapters, subnet, batch, train, rng):
    kwargs = dict(deterministic=not train)
    if train and rng is not None:
      kwargs['rngs'] = {'dropout': rng}
    args = (batch['input_ids'], batch['attention_mask'], batch.get('token_type_ids'))
    if adapters is None:
      return model.apply({'params': params}, *args, **kwargs)
    return peft.forward(model, params, adapters, subnet, *args, **kwargs)
  return forward


def text_classification(config) -> Bundle:
  from glora_jax import bundled, data
  from glora_jax.models import bert

  mc, dc = config.model, config.data
  if mc.name == 'minilm':
    bert_config, backbone = bert.load_minilm(dtype=_dtype(mc.get('param_dtype', 'float32')))
    if mc.get('layers', 0):  # keep the first `layers` pretrained layers (small test models)
      bert_config = dataclasses.replace(bert_config, num_hidden_layers=mc.layers)
      backbone = dict(backbone, encoder={f'layer_{i}': backbone['encoder'][f'layer_{i}']
                                         for i in range(mc.layers)})
    if mc.get('dropout', None) is not None:
      bert_config = dataclasses.replace(bert_config, hidden_dropout_prob=mc.dropout,
                                        attention_probs_dropout_prob=mc.dropout)
  elif mc.name == 'bert_random':  # a small randomly initialised BERT for tests
    bert_config = bert.BertConfig(hidden_size=mc.hidden, num_hidden_layers=mc.layers,
                                  num_attention_heads=mc.heads, intermediate_size=4 * mc.hidden,
                                  max_position_embeddings=max(512, dc.max_len))
    backbone = None
  else:
    raise ValueError(f"unknown text model '{mc.name}'; known: minilm, bert_random")

  splits, meta = {}, {}
  for role in ('train', 'eval', 'test'):
    split = dc.get(f'{role}_split', '')
    if split:
      arrays, meta = data.load_text_classification(
          dc.name, split, tokenizer_path=bundled.minilm_tokenizer_path(), max_len=dc.max_len,
          data_dir=dc.get('data_dir') or None)
      limit = dc.get('limit', 0)
      splits[role] = {k: v[:limit] for k, v in arrays.items()} if limit else arrays
  num_classes = len(meta['class_names'])
  model = bert.BertClassifier(bert_config, num_classes)
  key = jax.random.key(config.seed)
  if backbone is None:
    ids = jnp.zeros((1, dc.max_len), jnp.int32)
    params = model.init(key, ids, ids)['params']
  else:
    params = bert.add_head(backbone, bert_config, num_classes, key)
  return Bundle(model=model, params=params, task=steps.Task(_bert_forward(model), steps.classification_loss),
                partition_rules=bert.partition_rules(), splits=splits,
                default_targets=bert.DEFAULT_TARGETS, head_pattern=r'head/.*',
                metadata={'class_names': list(meta['class_names']), 'num_classes': num_classes})


BUILDERS = {'text_classification': text_classification}


def build(config) -> Bundle:
  if config.task not in BUILDERS:
    raise ValueError(f"unknown task '{config.task}'; known: {sorted(BUILDERS)}")
  return BUILDERS[config.task](config)
