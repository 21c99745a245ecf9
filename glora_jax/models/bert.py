"""BERT-family encoders (HF BertModel, RobertaModel; MiniLM bundled), as the last hidden state or
with masked-mean pooling and a fresh head, and their HF importer. The families differ only in
config fields. Every linear layer is a plain 2-D nn.Dense at an HF-like path
('encoder/layer_3/attention/query')."""
from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from glora_jax import bundled
from glora_jax.models import common, importers

# Leaves adapted by default: the 36 Dense kernels of MiniLM (6 per layer), not the head.
DEFAULT_TARGETS = r'.*/(query|key|value|dense)/kernel'


@dataclasses.dataclass(frozen=True)
class HFType:
  """What a HF encoder family fixes in its code rather than in config.json."""
  name: str  # for messages
  architecture: str  # config.json 'architectures'
  prefix: str  # key prefix in its task models' checkpoints ('bert.encoder...')
  positions_from_padding: bool
  pad_token_id: int  # transformers' default when config.json has none


HF_TYPES = {
    'bert': HFType('BERT', 'BertModel', 'bert.', positions_from_padding=False, pad_token_id=0),
    'roberta': HFType('RoBERTa', 'RobertaModel', 'roberta.', positions_from_padding=True,
                      pad_token_id=1),
}
# HF options of which this module implements one value: (key, that value); others are refused.
_SUPPORTED_OPTIONS = (('hidden_act', 'gelu'), ('position_embedding_type', 'absolute'),
                      ('is_decoder', False), ('add_cross_attention', False))
# Our fields that config.json does not hold.
_NOT_IN_HF = ('dtype', 'remat', 'scan_layers', 'positions_from_padding')


@dataclasses.dataclass(frozen=True)
class BertConfig:
  vocab_size: int = 30522
  hidden_size: int = 384
  num_hidden_layers: int = 6
  num_attention_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  layer_norm_eps: float = 1e-12
  model_type: str = 'bert'  # the HF family config.json is written as (HF_TYPES); data only
  pad_token_id: int = 0
  # RoBERTa numbers tokens from pad_token_id + 1 and gives padding pad_token_id's position
  # (transformers' create_position_ids_from_input_ids); BERT numbers 0, 1, ... regardless.
  positions_from_padding: bool = False
  dtype: Any = jnp.float32  # activations; parameters keep their own dtype
  remat: str = 'none'  # per-layer remat policy, common.REMAT_POLICIES (not in HF's config)
  # Layers under one nn.scan, params stacked under 'encoder/layer' (models/stacking.py).
  scan_layers: bool = False

  def __post_init__(self):
    common.check_choice('remat policy', self.remat, common.REMAT_POLICIES)
    common.check_choice('model_type', self.model_type, HF_TYPES)
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f'hidden_size {self.hidden_size} is not divisible by '
                       f'num_attention_heads {self.num_attention_heads}')
    if self.max_tokens < 1:
      raise ValueError(f'max_position_embeddings {self.max_position_embeddings} leaves no '
                       f'position for a token (positions start at {self.first_position})')

  @property
  def first_position(self) -> int:
    """The position id of the first token: RoBERTa's table skips pad_token_id + 1 rows."""
    return self.pad_token_id + 1 if self.positions_from_padding else 0

  @property
  def max_tokens(self) -> int:
    """The longest input the position table covers (512 for roberta-base's 514 rows)."""
    return self.max_position_embeddings - self.first_position

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], dtype=jnp.float32, source: str = 'config.json'):
    """From a Hugging Face BERT or RoBERTa config.json dict (transformers 4.4x or 5);
    other architectures and unsupported options are refused."""
    model_type = hf.get('model_type')
    if model_type not in HF_TYPES:
      raise ValueError(f"{source}: 'model_type' is {model_type!r}; this importer supports "
                       + ' or '.join(repr(k) for k in HF_TYPES))
    for key, supported in _SUPPORTED_OPTIONS:
      importers.require(hf, key, supported, source)
    family = HF_TYPES[model_type]
    names = [f.name for f in dataclasses.fields(cls) if f.name not in _NOT_IN_HF]
    optional = ('layer_norm_eps', 'pad_token_id', 'model_type')
    missing = [n for n in names if n not in hf and n not in optional]
    if missing:
      raise ValueError(f'{source}: missing {family.name} fields {missing}')
    fields = {'pad_token_id': family.pad_token_id,
              **{n: hf[n] for n in names if hf.get(n) is not None}}
    return cls(**fields, positions_from_padding=family.positions_from_padding, dtype=dtype)


def to_hf(config: BertConfig, dtype=None) -> dict:
  """The config.json of `config.model_type`'s HF model (BertModel, RobertaModel), which
  transformers' AutoModel reads back as this model. `dtype`: the weights' dtype, written
  as 'dtype' (transformers 5) and 'torch_dtype' (4.x); default the config's dtype."""
  family = HF_TYPES[config.model_type]
  if config.positions_from_padding != family.positions_from_padding:
    raise ValueError(f"BertConfig has model_type '{config.model_type}' and positions_from_padding="
                     f'{config.positions_from_padding}, which {family.architecture} does not '
                     f'compute; expected positions_from_padding={family.positions_from_padding}')
  dtype_name = jnp.dtype(config.dtype if dtype is None else dtype).name
  fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if f.name not in _NOT_IN_HF}
  # position_embedding_type as the hub's files write it: 4.x reads it, 5 (absolute only)
  # keeps it as an unused attribute.
  return {'architectures': [family.architecture], **dict(_SUPPORTED_OPTIONS), **fields,
          'dtype': dtype_name, 'torch_dtype': dtype_name}


class BertEmbeddings(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, input_ids, token_type_ids, *, deterministic: bool):
    cfg = self.config
    if input_ids.shape[-1] > cfg.max_tokens:
      # A gather past the table would silently clamp to the last position.
      offset = (f' less the {cfg.first_position} rows before the first position'
                if cfg.first_position else '')
      raise ValueError(f'input_ids have {input_ids.shape[-1]} tokens; expected at most '
                       f'{cfg.max_tokens} (max_position_embeddings='
                       f'{cfg.max_position_embeddings}{offset})')
    if cfg.positions_from_padding:
      # From the ids, not the attention mask, as transformers: pad tokens sit at pad_token_id.
      counted = (input_ids != cfg.pad_token_id).astype(jnp.int32)
      positions = jnp.cumsum(counted, axis=-1) * counted + cfg.pad_token_id
    else:
      positions = jnp.arange(input_ids.shape[-1])[None, :]
    x = (nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, name='word_embeddings')(input_ids)
         + nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=cfg.dtype,
                    name='position_embeddings')(positions)
         + nn.Embed(cfg.type_vocab_size, cfg.hidden_size, dtype=cfg.dtype,
                    name='token_type_embeddings')(token_type_ids))
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, name='LayerNorm')(x)
    return common.Dropout(cfg.hidden_dropout_prob)(x, deterministic)


class DenseAddNorm(nn.Module):
  """dense -> dropout -> LayerNorm(. + residual): BERT's attention/output and output."""
  config: BertConfig
  features: int

  @nn.compact
  def __call__(self, x, residual, *, deterministic: bool):
    cfg = self.config
    x = nn.Dense(self.features, dtype=cfg.dtype, name='dense')(x)
    x = common.Dropout(cfg.hidden_dropout_prob)(x, deterministic)
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, name='LayerNorm')(x + residual)


class BertAttention(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x, mask, *, deterministic: bool):
    cfg = self.config
    heads, head_dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads

    def split(name):
      y = nn.Dense(cfg.hidden_size, dtype=cfg.dtype, name=name)(x)
      return y.reshape(*y.shape[:-1], heads, head_dim)

    q, k, v = split('query'), split('key'), split('value')
    # Float32 softmax (bf16 activations do not saturate the weights), heads-first
    # einsums and the cheap dropout mask: models/common.attention.
    drop = cfg.attention_probs_dropout_prob
    key = None if deterministic or not drop else self.make_rng('dropout')
    context = common.attention(q, k, v, mask[:, None, None, :], dropout_rate=drop,
                               dropout_key=key).reshape(x.shape[:-1] + (cfg.hidden_size,))
    return DenseAddNorm(cfg, cfg.hidden_size, name='output')(context, x, deterministic=deterministic)


class BertIntermediate(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    # Exact (erf) GELU, as BERT's 'gelu'.
    return nn.gelu(nn.Dense(cfg.intermediate_size, dtype=cfg.dtype, name='dense')(x),
                   approximate=False)


class BertLayer(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x, mask, deterministic: bool):
    """(x, None): a scan body's (carry, output)."""
    cfg = self.config
    x = BertAttention(cfg, name='attention')(common.batch_sharded(x), mask,
                                             deterministic=deterministic)
    h = BertIntermediate(cfg, name='intermediate')(common.batch_sharded(x))
    out = DenseAddNorm(cfg, cfg.hidden_size, name='output')(h, x, deterministic=deterministic)
    return common.batch_sharded(out), None


class BertEncoder(nn.Module):
  """Unrolled `layer_{i}` loop (one readable path per layer), or with config.scan_layers
  one nn.scan named `layer` over stacked params (models/stacking.py converts): the same
  outputs, one layer's program whatever the depth."""
  config: BertConfig

  @nn.compact
  def __call__(self, x, mask, *, deterministic: bool):
    cfg = self.config
    # deterministic (argument 3, counting the module) is static under remat.
    if cfg.scan_layers:
      stack = common.scanned(BertLayer, cfg.remat, (3,), (nn.broadcast, nn.broadcast),
                             cfg.num_hidden_layers)
      return stack(cfg, name='layer')(x, mask, deterministic)[0]
    layer_cls = common.maybe_remat(BertLayer, cfg.remat, static_argnums=(3,))
    for i in range(cfg.num_hidden_layers):
      x, _ = layer_cls(cfg, name=f'layer_{i}')(x, mask, deterministic)
    return x


class BertClassifier(nn.Module):
  """Embeddings -> encoder, then with num_classes > 0 masked mean pooling -> a fresh Dense
  `head` (no pooler); with num_classes 0 the encoder alone (HF's last_hidden_state), no head."""
  config: BertConfig
  num_classes: int

  def setup(self):
    if self.num_classes < 0:
      raise ValueError(f'num_classes is {self.num_classes}; expected 0 (no head: the last '
                       'hidden state) or a positive number of classes')
    self.embeddings = BertEmbeddings(self.config)
    self.encoder = BertEncoder(self.config)
    if self.num_classes:
      self.head = nn.Dense(self.num_classes, dtype=self.config.dtype)

  def hidden_states(self, input_ids, attention_mask, token_type_ids=None, *,
                    deterministic: bool = True):
    """(batch, tokens, hidden) output of the last layer; token types default to 0 (RoBERTa's
    only type)."""
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    mask = jnp.asarray(attention_mask).astype(bool)
    x = self.embeddings(input_ids, token_type_ids, deterministic=deterministic)
    return self.encoder(x, mask, deterministic=deterministic)

  def sentence_embedding(self, input_ids, attention_mask, token_type_ids=None, *,
                         deterministic: bool = True):
    """Masked mean over tokens, as sentence-transformers' Pooling (before Normalize)."""
    x = self.hidden_states(input_ids, attention_mask, token_type_ids, deterministic=deterministic)
    mask = jnp.asarray(attention_mask).astype(jnp.float32)[..., None]
    summed = jnp.sum(x.astype(jnp.float32) * mask, axis=1)
    return summed / jnp.maximum(jnp.sum(mask, axis=1), 1e-9)

  def __call__(self, input_ids, attention_mask, token_type_ids=None, *, deterministic: bool = True):
    """Logits (batch, num_classes); with num_classes 0 the (batch, tokens, hidden) states."""
    if not self.num_classes:
      return self.hidden_states(input_ids, attention_mask, token_type_ids,
                                deterministic=deterministic)
    pooled = self.sentence_embedding(input_ids, attention_mask, token_type_ids,
                                     deterministic=deterministic)
    return self.head(pooled.astype(self.config.dtype))


# --------------------------------------------------------------------------- #
# Parameters: fresh head, importer, sharding
# --------------------------------------------------------------------------- #


def init_head(config: BertConfig, num_classes: int, key) -> dict:
  """Parameters of a fresh `head` Dense(num_classes) (Flax default init)."""
  # jit: one compiled program instead of eager per-op compilation of the initializer.
  init = jax.jit(lambda k: nn.Dense(num_classes).init(k, jnp.zeros((1, config.hidden_size))))
  return init(key)['params']


def add_head(backbone: Mapping[str, Any], config: BertConfig, num_classes: int, key) -> dict:
  """Backbone params (embeddings + encoder) plus a fresh head: BertClassifier's params."""
  if 'head' in backbone:
    raise ValueError("backbone params already have a 'head'")
  return {**backbone, 'head': init_head(config, num_classes, key)}


def backbone_shapes(config: BertConfig) -> dict[str, tuple[int, ...]]:
  """The per-layer layout's shapes (what files hold), scan_layers or not."""
  config = dataclasses.replace(config, scan_layers=False)
  ids = jnp.zeros((1, 1), jnp.int32)
  return importers.param_shapes(BertClassifier(config, 0), ids, ids)


def import_rules(config: BertConfig) -> list[importers.Rule]:
  """How each of our params is read from the HF BertModel / RobertaModel checkpoint (one
  layout; interop.layouts reads the same table backwards to export)."""
  R, T = importers.Rule, importers.transpose
  rules = [
      R('embeddings/word_embeddings/embedding', ('embeddings.word_embeddings.weight',)),
      R('embeddings/position_embeddings/embedding', ('embeddings.position_embeddings.weight',)),
      R('embeddings/token_type_embeddings/embedding', ('embeddings.token_type_embeddings.weight',)),
      R('embeddings/LayerNorm/scale', ('embeddings.LayerNorm.weight',)),
      R('embeddings/LayerNorm/bias', ('embeddings.LayerNorm.bias',)),
  ]
  dense = {'attention/query': 'attention.self.query', 'attention/key': 'attention.self.key',
           'attention/value': 'attention.self.value',
           'attention/output/dense': 'attention.output.dense',
           'intermediate/dense': 'intermediate.dense', 'output/dense': 'output.dense'}
  norms = {'attention/output/LayerNorm': 'attention.output.LayerNorm',
           'output/LayerNorm': 'output.LayerNorm'}
  for i in range(config.num_hidden_layers):
    for ours, theirs in dense.items():
      rules.append(R(f'encoder/layer_{i}/{ours}/kernel', (f'encoder.layer.{i}.{theirs}.weight',), T))
      rules.append(R(f'encoder/layer_{i}/{ours}/bias', (f'encoder.layer.{i}.{theirs}.bias',)))
    for ours, theirs in norms.items():
      rules.append(R(f'encoder/layer_{i}/{ours}/scale', (f'encoder.layer.{i}.{theirs}.weight',)))
      rules.append(R(f'encoder/layer_{i}/{ours}/bias', (f'encoder.layer.{i}.{theirs}.bias',)))
  return rules


# The pooler is not part of our model (mean pooling replaces it); position_ids and
# token_type_ids are buffers older transformers saved.
_IGNORED = (r'pooler\..*', r'embeddings\.(position_ids|token_type_ids)')
# The pretraining heads of the hub's checkpoints (BertForPreTraining's cls.*,
# RobertaForMaskedLM's lm_head.*), beside the 'bert.' / 'roberta.' encoder.
_PRETRAINING_HEADS = re.compile(r'(cls|lm_head)\..*')


def convert_hf(state: Mapping[str, np.ndarray], config: BertConfig, *,
               source: str = 'checkpoint') -> dict:
  """HF BertModel / RobertaModel tensors (torch names, (out, in) weights) -> backbone params.
  Keys may carry a task model's 'bert.' or 'roberta.' prefix; pretraining heads are dropped."""
  prefixes = tuple(f.prefix for f in HF_TYPES.values())
  if any(k.startswith(prefixes) for k in state):
    state = {k: v for k, v in state.items() if not _PRETRAINING_HEADS.fullmatch(k)}
  state = importers.strip_prefix(state, prefixes)
  family = HF_TYPES[config.model_type].name
  return importers.convert(state, import_rules(config), backbone_shapes(config), source=source,
                           model=f'{family} ({config.num_hidden_layers} layers, hidden '
                           f'{config.hidden_size})', ignore=_IGNORED)


def load_bert(path, dtype=jnp.float32) -> tuple[BertConfig, dict]:
  """(config, backbone params) from a HF BERT or RoBERTa directory (config.json + safetensors).

  `dtype` is both the parameter dtype and the activation dtype of the config."""
  path = pathlib.Path(path)
  config = BertConfig.from_hf(importers.read_json(path / 'config.json'), dtype=dtype,
                              source=str(path / 'config.json'))
  params = convert_hf(importers.read_safetensors(path), config, source=str(path))
  return config, importers.cast(params, dtype)


def load_minilm(dtype=jnp.float32) -> tuple[BertConfig, dict]:
  """The bundled all-MiniLM-L6-v2 encoder: (config, backbone params), no torch needed."""
  return load_bert(bundled.minilm_dir(), dtype)


def partition_rules() -> list[tuple[str, P]]:
  """(path regex, PartitionSpec) over a ('data', 'model') mesh, first match wins.

  Megatron-style: q/k/v and intermediate split their output dim on 'model', the
  two output denses their input dim, so each layer needs one all-reduce per block."""
  return [
      (r'.*/attention/(query|key|value)/kernel', P(None, 'model')),
      (r'.*/attention/(query|key|value)/bias', P('model')),
      (r'.*/intermediate/dense/kernel', P(None, 'model')),
      (r'.*/intermediate/dense/bias', P('model')),
      (r'.*/output/dense/kernel', P('model', None)),
      # The hidden dim (not the vocabulary, 30522 = 2 * 3 * 5087) divides any mesh.
      (r'embeddings/.*_embeddings/embedding', P(None, 'model')),
      (r'.*', P()),
  ]
