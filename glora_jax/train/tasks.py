"""From a config to a model, its parameters, its data and its loss: the only place
where the generic training loop meets specific models and datasets.
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from glora_jax import peft
from glora_jax.train import steps

KNOWN_TASKS = ('text_classification', 'image_classification', 'causal_lm')


@dataclasses.dataclass
class ModelAndData:
  """A model with its params, loss and data. `splits` ({'train', 'eval', 'test'} ->
  arrays or a random-access source) are read on first use, after the cheap checks
  of adapters and config have passed.

  The task's accuracy is its loss's correct / count: `metric` names it and
  `predictions` says which predictions it counts; `forward_with(other model)` is
  forward_loss.forward for another model of the same inputs (the merged plain model)."""
  model: Any
  params: dict  # full model params: pretrained backbone + fresh head
  forward_loss: steps.ForwardLoss
  forward_with: Callable[[Any], Callable[..., Any]]
  predictions: Callable[[Any, dict], tuple[jax.Array, jax.Array]]  # (outputs, batch) -> (preds, weights)
  metric: str
  partition_rules: list
  load_splits: Any  # () -> dict of splits
  default_targets: str
  head_pattern: str | None  # trainable with the adapters; None: no task head
  metadata: dict

  @functools.cached_property
  def splits(self) -> dict:
    return self.load_splits()


def _dtype(name: str):
  try:
    return jnp.dtype(name)
  except TypeError:
    raise ValueError(f"unknown dtype '{name}'; use float32 or bfloat16") from None


def classification_predictions(logits, batch):
  """The predicted class of every example; padding rows (batch['mask'] 0) weigh 0."""
  return jnp.argmax(logits, -1), batch.get('mask', jnp.ones(logits.shape[0], jnp.float32))


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


def text_classification(config) -> ModelAndData:
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

  data.splits(dc.name)  # an unknown dataset fails here, before anything is loaded

  def load_splits():
    splits = {}
    for role in ('train', 'eval', 'test'):
      split = dc.get(f'{role}_split', '')
      if split:
        arrays, _ = data.load_text_classification(
            dc.name, split, tokenizer_path=bundled.minilm_tokenizer_path(), max_len=dc.max_len,
            data_dir=dc.get('data_dir') or None)
        limit = dc.get('limit', 0)
        splits[role] = {k: v[:limit] for k, v in arrays.items()} if limit else arrays
    return splits

  num_classes = data.num_classes(dc.name)
  bert_config = dataclasses.replace(bert_config, remat=mc.get('remat', 'none'))
  model = bert.BertClassifier(bert_config, num_classes)
  key = jax.random.key(config.seed)
  if backbone is None:
    ids = jnp.zeros((1, dc.max_len), jnp.int32)
    params = model.init(key, ids, ids)['params']
  else:
    params = bert.add_head(backbone, bert_config, num_classes, key)
  return ModelAndData(model=model, params=params,
                      forward_loss=steps.ForwardLoss(_bert_forward(model), steps.classification_loss),
                      forward_with=_bert_forward, predictions=classification_predictions,
                      metric='accuracy', partition_rules=bert.partition_rules(), load_splits=load_splits,
                      default_targets=bert.DEFAULT_TARGETS, head_pattern=r'head/.*',
                      metadata={'num_classes': num_classes})


def _image_splits(dc) -> dict:
  """{role: source} for an image dataset. mnist5k is bundled (uint8 arrays,
  normalised in the forward pass); VTAB tasks read a prepared data_dir and come
  preprocessed (224 bicubic, ImageNet mean/std)."""
  from glora_jax import data
  data_dir = dc.get('data_dir') or None
  splits = {}
  for role in ('train', 'eval', 'test'):
    split = dc.get(f'{role}_split', '')
    if not split:
      continue
    if dc.name == 'mnist5k':
      arrays = data.load_arrays(dc.name, split, data_dir)
      arrays = {'image': arrays['image'], 'label': arrays['label'].astype(np.int32)}
      limit = dc.get('limit', 0)
      splits[role] = {k: v[:limit] for k, v in arrays.items()} if limit else arrays
    else:
      splits[role] = data.load_source(dc.name, split, data_dir)
  return splits


def _vit_forward(model):
  def forward(params, adapters, subnet, batch, train, rng):
    images = batch['image']
    if images.dtype == jnp.uint8:  # bundled digits: scale to [0, 1] and standardise
      images = (images.astype(jnp.float32) / 255.0 - 0.5) / 0.5
    kwargs = dict(deterministic=not train)
    if train and rng is not None:
      kwargs['rngs'] = {'dropout': rng}
    if adapters is None:
      return model.apply({'params': params}, images, **kwargs)
    return peft.forward(model, params, adapters, subnet, images, **kwargs)
  return forward


def image_classification(config) -> ModelAndData:
  from glora_jax.models import vit

  from glora_jax import data

  mc, dc = config.model, config.data
  num_classes = data.num_classes(dc.name)  # an unknown dataset fails here
  # Sources are random-access and lazy, so open them now: an unprepared VTAB
  # data_dir fails before the (slow) model initialisation.
  splits = _image_splits(dc)
  # model.depth (0: the preset's) shortens a randomly initialised ViT for tests;
  # a checkpoint must have that many blocks.
  depth = {'depth': mc.depth} if mc.get('depth', 0) else {}
  cfg = vit.preset(mc.preset, image_size=mc.image_size, num_classes=num_classes,
                   in_channels=mc.get('in_channels', 3), drop_path_rate=mc.get('drop_path', 0.0),
                   representation_size=mc.get('representation_size', 0) or None,
                   remat=mc.get('remat', 'none'), attention=mc.get('attention', 'xla'), **depth)
  model = vit.VisionTransformer(cfg)
  if mc.get('checkpoint', ''):
    path = str(mc.checkpoint)
    load = vit.load_npz if path.endswith('.npz') else vit.load_timm
    ignore = [] if cfg.representation_size else ['pre_logits/.*']
    params = vit.add_head(load(path, cfg, ignore=ignore), cfg)
  else:  # random init (tests, or training from scratch)
    params = model.init(jax.random.key(config.seed),
                        jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.in_channels)))['params']

  return ModelAndData(model=model, params=params,
                      forward_loss=steps.ForwardLoss(_vit_forward(model), steps.classification_loss),
                      forward_with=_vit_forward, predictions=classification_predictions,
                      metric='accuracy', partition_rules=vit.partition_rules(), load_splits=lambda: splits,
                      default_targets=vit.DEFAULT_TARGETS, head_pattern=r'head/.*',
                      metadata={'num_classes': num_classes})


def lm_predictions(logits, batch):
  """(batch, seq - 1) next-token predictions (logits[:, t] predicts token t + 1) and
  their weights: 1 where that token is real (attention_mask) in a real row (batch['mask'])."""
  weights = batch['attention_mask'][:, 1:].astype(jnp.float32)
  if 'mask' in batch:
    weights = weights * batch['mask'][:, None].astype(jnp.float32)
  return jnp.argmax(logits[:, :-1], -1), weights


def lm_loss(logits, batch):
  """Next-token cross-entropy summed over the tokens `lm_predictions` weighs:
  (sum, number of predicted tokens, correct tokens). Its mean (sum / number)
  equals Hugging Face's loss with labels = input_ids where attention_mask else -100."""
  targets = batch['input_ids'][:, 1:]
  preds, weights = lm_predictions(logits, batch)
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
  nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
  correct = (preds == targets).astype(jnp.float32)
  return jnp.sum(nll * weights), jnp.sum(weights), jnp.sum(correct * weights)


def _llama_forward(model):
  def forward(params, adapters, subnet, batch, train, rng):
    del train, rng  # no dropout in this decoder
    args = (batch['input_ids'], batch['attention_mask'])
    if adapters is None:
      return model.apply({'params': params}, *args)
    return peft.forward(model, params, adapters, subnet, *args)
  return forward


def causal_lm(config) -> ModelAndData:
  """A LLaMA decoder trained with the causal-LM loss. Without a checkpoint, a
  small random LLaMA on the bundled BBC News texts (MiniLM's tokenizer)."""
  from glora_jax import bundled, data
  from glora_jax.models import llama

  mc, dc = config.model, config.data
  if mc.get('checkpoint', ''):
    cfg, params = llama.load_llama(mc.checkpoint, dtype=_dtype(mc.get('param_dtype', 'float32')))
    tokenizer = pathlib.Path(mc.checkpoint) / 'tokenizer.json'
  else:
    tokenizer = bundled.minilm_tokenizer_path()
    cfg = llama.LlamaConfig(vocab_size=30522, hidden_size=mc.hidden, intermediate_size=mc.intermediate,
                            num_hidden_layers=mc.layers, num_attention_heads=mc.heads,
                            num_key_value_heads=mc.kv_heads, max_position_embeddings=max(512, dc.max_len))
    params = None
  cfg = dataclasses.replace(cfg, remat=mc.get('remat', 'none'), attention=mc.get('attention', 'xla'))
  model = llama.LlamaForCausalLM(cfg)
  if params is None:
    params = model.init(jax.random.key(config.seed), jnp.zeros((1, 8), jnp.int32))['params']
  data.splits(dc.name)

  def load_splits():
    splits = {}
    for role in ('train', 'eval', 'test'):
      split = dc.get(f'{role}_split', '')
      if split:
        arrays, _ = data.load_text_classification(dc.name, split, tokenizer_path=tokenizer,
                                                  max_len=dc.max_len, data_dir=dc.get('data_dir') or None)
        arrays = {k: arrays[k] for k in ('input_ids', 'attention_mask')}
        limit = dc.get('limit', 0)
        splits[role] = {k: v[:limit] for k, v in arrays.items()} if limit else arrays
    return splits

  # Every parameter but the adapters is frozen for LLaMA (no task head).
  return ModelAndData(model=model, params=params,
                      forward_loss=steps.ForwardLoss(_llama_forward(model), lm_loss),
                      forward_with=_llama_forward, predictions=lm_predictions,
                      metric='next_token_accuracy', partition_rules=llama.partition_rules(),
                      load_splits=load_splits,
                      default_targets=llama.DEFAULT_TARGETS, head_pattern=None,
                      metadata={'vocab_size': cfg.vocab_size})


BUILDERS = {'text_classification': text_classification,
            'image_classification': image_classification, 'causal_lm': causal_lm}


def build(config) -> ModelAndData:
  if config.task not in BUILDERS:
    raise ValueError(f"unknown task '{config.task}'; known: {sorted(BUILDERS)}")
  return BUILDERS[config.task](config)
