"""LLaMA decoder (RMSNorm, HF rotary, SwiGLU, grouped-query attention) and its HF safetensors
importer; bias flags let merged adapter layers keep the bias they gain (loss: tasks.lm_loss)."""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from glora_jax.models import common, importers

DEFAULT_TARGETS = r'layers_\d+/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/kernel'


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
  attention_bias: bool = False  # bias on q, k, v, o (a merged GLoRA layer may need one)
  mlp_bias: bool = False  # bias on gate, up, down
  attention_dropout: float = 0.0
  dtype: Any = jnp.float32  # activations; parameters keep their own dtype
  # Scale (not in HF's config): per-layer remat policy (common.REMAT_POLICIES) and
  # attention implementation (common.ATTENTION_IMPLS); outputs are the same.
  remat: str = 'none'
  attention: str = 'xla'
  attention_chunk: int = 512

  def __post_init__(self):
    common.check_choice('remat policy', self.remat, common.REMAT_POLICIES)
    common.check_choice('attention', self.attention, common.ATTENTION_IMPLS)
    if self.attention != 'xla' and self.attention_dropout:
      raise ValueError(f"attention '{self.attention}' has no dropout; attention_dropout must be 0")
    if self.num_attention_heads % self.kv_heads:
      raise ValueError(f'num_attention_heads {self.num_attention_heads} is not a multiple of '
                       f'num_key_value_heads {self.kv_heads}')

  @property
  def kv_heads(self) -> int:
    return self.num_key_value_heads or self.num_attention_heads

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.hidden_size // self.num_attention_heads

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], dtype=jnp.float32, source: str = 'config.json'):
    """From a Hugging Face LLaMA config.json dict; unsupported options are refused."""
    importers.require(hf, 'model_type', 'llama', source)
    importers.require(hf, 'hidden_act', 'silu', source)
    importers.require(hf, 'pretraining_tp', 1, source)
    # transformers >= 5 nests rope_theta in rope_parameters; older ones use rope_scaling.
    rope = dict(hf.get('rope_parameters') or hf.get('rope_scaling') or {})
    rope_type = rope.get('rope_type', rope.get('type', 'default'))
    if rope_type != 'default':
      raise ValueError(f"{source}: rope type '{rope_type}' is not supported; expected 'default'")
    names = [f.name for f in dataclasses.fields(cls)
             if f.name not in ('dtype', 'remat', 'attention', 'attention_chunk')]
    fields = {n: hf[n] for n in names if hf.get(n) is not None}
    if 'rope_theta' in rope:
      fields['rope_theta'] = rope['rope_theta']
    required = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers',
                'num_attention_heads')
    missing = [n for n in required if n not in fields]
    if missing:
      raise ValueError(f'{source}: missing LLaMA fields {missing}')
    return cls(**fields, dtype=dtype)


class RMSNorm(nn.Module):
  """HF's LlamaRMSNorm: normalise in float32, cast back, then scale."""
  eps: float

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.initializers.ones, (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(x.dtype) * normed.astype(x.dtype)


def rotary_cos_sin(positions, head_dim: int, theta: float):
  """HF's default rotary tables: cos, sin of shape (batch, seq, head_dim), float32."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
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
  def __call__(self, x, allowed, cos, sin, *, deterministic: bool):
    cfg = self.config
    hd, heads, kv = cfg.dim_per_head, cfg.num_attention_heads, cfg.kv_heads
    dense = lambda n, name: nn.Dense(n, use_bias=cfg.attention_bias, dtype=cfg.dtype, name=name)
    q = dense(heads * hd, 'q_proj')(x).reshape(*x.shape[:-1], heads, hd)
    k = dense(kv * hd, 'k_proj')(x).reshape(*x.shape[:-1], kv, hd)
    v = dense(kv * hd, 'v_proj')(x).reshape(*x.shape[:-1], kv, hd)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    drop = cfg.attention_dropout
    key = None if deterministic or not drop else self.make_rng('dropout')
    out = common.attention(q, k, v, allowed[:, None], impl=cfg.attention,
                           chunk=cfg.attention_chunk, dropout_rate=drop, dropout_key=key)
    out = out.reshape(*x.shape[:-1], heads * hd)
    return dense(cfg.hidden_size, 'o_proj')(out)


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
  def __call__(self, x, allowed, cos, sin, deterministic: bool):
    cfg = self.config
    h = RMSNorm(cfg.rms_norm_eps, name='input_layernorm')(x)
    x = x + LlamaAttention(cfg, name='self_attn')(h, allowed, cos, sin, deterministic=deterministic)
    h = RMSNorm(cfg.rms_norm_eps, name='post_attention_layernorm')(x)
    return x + LlamaMLP(cfg, name='mlp')(h)


class LlamaForCausalLM(nn.Module):
  """Token ids (batch, seq) -> next-token logits (batch, seq, vocab), float32.

  Layers are an unrolled loop named layers_{i}, not nn.scan: per-layer paths for
  adapters; scan only compiles faster (2.5-3.5x at 32 layers, benchmarks/layer_stacking.py)."""
  config: LlamaConfig

  def setup(self):
    cfg = self.config
    self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype,
                                 embedding_init=nn.initializers.normal(0.02))
    # deterministic (argument 5, counting the module) is static under remat.
    layer_cls = common.maybe_remat(LlamaDecoderLayer, cfg.remat, static_argnums=(5,))
    self.layers = [layer_cls(cfg) for _ in range(cfg.num_hidden_layers)]
    self.norm = RMSNorm(cfg.rms_norm_eps)
    if not cfg.tie_word_embeddings:
      self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.dtype)

  def hidden_states(self, input_ids, attention_mask=None, position_ids=None, *,
                    deterministic: bool = True):
    """(batch, seq, hidden) after the final norm. attention_mask marks real tokens
    (1) and padding (0); position_ids default to 0..seq-1 as in HF."""
    cfg = self.config
    seq = input_ids.shape[-1]
    if position_ids is None:
      position_ids = jnp.broadcast_to(jnp.arange(seq), input_ids.shape)
    allowed = jnp.tril(jnp.ones((seq, seq), bool))[None]
    if attention_mask is not None:
      allowed = allowed & jnp.asarray(attention_mask).astype(bool)[:, None, :]
    cos, sin = rotary_cos_sin(position_ids, cfg.dim_per_head, cfg.rope_theta)
    x = self.embed_tokens(input_ids)
    for layer in self.layers:
      x = layer(x, allowed, cos, sin, deterministic)
    return self.norm(x)

  def __call__(self, input_ids, attention_mask=None, position_ids=None, *,
               deterministic: bool = True):
    x = self.hidden_states(input_ids, attention_mask, position_ids, deterministic=deterministic)
    if self.config.tie_word_embeddings:
      logits = self.embed_tokens.attend(x)
    else:
      logits = self.lm_head(x)
    return logits.astype(jnp.float32)


# --------------------------------------------------------------------------- #
# Importer and sharding
# --------------------------------------------------------------------------- #


def param_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
  return importers.param_shapes(LlamaForCausalLM(config), jnp.zeros((1, 4), jnp.int32))


def import_rules(config: LlamaConfig) -> list[importers.Rule]:
  """How each of our params is read from an HF LlamaForCausalLM checkpoint
  (interop.layouts reads the same table backwards to export)."""
  R, T = importers.Rule, importers.transpose
  rules = [R('embed_tokens/embedding', ('model.embed_tokens.weight',)),
           R('norm/scale', ('model.norm.weight',))]
  if not config.tie_word_embeddings:
    rules.append(R('lm_head/kernel', ('lm_head.weight',), T))
  projections = [('self_attn', n, config.attention_bias) for n in ('q_proj', 'k_proj', 'v_proj', 'o_proj')]
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
  """HF LlamaForCausalLM tensors (torch names, (out, in) weights) -> our params."""
  # Old checkpoints store the rotary buffer; a tied model may still carry lm_head.
  ignore = [r'model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq', r'model\.rotary_emb\.inv_freq']
  if config.tie_word_embeddings:
    ignore.append(r'lm_head\.weight')
  return importers.convert(state, import_rules(config), param_shapes(config), source=source,
                           model=f'LLaMA ({config.num_hidden_layers} layers, hidden '
                           f'{config.hidden_size})', ignore=ignore)


def load_llama(path, dtype=jnp.float32) -> tuple[LlamaConfig, dict]:
  """(config, params) from a HF LLaMA directory: config.json and model.safetensors
  or a sharded model.safetensors.index.json. `dtype`: parameters and activations."""
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
      (r'lm_head/kernel', P(None, 'model')),
      (r'.*', P()),
  ]
