"""From a config to a model, its parameters, its data and its loss: the only place
where the generic training loop meets specific models and datasets.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp

from glora_jax import metrics as task_metrics
from glora_jax import peft
from glora_jax.errors import DataError
from glora_jax.models import importers, registry
from glora_jax.train import steps, xent

KNOWN_TASKS = ('text_classification', 'image_classification', 'causal_lm')


@dataclasses.dataclass
class ModelAndData:
  """A model with its params, loss and data. `splits` ({'train', 'eval', 'test'} ->
  arrays or a random-access source) are read on first use, after the cheap checks
  of adapters and config have passed.

  `metrics` name what the task is scored by, the headline (the search's fitness)
  first: with `scored`, glora_jax.metrics' functions of the per-example
  `predictions` and the labels over a whole split; otherwise (a causal LM) the
  loss's correct / count. `forward_with(other model)` is forward_loss.forward for
  another model of the same inputs (the merged plain model)."""
  model: Any
  params: dict  # full model params: pretrained backbone + fresh head
  family: registry.Family
  forward_loss: steps.ForwardLoss
  forward_with: Callable[[Any], Callable[..., Any]]
  predictions: Callable[[Any, dict], tuple[jax.Array, jax.Array]]  # (outputs, batch) -> (preds, weights)
  metrics: tuple[str, ...]
  scored: bool  # metrics of predictions and labels; False: of the loss's sums
  partition_rules: list
  load_splits: Any  # () -> dict of splits
  default_targets: str
  head_pattern: str | None  # trainable with the adapters; None: no task head
  metadata: dict

  @functools.cached_property
  def splits(self) -> dict:
    return self.load_splits()

  @property
  def metric(self) -> str:
    """The headline metric: the search's fitness, the summary's val_metric."""
    return self.metrics[0]

  def score(self, sums, preds=None, targets=None) -> dict[str, float]:
    """Each metric of a whole split: of its (loss, count, correct) sums, or (scored)
    of the predictions and labels of its real examples, in order."""
    if not self.scored:
      return lm_scores(sums)
    return task_metrics.compute(self.metrics, preds, targets)


def _dtype(name: str):
  try:
    return jnp.dtype(name)
  except TypeError:
    raise ValueError(f"unknown dtype '{name}'; use float32 or bfloat16") from None


def classification_predictions(logits, batch):
  """The predicted class of every example; padding rows (batch['mask'] 0) weigh 0."""
  return jnp.argmax(logits, -1), batch.get('mask', jnp.ones(logits.shape[0], jnp.float32))


def make_forward(family: registry.Family, model, method: str | None = None):
  """forward(params, adapters, subnet, batch, train, rng) -> model outputs, for any
  family: its `inputs` pick the module's inputs from the batch; adapters (None: the
  plain model) and quantized frozen kernels enter through peft's interception point;
  rng feeds dropout. `method`:
  another of the module's methods than __call__ (a decoder's 'hidden_states')."""
  def forward(params, adapters, subnet, batch, train, rng):
    args, kwargs = family.inputs(batch)
    kwargs = dict(kwargs, deterministic=not train)
    if method is not None:
      kwargs['method'] = method
    if train and rng is not None:
      kwargs['rngs'] = {'dropout': rng}
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


def _tokenized(config, task_data, fields: tuple[str, ...]):
  """() -> {role: arrays} of a text task: texts (and sentence pairs, encoded as the
  tokenizer's template says) tokenised by the checkpoint's own tokenizer.json."""
  from glora_jax.data import text
  tokenizer = registry.tokenizer_path(config.model)
  max_len = config.data.max_len

  def load_splits():
    splits = {}
    for role, columns in task_data.splits.items():
      arrays = text.tokenize(columns['text'], tokenizer, max_len, pairs=columns.get('text_pair'))
      arrays['label'] = columns['label']
      splits[role] = {k: arrays[k] for k in fields}
    return splits
  return load_splits


def _check_max_len(model, max_len: int) -> None:
  """A max_len past the model's positions fails before any text is tokenised."""
  positions = getattr(model.config, 'max_tokens', None) or getattr(
      model.config, 'max_position_embeddings', None)
  if positions and max_len > positions:
    raise ValueError(f'data.max_len={max_len} is more than the {positions} positions of the model; '
                     f'expected data.max_len <= {positions}')


def _model_and_data(family, model, params, loss, predictions, metrics, load_splits,
                    head_pattern, metadata, scored: bool = True) -> ModelAndData:
  return ModelAndData(model=model, params=params, family=family,
                      forward_loss=steps.ForwardLoss(make_forward(family, model), loss),
                      forward_with=functools.partial(make_forward, family),
                      predictions=predictions, metrics=tuple(metrics), scored=scored,
                      partition_rules=family.partition_rules(), load_splits=load_splits,
                      default_targets=family.default_targets, head_pattern=head_pattern,
                      metadata=metadata)


def regression_predictions(outputs, batch):
  """The one-output head's value of every example; padding rows weigh 0."""
  return outputs[:, 0], batch.get('mask', jnp.ones(outputs.shape[0], jnp.float32))


def regression_loss(outputs, batch):
  """Squared error of the one-output head, summed over real rows: (sum, count, 0).
  Its mean is Hugging Face's loss for num_labels == 1 (MSELoss)."""
  preds, mask = regression_predictions(outputs, batch)
  err = (preds.astype(jnp.float32) - batch['label'].astype(jnp.float32)) ** 2
  mask = mask.astype(jnp.float32)
  return jnp.sum(err * mask), jnp.sum(mask), jnp.zeros((), jnp.float32)


def _supervised(config, modality: str, fields: tuple[str, ...]) -> ModelAndData:
  """A classifier (or a one-output regressor) of the data config.data names."""
  from glora_jax.data import task_data as task_data_lib
  data = task_data_lib.open_task(config.data)
  if data.modality != modality:
    raise ValueError(f"dataset '{config.data.name}' holds {data.modality}s; task "
                     f'{config.task} needs {modality}s')
  family, model, params = build_model(config, data.num_classes)
  if modality == 'text':
    _check_max_len(model, config.data.max_len)
    load_splits = _tokenized(config, data, fields)
  else:
    load_splits = lambda: data.splits
  loss, predictions = ((regression_loss, regression_predictions) if data.kind == 'regression'
                       else (steps.classification_loss, classification_predictions))
  return _model_and_data(family, model, params, loss, predictions, data.metrics, load_splits,
                         r'head/.*', {'num_classes': data.num_classes, 'data': data.record})


def text_classification(config) -> ModelAndData:
  """Text classification or regression (data.metrics' first metric the headline)."""
  return _supervised(config, 'text', ('input_ids', 'attention_mask', 'token_type_ids', 'label'))


def image_classification(config) -> ModelAndData:
  """An image classifier; sources stay lazy, so an unprepared data_dir fails before
  the (slow) model initialisation."""
  return _supervised(config, 'image', ('image', 'label'))


def _lm_weights(batch):
  """(batch, seq - 1) weight of each next-token target: the data's loss_weights (responses
  only, packed rows) or, without them, every real token (attention_mask), in real rows."""
  if 'loss_weights' in batch:
    weights = batch['loss_weights'][:, 1:].astype(jnp.float32)
  else:
    weights = batch['attention_mask'][:, 1:].astype(jnp.float32)
  if 'mask' in batch:
    weights = weights * batch['mask'][:, None].astype(jnp.float32)
  return weights


def lm_predictions(logits, batch):
  """(batch, seq - 1) next-token predictions (logits[:, t] predicts token t + 1) and
  their weights (`_lm_weights`)."""
  return jnp.argmax(logits[:, :-1], -1), _lm_weights(batch)


def lm_loss(logits, batch):
  """Next-token cross-entropy summed over the tokens `lm_predictions` weighs:
  (sum, number of predicted tokens, correct tokens). Its mean (sum / number)
  equals Hugging Face's loss with labels = input_ids where the weight is 1, else -100."""
  targets = batch['input_ids'][:, 1:]
  preds, weights = lm_predictions(logits, batch)
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
  nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
  correct = (preds == targets).astype(jnp.float32)
  return jnp.sum(nll * weights), jnp.sum(weights), jnp.sum(correct * weights)


def head_kernel(params):
  """A decoder's output kernel (hidden, vocab): lm_head's, or the tied embedding's transpose."""
  inner, _ = peft.unwrap(params)
  if 'lm_head' in inner:
    return inner['lm_head']['kernel']
  return inner['embed_tokens']['embedding'].T


def chunked_lm(family: registry.Family, chunk: int):
  """(forward builder, loss, predictions) of the causal-LM loss over `chunk` tokens'
  logits at a time (train/xent.py): the forward gives (final hidden states, head
  kernel) instead of logits, so no step holds the whole (batch, seq, vocab) logits. The
  same sums as lm_loss to float rounding; predictions (only the export's agreement check
  reads them) build full logits."""
  def forward_with(model):
    hidden = make_forward(family, model, method='hidden_states')
    return lambda params, *args: (hidden(params, *args), head_kernel(params))

  def loss(outputs, batch):
    hidden, kernel = outputs
    return xent.chunked_xent(hidden[:, :-1], kernel, batch['input_ids'][:, 1:], _lm_weights(batch),
                             chunk=chunk)

  def predictions(outputs, batch):
    hidden, kernel = outputs
    return jnp.argmax(xent.head_logits(hidden[:, :-1], kernel), -1), _lm_weights(batch)
  return forward_with, loss, predictions


# A causal LM's metrics, all of its loss sums over the target tokens (responses only
# unless data.train_on_prompt); the first is the headline (the search's fitness) and must
# grow with quality: perplexity is reported, never ranked by.
LM_METRICS = ('token_log_likelihood', 'next_token_accuracy', 'perplexity')
LM_HEADLINES = LM_METRICS[:2]


def lm_scores(sums) -> dict[str, float]:
  """A causal LM's metrics from (loss sum, target tokens, correct) over a split:
  mean log-likelihood per target token (minus the mean loss), next-token accuracy and
  perplexity (exp of the mean loss)."""
  loss = float(sums[0]) / max(float(sums[1]), 1.0)
  return {'token_log_likelihood': -loss, 'next_token_accuracy': float(sums[2]) / max(float(sums[1]), 1.0),
          'perplexity': math.exp(min(loss, 700.0))}


def _lm_metrics(requested) -> tuple[str, ...]:
  """data.metrics for a causal LM: a headline from LM_HEADLINES first, the rest after."""
  requested = tuple(requested or ())
  unknown = [m for m in requested if m not in LM_METRICS]
  if unknown:
    raise ValueError(f'data.metrics {list(unknown)} are not causal-LM metrics; expected some of '
                     f'{list(LM_METRICS)}')
  if requested and requested[0] not in LM_HEADLINES:
    raise ValueError(f"data.metrics puts '{requested[0]}' first, but the headline is ranked by "
                     f'(higher is better); expected one of {list(LM_HEADLINES)} first')
  return requested + tuple(m for m in LM_METRICS if m not in requested)


def _lm_records(dc) -> dict[str, list]:
  """{role: [(origin, record)]} of a causal LM's data: the files of data.name 'json' /
  'csv' (an eval split carved off train by data.val_fraction when none is named), or the
  texts of any text dataset open_task reads (data.format 'text' only); data.limit keeps
  the first records of each split."""
  from glora_jax.data import lm_data, task_data as task_data_lib
  fmt = dc.get('format', 'text') or 'text'
  if dc.name in ('json', 'csv'):
    wanted = {role: dc.get(f'{role}_split', '') for role in task_data_lib.ROLES
              if dc.get(f'{role}_split', '')}
    if 'train' not in wanted:
      raise DataError(f"data.name '{dc.name}' reads files: data.train_split names them (a file "
                      'or a glob)')
    splits = {role: lm_data.read_split(path, dc.name) for role, path in wanted.items()}
    fraction = dc.get('val_fraction', 0.0)
    if fraction:
      if 'eval' in splits:
        raise DataError(f'data.val_fraction={fraction} carves an eval split off train, but '
                        f"data.eval_split='{dc.eval_split}' names one; set one of them")
      splits['train'], splits['eval'] = lm_data.carve(splits['train'], fraction,
                                                      dc.get('val_seed', 0))
  else:
    if fmt != 'text':
      raise DataError(f"data.format '{fmt}' reads records with its own fields from files; "
                      f"data.name '{dc.name}' gives texts only: use data.name='json' (or "
                      "'csv') with data.train_split, or data.format='text'")
    data = task_data_lib.open_task(dc)
    return {role: [(f'{dc.name}:{role}[{i}]', {'text': str(t)})
                   for i, t in enumerate(columns['text'])]
            for role, columns in data.splits.items()}
  if dc.get('limit', 0):
    splits = {role: records[:dc.limit] for role, records in splits.items()}
  return splits


def _lm_splits(config, record: dict):
  """() -> {role: rows} of a causal LM: rendered in data.format, tokenised with the
  checkpoint's tokenizer, cut to max_len, packed with data.packing (train only: eval
  and test keep one example per row, so their losses are per example as written).
  Each split's report (truncated, dropped, real / padded tokens) goes into `record`."""
  from glora_jax.data import lm_data
  dc = config.data
  tokenizer = registry.tokenizer_path(config.model)
  renderer = lm_data.Renderer(dc.get('format', 'text') or 'text', tokenizer.parent,
                              text_key=dc.get('text_key') or 'text',
                              train_on_prompt=dc.get('train_on_prompt', False))
  records = _lm_records(dc)

  def load_splits():
    splits = {}
    for role, items in records.items():
      rows, report = lm_data.build_rows(items, renderer, tokenizer, dc.max_len,
                                        packing=dc.get('packing', False) and role == 'train')
      splits[role], record.setdefault('tokens', {})[role] = rows, report
      print(f'data {role}: ' + lm_data.describe(report), flush=True)
    return splits
  return load_splits


def causal_lm(config) -> ModelAndData:
  """A decoder trained with the causal-LM loss on data.format 'text', 'alpaca' or 'chat'
  (lm_data): a checkpoint with its own tokenizer, or a small random one on the bundled
  BBC News texts (MiniLM's tokenizer)."""
  dc = config.data
  metrics = _lm_metrics(dc.get('metrics', ()))
  record = {'format': dc.get('format', 'text') or 'text', 'packing': dc.get('packing', False),
            'train_on_prompt': dc.get('train_on_prompt', False), 'metrics': list(metrics)}
  load_splits = _lm_splits(config, record)  # the records are read (and checked) here
  family, model, params = build_model(config, 0)
  _check_max_len(model, dc.max_len)
  # Every parameter but the adapters is frozen (no task head); scored by its loss's sums.
  metadata = {'vocab_size': model.config.vocab_size, 'data': record}
  chunk = config.model.get('loss_chunk', 0)
  if not chunk:
    return _model_and_data(family, model, params, lm_loss, lm_predictions, metrics, load_splits,
                           None, metadata, scored=False)
  forward_with, loss, predictions = chunked_lm(family, chunk)
  return ModelAndData(model=model, params=params, family=family,
                      forward_loss=steps.ForwardLoss(forward_with(model), loss),
                      forward_with=forward_with, predictions=predictions, metrics=metrics,
                      scored=False, partition_rules=family.partition_rules(),
                      load_splits=load_splits, default_targets=family.default_targets,
                      head_pattern=None, metadata={**metadata, 'loss_chunk': chunk})


MC_METRICS = ('mc_acc', 'mc_acc_norm')


def multiple_choice(model_data: ModelAndData, path: str, tokenizer_dir, max_len: int,
                    metric: str = 'mc_acc') -> tuple[steps.ForwardLoss, dict]:
  """(task, arrays) scoring a causal LM on a multiple-choice file as lm-eval-harness does
  (data/multiple_choice.py), for any evaluator of (loss, count, correct) sums: the
  search's fitness. Each row is one example with all its choices; correct counts the
  examples whose best choice is gold ('mc_acc': by summed log-likelihood; 'mc_acc_norm':
  per character of the choice); the loss is minus gold's log-likelihood."""
  from glora_jax.data import multiple_choice as mc
  if metric not in MC_METRICS:
    raise ValueError(f"multiple-choice metric '{metric}' is unknown; expected one of {list(MC_METRICS)}")
  examples = mc.read_examples(path)
  arrays = mc.by_example_arrays(examples, mc.load_encoder(tokenizer_dir), max_len=max_len)
  forward = make_forward(model_data.family, model_data.model)

  def forward_choices(params, adapters, subnet, batch, train, rng):
    examples, choices, seq = batch['input_ids'].shape
    flat = {k: batch[k].reshape(examples * choices, seq) for k in ('input_ids', 'attention_mask')}
    logits = forward(params, adapters, subnet, flat, train, rng)
    return logits.reshape(examples, choices, seq, -1)

  def loss(logits, batch):
    ll, _ = mc.continuation_loglikelihoods(logits, batch['targets'], batch['target_mask'])
    score = ll / batch['choice_chars'] if metric == 'mc_acc_norm' else ll
    score = jnp.where(batch['choice_mask'], score, -jnp.inf)
    real = batch.get('mask', jnp.ones(ll.shape[0], jnp.float32)).astype(jnp.float32)
    correct = (jnp.argmax(score, -1) == batch['label']).astype(jnp.float32)
    gold = jnp.take_along_axis(ll, batch['label'][:, None], -1)[:, 0]
    return -jnp.sum(gold * real), jnp.sum(real), jnp.sum(correct * real)
  return steps.ForwardLoss(forward_choices, loss), arrays


BUILDERS = {'text_classification': text_classification,
            'image_classification': image_classification, 'causal_lm': causal_lm}


def build(config) -> ModelAndData:
  if config.task not in BUILDERS:
    raise ValueError(f"unknown task '{config.task}'; known: {sorted(BUILDERS)}")
  return BUILDERS[config.task](config)
