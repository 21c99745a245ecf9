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
from glora_jax.models import importers, registry
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
  family: registry.Family
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


def make_forward(family: registry.Family, model):
  """forward(params, adapters, subnet, batch, train, rng) -> model outputs, for any
  family: its `inputs` pick the module's inputs from the batch; adapters (None: the
  plain model) enter through peft's interception point; rng feeds dropout."""
  def forward(params, adapters, subnet, batch, train, rng):
    args, kwargs = family.inputs(batch)
    kwargs = dict(kwargs, deterministic=not train)
    if train and rng is not None:
      kwargs['rngs'] = {'dropout': rng}
    if adapters is None:
      return model.apply({'params': params}, *args, **kwargs)
    return peft.forward(model, params, adapters, subnet, *args, **kwargs)
  return forward


def build_model(config, num_classes: int) -> tuple[registry.Family, Any, dict]:
  """(family, module, params) of a run's config.model: a checkpoint directory
  (model.checkpoint, or a bundled one named by model.name), whose config.json names its
  family, or a random init of the family model.name names. A classifier gets a fresh
  head of `num_classes` (a checkpoint's own head is not kept). config.model options:
  keep_layers (a checkpoint's first blocks), dropout, and the execution fields (remat,
  attention, attention_chunk) of families that have them."""
  mc = config.model
  dtype = _dtype(mc.get('param_dtype', 'float32'))
  if mc.get('checkpoint', '') and not pathlib.Path(mc.checkpoint).exists():
    raise ValueError(f'checkpoint {mc.checkpoint} does not exist')
  directory = registry.checkpoint_dir(mc)
  if directory is not None:
    model, params = registry.load(directory, dtype)
    family = registry.of_model(model)  # the checkpoint's config.json names it, not model.name
    params = {k: v for k, v in params.items() if k != 'head'}
    if mc.get('keep_layers', 0):
      model, params = registry.keep_layers(family, model, params, mc.keep_layers)
  else:
    family = registry.get(mc.name)
    model = family.with_classes(dataclasses.replace(
        family.new_config(mc, config.data.get('max_len', 0)), dtype=dtype), 0)
    params = None
    if mc.get('checkpoint', ''):  # a weights file, not a directory (family.load_file)
      params = registry.load_file(family, mc.checkpoint, model.config, dtype)
  if family.task != config.task:
    raise ValueError(f"model family '{family.name}' serves {family.task}; task is {config.task}")
  options = {f: mc[f] for f in registry.EXECUTION_FIELDS if f in mc
             and f in {x.name for x in dataclasses.fields(model.config)}}
  if mc.get('dropout', None) is not None:
    options.update({f: mc.dropout for f in family.dropout_fields})
  model = family.with_classes(dataclasses.replace(model.config, **options), num_classes)
  if params is None:
    params = importers.cast(registry.init_params(model, config.seed), dtype)
  elif num_classes:
    params = {**params, 'head': family.init_head(model, jax.random.key(config.seed))}
  return family, model, params


def _first(arrays: dict, limit: int) -> dict:
  """The first `limit` examples of each array (limit 0: all), for small test runs."""
  return {k: v[:limit] for k, v in arrays.items()} if limit else arrays


def _tokenized_splits(config, fields: tuple[str, ...]):
  """() -> {role: arrays} of a text dataset, tokenised by the checkpoint's tokenizer."""
  from glora_jax import data
  dc = config.data
  tokenizer = registry.tokenizer_path(config.model)

  def load_splits():
    splits = {}
    for role in ('train', 'eval', 'test'):
      split = dc.get(f'{role}_split', '')
      if split:
        arrays, _ = data.load_text_classification(dc.name, split, tokenizer_path=tokenizer,
                                                  max_len=dc.max_len,
                                                  data_dir=dc.get('data_dir') or None)
        splits[role] = _first({k: arrays[k] for k in fields}, dc.get('limit', 0))
    return splits
  return load_splits


def _model_and_data(family, model, params, loss, predictions, metric, load_splits,
                    head_pattern, metadata) -> ModelAndData:
  return ModelAndData(model=model, params=params, family=family,
                      forward_loss=steps.ForwardLoss(make_forward(family, model), loss),
                      forward_with=functools.partial(make_forward, family),
                      predictions=predictions, metric=metric,
                      partition_rules=family.partition_rules(), load_splits=load_splits,
                      default_targets=family.default_targets, head_pattern=head_pattern,
                      metadata=metadata)


def text_classification(config) -> ModelAndData:
  from glora_jax import data
  data.splits(config.data.name)  # an unknown dataset fails here, before anything is loaded
  num_classes = data.num_classes(config.data.name)
  family, model, params = build_model(config, num_classes)
  load_splits = _tokenized_splits(
      config, ('input_ids', 'attention_mask', 'token_type_ids', 'label'))
  return _model_and_data(family, model, params, steps.classification_loss,
                         classification_predictions, 'accuracy', load_splits, r'head/.*',
                         {'num_classes': num_classes})


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
      splits[role] = _first({'image': arrays['image'], 'label': arrays['label'].astype(np.int32)},
                            dc.get('limit', 0))
    else:
      splits[role] = data.load_source(dc.name, split, data_dir)
  return splits


def image_classification(config) -> ModelAndData:
  from glora_jax import data
  num_classes = data.num_classes(config.data.name)  # an unknown dataset fails here
  # Sources are random-access and lazy, so open them now: an unprepared VTAB
  # data_dir fails before the (slow) model initialisation.
  splits = _image_splits(config.data)
  family, model, params = build_model(config, num_classes)
  return _model_and_data(family, model, params, steps.classification_loss,
                         classification_predictions, 'accuracy', lambda: splits, r'head/.*',
                         {'num_classes': num_classes})


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


def causal_lm(config) -> ModelAndData:
  """A decoder trained with the causal-LM loss: a checkpoint with its own tokenizer, or a
  small random one on the bundled BBC News texts (MiniLM's tokenizer)."""
  from glora_jax import data
  data.splits(config.data.name)
  family, model, params = build_model(config, 0)
  load_splits = _tokenized_splits(config, ('input_ids', 'attention_mask'))
  # Every parameter but the adapters is frozen (no task head).
  return _model_and_data(family, model, params, lm_loss, lm_predictions,
                         'next_token_accuracy', load_splits, None,
                         {'vocab_size': model.config.vocab_size})


BUILDERS = {'text_classification': text_classification,
            'image_classification': image_classification, 'causal_lm': causal_lm}


def build(config) -> ModelAndData:
  if config.task not in BUILDERS:
    raise ValueError(f"unknown task '{config.task}'; known: {sorted(BUILDERS)}")
  return BUILDERS[config.task](config)
