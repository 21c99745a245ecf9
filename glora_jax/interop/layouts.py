"""Where each of our models lives in PyTorch: the rule table its importer reads (read
backwards to export), and its config.json both ways (HF transformers, timm).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from glora_jax import errors
from glora_jax.models import bert, importers, llama, vit

# Our BertClassifier's head on top of HF's BertModel: logits = head(mean of
# last_hidden_state over the attention mask). HF's BertModel has no such module; the
# name 'head' is ours, the key 'head.weight' is where PEFT's modules_to_save puts it.
BERT_HEAD_RULES = (importers.Rule('head/kernel', ('head.weight',), importers.transpose),
                   importers.Rule('head/bias', ('head.bias',)))
# A HF BERT checkpoint's pooler and position_ids buffer are not kept (bert._IGNORED), so
# exports leave them out.


@dataclasses.dataclass(frozen=True)
class Layout:
  """One model in its PyTorch home. `rules`: the importer's table (checkpoint key <->
  our path, transform), which `read` (the importer itself) reads forwards and
  `importers.invert` backwards; `optional`: our paths that may be absent (a head not
  yet added); `config_json`: the config.json written beside the weights."""
  library: str  # 'hf' (transformers) or 'timm'
  description: str
  rules: tuple[importers.Rule, ...]
  optional: tuple[str, ...]
  config_json: dict
  read: Callable[[Mapping[str, np.ndarray], str], dict]  # (state dict, source) -> params


def _read_bert(model: bert.BertClassifier, state: Mapping[str, np.ndarray], source: str) -> dict:
  """bert.convert_hf for the backbone, the head rules for 'head.*' when present."""
  head_keys = [r.sources[0] for r in BERT_HEAD_RULES]
  params = bert.convert_hf({k: v for k, v in state.items() if k not in head_keys},
                           model.config, source=source)
  if any(k in state for k in head_keys):
    shapes = {'head/kernel': (model.config.hidden_size, model.num_classes),
              'head/bias': (model.num_classes,)}
    params['head'] = importers.convert({k: state[k] for k in head_keys if k in state},
                                       BERT_HEAD_RULES, shapes, source=source,
                                       model=f'a head of {model.num_classes} classes')['head']
  return params


def _dtype_name(dtype) -> str:
  return jnp.dtype(dtype).name


def layout(model: nn.Module, dtype=jnp.float32) -> Layout:
  """The layout of a BertClassifier, LlamaForCausalLM or VisionTransformer; `dtype`
  is the weights' dtype, written to config.json."""
  if isinstance(model, bert.BertClassifier):
    c = model.config
    fields = {f.name: getattr(c, f.name) for f in dataclasses.fields(c)
              if f.name not in ('dtype', 'remat')}
    config = {'architectures': ['BertModel'], 'model_type': 'bert', 'hidden_act': 'gelu',
              'position_embedding_type': 'absolute', **fields, 'torch_dtype': _dtype_name(dtype),
              'glora_jax': {'num_classes': model.num_classes,
                            'head': 'logits = head(mean of last_hidden_state over the '
                                    'attention mask); head.weight is (num_classes, hidden)'}}
    return Layout('hf', f'HF BertModel ({c.num_hidden_layers} layers, hidden {c.hidden_size})',
                  tuple(bert.import_rules(c)) + BERT_HEAD_RULES, ('head/.*',), config,
                  lambda state, source: _read_bert(model, state, source))
  if isinstance(model, llama.LlamaForCausalLM):
    c = model.config
    config = {'architectures': ['LlamaForCausalLM'], 'model_type': 'llama', 'hidden_act': 'silu',
              'vocab_size': c.vocab_size, 'hidden_size': c.hidden_size,
              'intermediate_size': c.intermediate_size, 'num_hidden_layers': c.num_hidden_layers,
              'num_attention_heads': c.num_attention_heads, 'num_key_value_heads': c.kv_heads,
              'head_dim': c.dim_per_head, 'rms_norm_eps': c.rms_norm_eps,
              'rope_theta': c.rope_theta, 'max_position_embeddings': c.max_position_embeddings,
              'tie_word_embeddings': c.tie_word_embeddings, 'attention_bias': c.attention_bias,
              'mlp_bias': c.mlp_bias, 'attention_dropout': c.attention_dropout,
              'pretraining_tp': 1, 'torch_dtype': _dtype_name(dtype)}
    return Layout('hf', f'HF LlamaForCausalLM ({c.num_hidden_layers} layers, hidden '
                  f'{c.hidden_size}, attention_bias={c.attention_bias}, mlp_bias={c.mlp_bias})',
                  tuple(llama.import_rules(c)), (), config,
                  lambda state, source: llama.convert_hf(state, c, source=source))
  if isinstance(model, vit.VisionTransformer):
    c = model.config
    if c.representation_size:
      raise errors.ExportError('a ViT with a pre_logits layer (representation_size) has no '
                               'timm layout: timm dropped pre_logits')
    config = {'architecture': 'vit_base_patch16_224', 'num_classes': c.num_classes,
              'num_features': c.embed_dim, 'global_pool': 'token',
              'model_args': {'img_size': c.image_size, 'patch_size': c.patch_size,
                             'in_chans': c.in_channels, 'embed_dim': c.embed_dim,
                             'depth': c.depth, 'num_heads': c.num_heads,
                             'mlp_ratio': c.mlp_dim / c.embed_dim, 'qkv_bias': c.qkv_bias,
                             'num_classes': c.num_classes},
              'glora_jax': {'layer_norm_eps': c.layer_norm_eps, 'dtype': _dtype_name(dtype)}}
    head = bool(c.num_classes)
    return Layout('timm', f'timm VisionTransformer (dim {c.embed_dim}, depth {c.depth})',
                  tuple(vit.timm_import_rules(c, 'bilinear', load_head=head)), (), config,
                  lambda state, source: vit.convert_timm(state, c, load_head=head, source=source))
  raise errors.ExportError(f'{type(model).__name__} has no PyTorch layout; known: BertClassifier '
                           '(HF BertModel), LlamaForCausalLM (HF), VisionTransformer (timm)')


def model_from_config(config: Mapping[str, Any], source: str = 'config.json') -> nn.Module:
  """Inverse of `layout(model).config_json`: the model a written config.json describes."""
  try:
    if config.get('model_type') == 'bert':
      extra = config.get('glora_jax', {})
      return bert.BertClassifier(bert.BertConfig.from_hf(config, source=source),
                                 int(extra.get('num_classes', 0)))
    if config.get('model_type') == 'llama':
      return llama.LlamaForCausalLM(llama.LlamaConfig.from_hf(config, source=source))
    if 'model_args' in config:
      a, extra = config['model_args'], config.get('glora_jax', {})
      return vit.VisionTransformer(vit.ViTConfig(
          image_size=a['img_size'], patch_size=a['patch_size'], in_channels=a['in_chans'],
          embed_dim=a['embed_dim'], depth=a['depth'], num_heads=a['num_heads'],
          mlp_dim=int(round(a['mlp_ratio'] * a['embed_dim'])), qkv_bias=a['qkv_bias'],
          num_classes=a['num_classes'], layer_norm_eps=extra.get('layer_norm_eps', 1e-6)))
  except (KeyError, TypeError, ValueError) as e:
    raise errors.ExportError(f'{source} does not describe a model we can build: {e}') from None
  raise errors.ExportError(f"{source} describes neither a HF BERT or LLaMA ('model_type') nor a "
                           "timm ViT ('model_args')")
