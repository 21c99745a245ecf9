"""Llama 1/2/3.x, Qwen2 and Mistral decoders as one module (RMSNorm, HF rotary, SwiGLU,
grouped-query attention): the families differ only in config fields. HF importer and
config.json both ways; bias flags let merged adapter layers keep the bias they gain;
packed rows (segment_ids) for training, an explicit KV cache (init_cache) for generation."""
from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from glora_jax.models import common, importers

DEFAULT_TARGETS = r'layers_\d+/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/kernel'
ROPE_TYPES = ('default', 'linear', 'llama3')
# The rope fields each rope type reads; the others must keep their defaults, so that
# one model has one config (and from_hf(to_hf(c)) == c).
_ROPE_FIELDS = {'default': (), 'linear': ('rope_factor',),
                'llama3': ('rope_factor', 'rope_low_freq_factor', 'rope_high_freq_factor',
                           'rope_original_max_position_embeddings')}
# Our rope field -> its key in HF's rope_parameters.
_ROPE_KEYS = {'rope_factor': 'factor', 'rope_low_freq_factor': 'low_freq_factor',
              'rope_high_freq_factor': 'high_freq_factor',
              'rope_original_max_position_embeddings': 'original_max_position_embeddings'}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int | None = None  # None: as many as attention heads (no GQA)
  head_dim: int | None = None  # None: hidden_size // num_attention_heads
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  # Which HF family's config.json describes this model (HF_TYPES); no effect on outputs.
  model_type: str = 'llama'
  # Bias on q, k, v and o (Llama's flag; a merged GLoRA layer may need one).
  attention_bias: bool = False
  qkv_bias: bool = False  # bias on q, k, v only (Qwen2's layout)
  mlp_bias: bool = False  # bias on gate, up, down
  attention_dropout: float = 0.0
  # transformers' rope_parameters: 'default', 'linear' (rope_factor) or 'llama3' (all four).
  rope_type: str = 'default'
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position_embeddings: int = 8192
  # Mistral's / Qwen2's window; None: full causal attention. We attend to the full causal
  # context, which equals the window only up to this many tokens: longer inputs are refused.
  sliding_window: int | None = None
  dtype: Any = jnp.float32  # activations; parameters keep their own dtype
  # Scale (not in HF's config): per-layer remat policy (common.REMAT_POLICIES) and
  # attention implementation (common.ATTENTION_IMPLS); outputs are the same.
  remat: str = 'none'
  attention: str = 'xla'
  attention_chunk: int = 512
  # Layers under one nn.scan: params stacked under 'layers' ((layers, ...) leaves, see
  # models/stacking.py), one layer's program whatever the depth; same outputs.
  scan_layers: bool = False

  def __post_init__(self):
    common.check_choice('model_type', self.model_type, tuple(HF_TYPES))
    common.check_choice('remat policy', self.remat, common.REMAT_POLICIES)
    common.check_choice('attention', self.attention, common.ATTENTION_IMPLS)
    common.check_choice('rope type', self.rope_type, ROPE_TYPES)
    if self.attention != 'xla' and self.attention_dropout:
      raise ValueError(f"attention '{self.attention}' has no dropout; attention_dropout must be 0")
    if self.num_attention_heads % self.kv_heads:
      raise ValueError(f'num_attention_heads {self.num_attention_heads} is not a multiple of '
                       f'num_key_value_heads {self.kv_heads}')
    defaults = {f.name: f.default for f in dataclasses.fields(self)}
    unused = [n for n in _ROPE_KEYS if n not in _ROPE_FIELDS[self.rope_type]
              and getattr(self, n) != defaults[n]]
    if unused:
      raise ValueError(f"rope type '{self.rope_type}' does not read {unused}; leave them at "
                       f'their defaults (it reads {list(_ROPE_FIELDS[self.rope_type])})')
    if self.rope_type == 'llama3' and not self.rope_low_freq_factor < self.rope_high_freq_factor:
      raise ValueError(f'llama3 rope needs rope_low_freq_factor < rope_high_freq_factor; got '
                       f'{self.rope_low_freq_factor} and {self.rope_high_freq_factor}')
    if self.sliding_window is not None and self.sliding_window < 1:
      raise ValueError(f'sliding_window must be None (full causal attention) or a positive '
                       f'number of tokens; got {self.sliding_window}')

  @property
  def kv_heads(self) -> int:
    return self.num_key_value_heads or self.num_attention_heads

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.hidden_size // self.num_attention_heads

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], dtype=jnp.float32, source: str = 'config.json'):
    """From a HF config.json dict of model_type 'llama', 'qwen2' or 'mistral', as
    transformers 5 or 4.4x writes it; what we cannot reproduce is refused, naming it.
    Values that equal their derived default (head_dim, num_key_value_heads) read as None."""
    family = HF_TYPES.get(hf.get('model_type'))
    if family is None:
      raise ValueError(f"{source}: 'model_type' is {hf.get('model_type')!r}; supported: "
                       f'{list(HF_TYPES)}')
    importers.require(hf, 'hidden_act', 'silu', source)
    importers.require(hf, 'pretraining_tp', 1, source)
    fields = dict(family.defaults)
    fields.update({n: hf[n] for n in _HF_FIELDS if hf.get(n) is not None})
    missing = [n for n in ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers',
                           'num_attention_heads') if n not in fields]
    if missing:
      raise ValueError(f'{source}: missing {hf["model_type"]} fields {missing}')
    if fields.get('head_dim') == fields['hidden_size'] // fields['num_attention_heads']:
      fields['head_dim'] = None
    if fields.get('num_key_value_heads') == fields['num_attention_heads']:
      fields['num_key_value_heads'] = None
    biases = family.biases or {n: bool(hf.get(n, False)) for n in ('attention_bias', 'mlp_bias')}
    return cls(**fields, **biases, **_rope_from_hf(hf, fields, source),
               sliding_window=family.read_window(hf), model_type=hf['model_type'], dtype=dtype)


# The HF keys every family reads the same way.
_HF_FIELDS = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers',
              'num_attention_heads', 'num_key_value_heads', 'head_dim', 'rms_norm_eps',
              'max_position_embeddings', 'tie_word_embeddings', 'attention_dropout')


def _rope_from_hf(hf: Mapping[str, Any], fields: Mapping[str, Any], source: str) -> dict:
  """Our rope fields, with transformers 5's precedence (PreTrainedConfig.
  convert_rope_params_to_dict, standardize_rope_params): a legacy rope_scaling block
  wins over rope_parameters; rope_theta from the block, else top level, else 10000."""
  rope = dict(hf.get('rope_scaling') or hf.get('rope_parameters') or {})
  rope_type = rope.get('rope_type', rope.get('type', 'default'))
  if rope_type not in ROPE_TYPES:
    raise ValueError(f"{source}: rope type '{rope_type}' is not supported; supported: "
                     f'{list(ROPE_TYPES)}')
  partial = rope.get('partial_rotary_factor', hf.get('partial_rotary_factor', 1.0))
  if partial != 1.0:
    raise ValueError(f"{source}: 'partial_rotary_factor' is {partial!r}; we rotate the whole "
                     'head (1.0)')
  out = {'rope_type': rope_type, 'rope_theta': float(rope.get('rope_theta',
                                                               hf.get('rope_theta', 10000.0)))}
  if rope_type == 'llama3':  # a top-level value wins, as in standardize_rope_params
    rope['original_max_position_embeddings'] = hf.get(
        'original_max_position_embeddings',
        rope.get('original_max_position_embeddings', fields.get('max_position_embeddings')))
  for name in _ROPE_FIELDS[rope_type]:
    key = _ROPE_KEYS[name]
    if rope.get(key) is None:
      raise ValueError(f"{source}: rope type '{rope_type}' needs '{key}' in rope_parameters; "
                       f'found {sorted(rope)}')
    out[name] = int(rope[key]) if key == 'original_max_position_embeddings' else float(rope[key])
  return out


def _rope_to_hf(c: LlamaConfig) -> dict:
  return {'rope_type': c.rope_type, 'rope_theta': c.rope_theta,
          **{_ROPE_KEYS[n]: getattr(c, n) for n in _ROPE_FIELDS[c.rope_type]}}


# --------------------------------------------------------------------------- #
# The HF families: what each one's layout fixes, and how its config.json holds the window
# --------------------------------------------------------------------------- #


def _qwen2_window(hf: Mapping[str, Any]) -> int | None:
  # Qwen2Config.__post_init__: the window counts only with use_sliding_window, and only
  # on layers of type 'sliding_attention' (by default those from max_window_layers on).
  window = hf.get('sliding_window', 4096) if hf.get('use_sliding_window', False) else None
  types = hf.get('layer_types') or ['sliding_attention' if i >= hf.get('max_window_layers', 28)
                                    else 'full_attention' for i in range(hf['num_hidden_layers'])]
  return window if 'sliding_attention' in types else None


def _qwen2_window_to_hf(c: LlamaConfig) -> dict:
  # A window is written on every layer: we refuse longer inputs on all of them anyway.
  if c.sliding_window is None:
    return {'use_sliding_window': False, 'sliding_window': None,
            'layer_types': ['full_attention'] * c.num_hidden_layers}
  return {'use_sliding_window': True, 'sliding_window': c.sliding_window, 'max_window_layers': 0,
          'layer_types': ['sliding_attention'] * c.num_hidden_layers}


@dataclasses.dataclass(frozen=True)
class HFType:
  """One HF decoder family: its name in messages, its architecture, the biases its layout
  always has (None: config.json's attention_bias / mlp_bias decide), the defaults its config
  class fills in for keys config.json may leave out, and how config.json holds the window."""
  name: str
  architecture: str
  biases: Mapping[str, bool] | None
  defaults: Mapping[str, Any]
  read_window: Callable[[Mapping[str, Any]], int | None]
  write_window: Callable[[LlamaConfig], dict] | None  # None: the family has no window


HF_TYPES = {
    'llama': HFType('LLaMA', 'LlamaForCausalLM', None, {'max_position_embeddings': 2048},
                    lambda hf: None, None),
    'qwen2': HFType('Qwen2', 'Qwen2ForCausalLM',
                    {'qkv_bias': True, 'attention_bias': False, 'mlp_bias': False},
                    {'max_position_embeddings': 32768, 'num_key_value_heads': 32},
                    _qwen2_window, _qwen2_window_to_hf),
    'mistral': HFType('Mistral', 'MistralForCausalLM',
                      {'qkv_bias': False, 'attention_bias': False, 'mlp_bias': False},
                      {'max_position_embeddings': 131072, 'num_key_value_heads': 8},
                      lambda hf: hf.get('sliding_window', 4096),
                      lambda c: {'sliding_window': c.sliding_window}),
}


def _bias_places(qkv_bias: bool, attention_bias: bool, mlp_bias: bool) -> dict[str, bool]:
  return {'q, k, v': qkv_bias or attention_bias, 'o_proj': attention_bias, 'the MLP': mlp_bias}


def _layout_problem(c: LlamaConfig) -> str | None:
  """Why config.json of `c.model_type` cannot describe `c`, or None."""
  family = HF_TYPES[c.model_type]
  if family.write_window is None and c.sliding_window is not None:
    return (f"model_type '{c.model_type}' has no sliding window (it attends to the whole causal "
            f'context); sliding_window {c.sliding_window} is held by mistral or qwen2, or set it '
            f'to None to write {c.model_type} (then beyond {c.sliding_window} tokens the written '
            'model attends further than the windowed one)')
  has = _bias_places(c.qkv_bias, c.attention_bias, c.mlp_bias)
  where = lambda places: ', '.join(p for p, on in places.items() if on) or 'nothing'
  qkv_only = has == _bias_places(True, False, False)
  if family.biases is None:  # Llama's two flags hold every bias layout but q, k, v alone
    fits, holds = not qkv_only, 'q, k, v only together with o_proj (attention_bias)'
  else:
    fits = has == _bias_places(**family.biases)
    holds = f'exactly {where(_bias_places(**family.biases))}'
  if fits:
    return None
  other = ("'qwen2' (bias on q, k, v only)" if qkv_only else
           "'llama' (attention_bias: bias on q, k, v and o_proj, a zero one where o_proj had "
           "none; mlp_bias: on the MLP)")
  return (f"model_type '{c.model_type}' has biases on {holds}; this config has biases on "
          f'{where(has)}: write it as {other}')


def to_hf(config: LlamaConfig, dtype=None) -> dict:
  """config.json for `config.model_type` that transformers' AutoConfig and
  AutoModelForCausalLM read back into this model; `dtype`: the weights' (default
  config.dtype), written as its name. Refuses what that family's layout cannot hold."""
  problem = _layout_problem(config)
  if problem:
    raise ValueError(problem)
  c, family = config, HF_TYPES[config.model_type]
  name = jnp.dtype(dtype or c.dtype).name
  out = {'architectures': [family.architecture], 'model_type': c.model_type, 'hidden_act': 'silu',
         'vocab_size': c.vocab_size, 'hidden_size': c.hidden_size,
         'intermediate_size': c.intermediate_size, 'num_hidden_layers': c.num_hidden_layers,
         'num_attention_heads': c.num_attention_heads, 'num_key_value_heads': c.kv_heads,
         'rms_norm_eps': c.rms_norm_eps,
         'max_position_embeddings': c.max_position_embeddings,
         'tie_word_embeddings': c.tie_word_embeddings, 'attention_dropout': c.attention_dropout,
         'rope_parameters': _rope_to_hf(c), 'dtype': name, 'torch_dtype': name}
  if c.dim_per_head != c.hidden_size // c.num_attention_heads:  # else each family derives it
    out['head_dim'] = c.dim_per_head
  if family.biases is None:
    out.update(attention_bias=c.attention_bias, mlp_bias=c.mlp_bias, pretraining_tp=1)
  if family.write_window is not None:
    out.update(family.write_window(c))
  return out


class RMSNorm(nn.Module):
  """HF's LlamaRMSNorm (Qwen2's and Mistral's are the same): normalise in float32,
  cast back, then scale."""
  eps: float

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.initializers.ones, (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(x.dtype) * normed.astype(x.dtype)


# Rotary embeddings follow transformers (modeling_rope_utils.py, 5.x): 'default' is
# LlamaRotaryEmbedding.compute_default_rope_parameters, 'linear'
# _compute_linear_scaling_rope_parameters (inv_freq / factor), 'llama3'
# _compute_llama3_parameters; all three have attention_scaling 1.0, so cos and sin are
# not rescaled. inv_freq is computed in float32 numpy as transformers does in torch;
# the cos/sin tables as LlamaRotaryEmbedding.forward. Where we differ: Mistral's and
# Qwen2's sliding window is not implemented; LlamaForCausalLM refuses inputs longer
# than the window, where full causal attention would differ from it.


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
  """The rotary inverse frequencies (head_dim // 2,), float32, as transformers'."""
  dim = config.dim_per_head
  inv_freq = np.float32(1.0) / (np.float32(config.rope_theta)
                                ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
  if config.rope_type == 'linear':
    inv_freq = inv_freq / np.float32(config.rope_factor)
  elif config.rope_type == 'llama3':
    factor, low, high = (config.rope_factor, config.rope_low_freq_factor,
                         config.rope_high_freq_factor)
    old_context = config.rope_original_max_position_embeddings
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = np.float32(2 * math.pi) / inv_freq
    # Long wavelengths are divided by factor, short ones kept, the ones between smoothed.
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(factor), inv_freq)
    smooth = (np.float32(old_context) / wavelen - np.float32(low)) / np.float32(high - low)
    smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    inv_freq = np.where(medium, smoothed, scaled)
  return inv_freq.astype(np.float32)


def rotary_cos_sin(positions, inv_freq):
  """cos, sin of shape (batch, seq, head_dim), float32, from positions (batch, seq)."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x, cos, sin):
  """x (batch, seq, heads, head_dim); HF's rotate_half convention (halves, not pairs)."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
  return x * cos + rotated * sin


class LlamaAttention(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x, allowed, cos, sin, *, deterministic: bool, cache=None, index=None):
    """With `cache` ({'k', 'v'} of init_cache), this step's keys and values are written
    at slots index.. and the queries attend to every slot (`allowed` says which count);
    returns (out, new cache). Without, (out, None)."""
    cfg = self.config
    hd, heads, kv = cfg.dim_per_head, cfg.num_attention_heads, cfg.kv_heads
    dense = lambda n, name, bias: nn.Dense(n, use_bias=bias, dtype=cfg.dtype, name=name)
    qkv_bias = cfg.attention_bias or cfg.qkv_bias
    q = dense(heads * hd, 'q_proj', qkv_bias)(x).reshape(*x.shape[:-1], heads, hd)
    k = dense(kv * hd, 'k_proj', qkv_bias)(x).reshape(*x.shape[:-1], kv, hd)
    v = dense(kv * hd, 'v_proj', qkv_bias)(x).reshape(*x.shape[:-1], kv, hd)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    new_cache = None
    if cache is not None:
      start = (0, index, 0, 0)
      new_cache = {'k': jax.lax.dynamic_update_slice(cache['k'], k.astype(cache['k'].dtype), start),
                   'v': jax.lax.dynamic_update_slice(cache['v'], v.astype(cache['v'].dtype), start)}
      k, v = new_cache['k'].astype(k.dtype), new_cache['v'].astype(v.dtype)
    drop = cfg.attention_dropout
    key = None if deterministic or not drop else self.make_rng('dropout')
    out = common.attention(q, k, v, allowed[:, None], impl=cfg.attention,
                           chunk=cfg.attention_chunk, dropout_rate=drop, dropout_key=key)
    out = out.reshape(*x.shape[:-1], heads * hd)
    return dense(cfg.hidden_size, 'o_proj', cfg.attention_bias)(out), new_cache


class LlamaMLP(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dense = lambda n, name: nn.Dense(n, use_bias=cfg.mlp_bias, dtype=cfg.dtype, name=name)
    h = nn.silu(dense(cfg.intermediate_size, 'gate_proj')(x)) * dense(cfg.intermediate_size, 'up_proj')(x)
    return dense(cfg.hidden_size, 'down_proj')(h)


class LlamaDecoderLayer(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x, allowed, cos, sin, deterministic: bool, cache=None, index=None):
    """(x, the layer's new cache or None); cache and index as LlamaAttention's."""
    cfg = self.config
    x = common.batch_sharded(x)
    h = RMSNorm(cfg.rms_norm_eps, name='input_layernorm')(x)
    out, cache = LlamaAttention(cfg, name='self_attn')(h, allowed, cos, sin,
                                                       deterministic=deterministic,
                                                       cache=cache, index=index)
    x = common.batch_sharded(x + out)
    h = RMSNorm(cfg.rms_norm_eps, name='post_attention_layernorm')(x)
    return common.batch_sharded(x + LlamaMLP(cfg, name='mlp')(h)), cache


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype=None) -> dict:
  """An empty KV cache for `batch` rows of up to `max_len` tokens (prompt and generated),
  a plain pytree: 'layers' (per layer {'k', 'v'}: (batch, max_len, kv_heads, head_dim),
  in `dtype`, default config.dtype; with scan_layers one {'k', 'v'} stacked over layers), 'index' (the next slot to write, int32, shared by
  all rows: prompts are left-padded) and 'mask' ((batch, max_len) bool: the slots that
  hold a real token). LlamaForCausalLM(..., cache=) fills it; a call that would write
  past max_len is the caller's to prevent (under jit it cannot be refused)."""
  if config.sliding_window is not None and max_len > config.sliding_window:
    raise ValueError(f'a cache of {max_len} tokens is longer than sliding_window '
                     f'{config.sliding_window}: this model attends to the whole causal context, '
                     f'which equals {config.model_type} sliding-window attention only for at most '
                     f'{config.sliding_window} tokens')
  dtype = dtype or config.dtype
  shape = (batch, max_len, config.kv_heads, config.dim_per_head)
  layer = lambda: {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}
  if config.scan_layers:  # one stacked {'k', 'v'} of (layers, batch, max_len, ...)
    layers = {'k': jnp.zeros((config.num_hidden_layers,) + shape, dtype),
              'v': jnp.zeros((config.num_hidden_layers,) + shape, dtype)}
  else:
    layers = tuple(layer() for _ in range(config.num_hidden_layers))
  return {'layers': layers, 'index': jnp.zeros((), jnp.int32),
          'mask': jnp.zeros((batch, max_len), bool)}


def _allowed(seq: int, attention_mask, segment_ids):
  """(batch or 1, seq, seq) bool: which keys each query attends to without a cache."""
  allowed = jnp.tril(jnp.ones((seq, seq), bool))[None]
  if segment_ids is not None:
    segment_ids = jnp.asarray(segment_ids)
    # Padding (segment 0) sees padding, never a real token and never seen by one: no
    # row of the mask is empty, which a fused attention kernel may turn into NaN.
    return allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])
  if attention_mask is not None:
    allowed = allowed & jnp.asarray(attention_mask).astype(bool)[:, None, :]
  return allowed


def _cached_allowed(cache, attention_mask, position_ids, shape):
  """(allowed (batch, seq, max_len), position_ids, the cache's new mask) for `shape`
  (batch, seq) new tokens written at slots index..index + seq - 1: a query sees the
  filled real slots up to its own. Positions default to each row's real tokens so far
  plus its new real tokens' count - 1 (transformers' cumsum(attention_mask) - 1)."""
  index, old = cache['index'], cache['mask']
  new = (jnp.ones(shape, bool) if attention_mask is None
         else jnp.asarray(attention_mask).astype(bool))
  mask = jax.lax.dynamic_update_slice(old, new, (0, index))
  slots = jnp.arange(old.shape[1])[None, None, :]
  queries = index + jnp.arange(shape[1])[None, :, None]
  # Each query also sees its own slot: a padding query then has a nonempty mask row (an
  # empty one may give NaN in a fused kernel, and a NaN value poisons every later query).
  allowed = (mask[:, None, :] | (slots == queries)) & (slots <= queries)
  if position_ids is None:
    counted = jnp.sum(old, -1, dtype=jnp.int32)[:, None] + jnp.cumsum(new, -1, dtype=jnp.int32)
    position_ids = jnp.maximum(counted - 1, 0)
  return allowed, position_ids, mask


class LlamaForCausalLM(nn.Module):
  """Token ids (batch, seq) -> next-token logits (batch, seq, vocab), float32.

  Layers are an unrolled loop named layers_{i}, or with config.scan_layers one nn.scan
  named layers over stacked params (models/stacking.py converts): the same outputs, one
  layer's program whatever the depth. Adapters keep their per-layer paths either way."""
  config: LlamaConfig

  def setup(self):
    cfg = self.config
    self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype,
                                 embedding_init=nn.initializers.normal(0.02))
    # deterministic (argument 5, counting the module) is static under remat.
    if cfg.scan_layers:  # (x, allowed, cos, sin, deterministic, cache, index): cache scanned
      b = nn.broadcast
      self.layers = common.scanned(LlamaDecoderLayer, cfg.remat, (5,), (b, b, b, b, 0, b),
                                   cfg.num_hidden_layers)(cfg)
    else:
      layer_cls = common.maybe_remat(LlamaDecoderLayer, cfg.remat, static_argnums=(5,))
      self.layers = [layer_cls(cfg) for _ in range(cfg.num_hidden_layers)]
    self.norm = RMSNorm(cfg.rms_norm_eps)
    if not cfg.tie_word_embeddings:
      self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.dtype)

  def hidden_states(self, input_ids, attention_mask=None, position_ids=None, *,
                    segment_ids=None, cache=None, deterministic: bool = True):
    """(batch, seq, hidden) after the final norm, and with `cache` the new cache.

    attention_mask marks real tokens (1) and padding (0); position_ids default to
    0..seq-1 as in HF. segment_ids (batch, seq) int pack several examples in a row: a
    token attends to earlier-or-same tokens of its own nonzero segment (0: padding),
    with position_ids restarting per example as the caller gives them; they replace
    attention_mask. cache (init_cache): this call's tokens are written at its index
    and attend to what it holds; attention_mask then covers only the new tokens."""
    cfg = self.config
    seq = input_ids.shape[-1]
    if segment_ids is not None and attention_mask is not None:
      raise ValueError('segment_ids and attention_mask were both given; segment_ids mark '
                       'padding themselves (segment 0): pass attention_mask=None')
    if segment_ids is not None and cache is not None:
      raise ValueError('segment_ids with a cache: packed rows are for training; generation '
                       'takes left-padded rows with attention_mask')
    span = seq if cache is None else cache['mask'].shape[1]
    if cfg.sliding_window is not None and span > cfg.sliding_window:
      raise ValueError(f'a sequence of {span} tokens is longer than sliding_window '
                       f'{cfg.sliding_window}: this model attends to the whole causal context, '
                       f'which equals {cfg.model_type} sliding-window attention only for at most '
                       f'{cfg.sliding_window} tokens (the window is not implemented)')
    if cache is None:
      allowed = _allowed(seq, attention_mask, segment_ids)
    else:
      allowed, position_ids, new_mask = _cached_allowed(cache, attention_mask, position_ids,
                                                        input_ids.shape)
    if position_ids is None:
      position_ids = jnp.broadcast_to(jnp.arange(seq), input_ids.shape)
    cos, sin = rotary_cos_sin(position_ids, rope_inv_freq(cfg))
    x = self.embed_tokens(input_ids)
    index = None if cache is None else cache['index']
    if cfg.scan_layers:
      x, layer_caches = self.layers(x, allowed, cos, sin, deterministic,
                                    None if cache is None else cache['layers'], index)
    else:
      layer_caches = []
      for i, layer in enumerate(self.layers):
        layer_cache = None if cache is None else cache['layers'][i]
        x, layer_cache = layer(x, allowed, cos, sin, deterministic, layer_cache, index)
        layer_caches.append(layer_cache)
      layer_caches = tuple(layer_caches)
    x = self.norm(x)
    if cache is None:
      return x
    return x, {'layers': layer_caches, 'index': cache['index'] + seq, 'mask': new_mask}

  def __call__(self, input_ids, attention_mask=None, position_ids=None, *, segment_ids=None,
               cache=None, last_only: bool = False, deterministic: bool = True):
    """Logits (batch, seq, vocab), float32; with `cache`, (logits, new cache).
    last_only: the logits of the last position only (batch, 1, vocab), what a
    generation step reads (with left padding every row's newest token is last)."""
    out = self.hidden_states(input_ids, attention_mask, position_ids, segment_ids=segment_ids,
                             cache=cache, deterministic=deterministic)
    x, new_cache = (out, None) if cache is None else out
    if last_only:
      x = x[:, -1:]
    if self.config.tie_word_embeddings:
      logits = self.embed_tokens.attend(x)
    else:
      logits = self.lm_head(x)
    logits = logits.astype(jnp.float32)
    return logits if cache is None else (logits, new_cache)


# --------------------------------------------------------------------------- #
# Importer and sharding
# --------------------------------------------------------------------------- #


def param_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """The per-layer layout's shapes (what files hold), scan_layers or not."""
  config = dataclasses.replace(config, scan_layers=False)
  return importers.param_shapes(LlamaForCausalLM(config), jnp.zeros((1, 1), jnp.int32))


def import_rules(config: LlamaConfig) -> list[importers.Rule]:
  """How each of our params is read from an HF LlamaForCausalLM, Qwen2ForCausalLM or
  MistralForCausalLM checkpoint (same tensor names; interop reads the table backwards)."""
  R, T = importers.Rule, importers.transpose
  rules = [R('embed_tokens/embedding', ('model.embed_tokens.weight',)),
           R('norm/scale', ('model.norm.weight',))]
  if not config.tie_word_embeddings:
    rules.append(R('lm_head/kernel', ('lm_head.weight',), T))
  qkv_bias = config.attention_bias or config.qkv_bias
  projections = [('self_attn', n, qkv_bias) for n in ('q_proj', 'k_proj', 'v_proj')]
  projections.append(('self_attn', 'o_proj', config.attention_bias))
  projections += [('mlp', n, config.mlp_bias) for n in ('gate_proj', 'up_proj', 'down_proj')]
  for i in range(config.num_hidden_layers):
    for block, name, bias in projections:
      rules.append(R(f'layers_{i}/{block}/{name}/kernel', (f'model.layers.{i}.{block}.{name}.weight',), T))
      if bias:
        rules.append(R(f'layers_{i}/{block}/{name}/bias', (f'model.layers.{i}.{block}.{name}.bias',)))
    for norm in ('input_layernorm', 'post_attention_layernorm'):
      rules.append(R(f'layers_{i}/{norm}/scale', (f'model.layers.{i}.{norm}.weight',)))
  return rules


def convert_hf(state: Mapping[str, np.ndarray], config: LlamaConfig, *,
               source: str = 'checkpoint') -> dict:
  """HF Llama / Qwen2 / Mistral tensors (torch names, (out, in) weights) -> our params."""
  # Old checkpoints store the rotary buffer; a tied model may still carry lm_head.
  ignore = [r'model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq', r'model\.rotary_emb\.inv_freq']
  if config.tie_word_embeddings:
    ignore.append(r'lm_head\.weight')
  model = (f'{HF_TYPES[config.model_type].name} ({config.num_hidden_layers} layers, hidden '
           f'{config.hidden_size})')
  return importers.convert(state, import_rules(config), param_shapes(config), source=source,
                           model=model, ignore=ignore)


def load_llama(path, dtype=jnp.float32) -> tuple[LlamaConfig, dict]:
  """(config, params) from a HF Llama, Qwen2 or Mistral directory: config.json and
  model.safetensors or a sharded model.safetensors.index.json. `dtype`: parameters and
  activations."""
  path = pathlib.Path(path)
  config = LlamaConfig.from_hf(importers.read_json(path / 'config.json'), dtype=dtype,
                               source=str(path / 'config.json'))
  params = convert_hf(importers.read_safetensors(path), config, source=str(path))
  return config, importers.cast(params, dtype)


def partition_rules() -> list[tuple[str, P]]:
  """(path regex, PartitionSpec) over a ('data', 'model') mesh, first match wins."""
  return [
      (r'.*/self_attn/(q|k|v)_proj/kernel', P(None, 'model')),
      (r'.*/self_attn/(q|k|v)_proj/bias', P('model')),
      (r'.*/mlp/(gate|up)_proj/kernel', P(None, 'model')),
      (r'.*/mlp/(gate|up)_proj/bias', P('model')),
      (r'.*/(self_attn/o_proj|mlp/down_proj)/kernel', P('model', None)),
      (r'embed_tokens/embedding', P(None, 'model')),
      # The head vocab-parallel over both axes: its contraction (hidden) stays whole, so
      # data-parallel rows never meet an FSDP split of the dimension they contract; an
      # FSDP split of hidden here made XLA all-gather the rows and hold the global
      # batch's logits on every device (8 devices: 1150 MiB against 319, small Llama).
      (r'lm_head/kernel', P(None, ('model', 'data'))),
      (r'.*', P()),
  ]
