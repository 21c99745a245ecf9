"""Vision Transformer with timm-like paths (one qkv Dense per block) and stochastic depth,
with importers for Google's original .npz and timm safetensors, resizing position embeddings."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from glora_jax.models import common, importers

# The 4 adapted layers of each block (48 in ViT-B): not the patch conv, not the head.
DEFAULT_TARGETS = r'blocks_\d+/(attn/(qkv|proj)|mlp/(fc1|fc2))/kernel'


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  image_size: int = 224
  patch_size: int = 16
  in_channels: int = 3
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  qkv_bias: bool = True
  num_classes: int = 1000  # 0: no head, the model returns pre-head features
  # Hidden Dense + tanh before the head, as in the original ImageNet-21k checkpoints.
  representation_size: int | None = None
  drop_path_rate: float = 0.0  # stochastic depth, linear from 0 to this over depth
  dropout_rate: float = 0.0  # after position embedding, attention proj and MLP
  attention_dropout_rate: float = 0.0
  layer_norm_eps: float = 1e-6
  dtype: Any = jnp.float32  # activations; parameters keep their own dtype
  remat: str = 'none'  # per-block remat policy, common.REMAT_POLICIES
  # Blocks under one nn.scan, params stacked under 'blocks' (models/stacking.py).
  scan_layers: bool = False
  attention: str = 'xla'  # common.ATTENTION_IMPLS; 'xla' is the one with attention dropout

  def __post_init__(self):
    common.check_choice('remat policy', self.remat, common.REMAT_POLICIES)
    common.check_choice('attention', self.attention, common.ATTENTION_IMPLS)
    if self.attention != 'xla' and self.attention_dropout_rate:
      raise ValueError(f"attention '{self.attention}' has no dropout; "
                       'attention_dropout_rate must be 0')
    if self.embed_dim % self.num_heads:
      raise ValueError(f'embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}')
    if self.image_size % self.patch_size:
      raise ValueError(f'image_size {self.image_size} is not divisible by patch_size '
                       f'{self.patch_size}')

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size


# (embed_dim, depth, num_heads, mlp_dim) of the ViT paper's (and DeiT's Ti/S) sizes.
PRESETS = {
    'Ti': (192, 12, 3, 768),
    'S': (384, 12, 6, 1536),
    'B': (768, 12, 12, 3072),
    'L': (1024, 24, 16, 4096),
}


def preset(name: str, **overrides) -> ViTConfig:
  """preset('B/16', num_classes=100, drop_path_rate=0.1): a size, optionally '/patch'."""
  size, _, patch = name.partition('/')
  if size not in PRESETS:
    raise ValueError(f"unknown ViT size '{size}' in '{name}'; expected one of {sorted(PRESETS)} "
                     "optionally followed by '/<patch size>', e.g. 'B/16'")
  dim, depth, heads, mlp = PRESETS[size]
  fields = dict(embed_dim=dim, depth=depth, num_heads=heads, mlp_dim=mlp)
  if patch:
    fields['patch_size'] = int(patch)
  fields.update(overrides)
  return ViTConfig(**fields)


# --------------------------------------------------------------------------- #
# Modules
# --------------------------------------------------------------------------- #


def drop_path_rates(config: ViTConfig) -> list[float]:
  """Stochastic-depth rate of each block: linear from 0 to drop_path_rate (timm)."""
  return [float(r) for r in np.linspace(0.0, config.drop_path_rate, config.depth)]


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per sample ('dropout' rng)."""
  rate: Any  # a float, or a traced scalar under scan

  def __call__(self, x, *, deterministic: bool):
    # A traced rate (a block's under scan) always draws; at rate 0 it keeps everything.
    if deterministic or (isinstance(self.rate, float) and self.rate == 0.0):
      return x
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng('dropout'), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    # In x's dtype: a traced float32 rate must not promote bf16 activations (a scan's
    # carry keeps its dtype), as a Python float rate does not.
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


class PatchEmbed(nn.Module):
  config: ViTConfig

  @nn.compact
  def __call__(self, images):
    cfg = self.config
    x = nn.Conv(cfg.embed_dim, (cfg.patch_size, cfg.patch_size), strides=cfg.patch_size,
                padding='VALID', dtype=cfg.dtype, name='proj')(images)
    # Row-major over (h, w), the order of timm's flatten(2) of an NCHW map.
    return x.reshape(x.shape[0], -1, cfg.embed_dim)


class Attention(nn.Module):
  config: ViTConfig

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    cfg = self.config
    heads, head_dim = cfg.num_heads, cfg.embed_dim // cfg.num_heads
    qkv = nn.Dense(3 * cfg.embed_dim, use_bias=cfg.qkv_bias, dtype=cfg.dtype, name='qkv')(x)
    # Output order is (q, k, v) x heads x head_dim, as timm's reshape(B, N, 3, H, D).
    q, k, v = jnp.moveaxis(qkv.reshape(*x.shape[:-1], 3, heads, head_dim), -3, 0)
    drop = cfg.attention_dropout_rate
    key = None if deterministic or not drop else self.make_rng('dropout')
    out = common.attention(q, k, v, impl=cfg.attention, dropout_rate=drop,
                           dropout_key=key).reshape(x.shape)
    out = nn.Dense(cfg.embed_dim, dtype=cfg.dtype, name='proj')(out)
    return common.Dropout(cfg.dropout_rate)(out, deterministic)


class Mlp(nn.Module):
  config: ViTConfig

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    cfg = self.config
    x = nn.gelu(nn.Dense(cfg.mlp_dim, dtype=cfg.dtype, name='fc1')(x), approximate=False)
    x = common.Dropout(cfg.dropout_rate)(x, deterministic)
    x = nn.Dense(cfg.embed_dim, dtype=cfg.dtype, name='fc2')(x)
    return common.Dropout(cfg.dropout_rate)(x, deterministic)


class Block(nn.Module):
  config: ViTConfig
  drop_path_rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool, rate=None):
    """(x, None): a scan body's (carry, output). `rate` (scanned: this block's
    stochastic-depth rate, an array) replaces drop_path_rate."""
    cfg = self.config
    rate = self.drop_path_rate if rate is None else rate
    norm = lambda name: nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, name=name)
    x = common.batch_sharded(x)
    y = Attention(cfg, name='attn')(norm('norm1')(x), deterministic=deterministic)
    x = common.batch_sharded(x + DropPath(rate, name='drop_path1')(y, deterministic=deterministic))
    y = Mlp(cfg, name='mlp')(norm('norm2')(x), deterministic=deterministic)
    y = DropPath(rate, name='drop_path2')(y, deterministic=deterministic)
    return common.batch_sharded(x + y), None


class VisionTransformer(nn.Module):
  """Images (batch, height, width, channels) -> logits (or features if num_classes=0).

  Blocks are an unrolled loop named blocks_{i}, or with config.scan_layers one nn.scan
  named blocks over stacked params (models/stacking.py converts; each block's
  stochastic-depth rate is scanned with it): the same outputs, one block's program."""
  config: ViTConfig

  def setup(self):
    cfg = self.config
    self.patch_embed = PatchEmbed(cfg)
    self.cls_token = self.param('cls_token', nn.initializers.zeros, (1, 1, cfg.embed_dim))
    self.pos_embed = self.param('pos_embed', nn.initializers.normal(0.02),
                                (1, cfg.grid_size ** 2 + 1, cfg.embed_dim))
    # A list attribute in setup names its modules blocks_0, blocks_1, ...
    # deterministic (argument 2, counting the module) is static under remat.
    if cfg.scan_layers:
      self.blocks = common.scanned(Block, cfg.remat, (2,), (nn.broadcast, 0), cfg.depth)(cfg, 0.0)
    else:
      block_cls = common.maybe_remat(Block, cfg.remat, static_argnums=(2,))
      self.blocks = [block_cls(cfg, r) for r in drop_path_rates(cfg)]
    self.norm = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype)
    self.pos_drop = common.Dropout(cfg.dropout_rate)
    if cfg.representation_size:
      self.pre_logits = nn.Dense(cfg.representation_size, dtype=cfg.dtype)
    if cfg.num_classes:
      # Zero head, as the original ViT fine-tuning: training starts at uniform logits.
      self.head = nn.Dense(cfg.num_classes, dtype=cfg.dtype, kernel_init=nn.initializers.zeros)

  def features(self, images, *, deterministic: bool = True):
    """The class token after the final norm (and pre_logits): the head's input."""
    cfg = self.config
    images = jnp.asarray(images, cfg.dtype)
    if images.shape[1:] != (cfg.image_size, cfg.image_size, cfg.in_channels):
      raise ValueError(f'images have shape {images.shape}; expected (batch, {cfg.image_size}, '
                       f'{cfg.image_size}, {cfg.in_channels}) (NHWC)')
    x = self.patch_embed(images)
    cls = jnp.broadcast_to(self.cls_token.astype(x.dtype), (x.shape[0], 1, cfg.embed_dim))
    x = jnp.concatenate([cls, x], axis=1) + self.pos_embed.astype(x.dtype)
    x = self.pos_drop(x, deterministic=deterministic)
    if cfg.scan_layers:
      x, _ = self.blocks(x, deterministic, jnp.asarray(drop_path_rates(cfg), jnp.float32))
    else:
      for block in self.blocks:
        x, _ = block(x, deterministic)
    x = self.norm(x)[:, 0]
    if cfg.representation_size:
      x = jnp.tanh(self.pre_logits(x))
    return x

  def __call__(self, images, *, deterministic: bool = True):
    x = self.features(images, deterministic=deterministic)
    return self.head(x) if self.config.num_classes else x


# --------------------------------------------------------------------------- #
# Parameters: shapes, fresh head, position embedding resizing
# --------------------------------------------------------------------------- #


def param_shapes(config: ViTConfig) -> dict[str, tuple[int, ...]]:
  """The per-layer layout's shapes (what files hold), scan_layers or not."""
  config = dataclasses.replace(config, scan_layers=False)
  images = jnp.zeros((1, config.image_size, config.image_size, config.in_channels))
  return importers.param_shapes(VisionTransformer(config), images)


def init_head(config: ViTConfig, key=None) -> dict:
  """Parameters of a fresh (zero) head of `config.num_classes` outputs."""
  del key  # the head starts at zero; the argument keeps one signature across models
  width = config.representation_size or config.embed_dim
  return {'kernel': jnp.zeros((width, config.num_classes)), 'bias': jnp.zeros((config.num_classes,))}


def add_head(backbone: Mapping[str, Any], config: ViTConfig, key=None) -> dict:
  """Backbone params (as the importers return them) plus a fresh head."""
  if 'head' in backbone:
    raise ValueError("backbone params already have a 'head'")
  if not config.num_classes:
    raise ValueError('config.num_classes is 0: the model has no head')
  return {**backbone, 'head': init_head(config, key)}


def resize_pos_embed(pos_embed, grid: int | Sequence[int], *, num_prefix_tokens: int = 1,
                     method: str = 'bilinear'):
  """(1, prefix + h*w, dim) -> (1, prefix + H*W, dim) by interpolating the grid.

  The class token's embedding is kept. 'bilinear' equals torch's F.interpolate
  (align_corners=False, no antialias), as timm's loader uses; jax's 'bicubic' is
  Keys' cubic with a=-0.5 (PIL, TF), torch's uses a=-0.75: close, not equal."""
  pos_embed = np.asarray(pos_embed)
  new_h, new_w = (grid, grid) if isinstance(grid, int) else tuple(grid)
  prefix, tokens = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
  old = int(round(np.sqrt(tokens.shape[1])))
  if pos_embed.ndim != 3 or pos_embed.shape[0] != 1 or old * old != tokens.shape[1]:
    raise ValueError(f'position embedding has shape {pos_embed.shape}; expected (1, '
                     f'{num_prefix_tokens} + a square grid of tokens, dim)')
  if (old, old) == (new_h, new_w):
    return pos_embed
  grid_embed = tokens.reshape(old, old, -1).astype(np.float32)
  resized = jax.image.resize(grid_embed, (new_h, new_w, grid_embed.shape[-1]), method=method,
                             antialias=False)
  resized = np.asarray(resized, pos_embed.dtype).reshape(1, new_h * new_w, -1)
  return np.concatenate([prefix, resized], axis=1)


# --------------------------------------------------------------------------- #
# Importers
# --------------------------------------------------------------------------- #


def _pos_embed_transform(config: ViTConfig, method: str):
  return lambda x: resize_pos_embed(x.reshape(1, -1, x.shape[-1]), config.grid_size,
                                    method=method)


def _heads_merged(x):
  """(dim, heads, head_dim) -> (dim, heads*head_dim); (heads, head_dim) -> flat."""
  return x.reshape(x.shape[0], -1) if x.ndim == 3 else x.reshape(-1)


def npz_import_rules(config: ViTConfig, prefix: str, method: str, load_head: bool):
  """How each of our params is read from a big_vision / original ViT .npz checkpoint."""
  R = importers.Rule
  p = prefix
  rules = [
      R('patch_embed/proj/kernel', (f'{p}embedding/kernel',)),
      R('patch_embed/proj/bias', (f'{p}embedding/bias',)),
      R('cls_token', (f'{p}cls',)),
      R('pos_embed', (f'{p}Transformer/posembed_input/pos_embedding',),
        _pos_embed_transform(config, method)),
      R('norm/scale', (f'{p}Transformer/encoder_norm/scale',)),
      R('norm/bias', (f'{p}Transformer/encoder_norm/bias',)),
  ]
  for i in range(config.depth):
    b, ours = f'{p}Transformer/encoderblock_{i}/', f'blocks_{i}/'
    mha = b + 'MultiHeadDotProductAttention_1/'
    for leaf in ('scale', 'bias'):
      rules.append(R(ours + f'norm1/{leaf}', (b + f'LayerNorm_0/{leaf}',)))
      rules.append(R(ours + f'norm2/{leaf}', (b + f'LayerNorm_2/{leaf}',)))
    leaves = ('kernel', 'bias') if config.qkv_bias else ('kernel',)
    for leaf in leaves:
      rules.append(R(ours + f'attn/qkv/{leaf}', tuple(mha + f'{n}/{leaf}' for n in ('query', 'key', 'value')),
                     lambda q, k, v: np.concatenate([_heads_merged(t) for t in (q, k, v)], axis=-1)))
    # out kernel (heads, head_dim, dim) -> (dim_in, dim)
    rules.append(R(ours + 'attn/proj/kernel', (mha + 'out/kernel',),
                   lambda x: x.reshape(-1, x.shape[-1])))
    rules.append(R(ours + 'attn/proj/bias', (mha + 'out/bias',)))
    for j, fc in enumerate(('fc1', 'fc2')):
      for leaf in ('kernel', 'bias'):
        rules.append(R(ours + f'mlp/{fc}/{leaf}', (b + f'MlpBlock_3/Dense_{j}/{leaf}',)))
  if config.representation_size:
    rules += [R(f'pre_logits/{l}', (f'{p}pre_logits/{l}',)) for l in ('kernel', 'bias')]
  if load_head:
    rules += [R(f'head/{l}', (f'{p}head/{l}',)) for l in ('kernel', 'bias')]
  return rules


def timm_import_rules(config: ViTConfig, method: str, load_head: bool):
  """How each of our params is read from a timm ViT state dict (interop.layouts reads
  the same table backwards to export)."""
  R, T = importers.Rule, importers.transpose
  rules = [
      # torch conv (out, in, kh, kw) -> Flax (kh, kw, in, out)
      R('patch_embed/proj/kernel', ('patch_embed.proj.weight',), lambda x: x.transpose(2, 3, 1, 0)),
      R('patch_embed/proj/bias', ('patch_embed.proj.bias',)),
      R('cls_token', ('cls_token',)),
      R('pos_embed', ('pos_embed',), _pos_embed_transform(config, method)),
      R('norm/scale', ('norm.weight',)),
      R('norm/bias', ('norm.bias',)),
  ]
  dense = ['attn.qkv', 'attn.proj', 'mlp.fc1', 'mlp.fc2']
  for i in range(config.depth):
    for name in dense:
      ours = f"blocks_{i}/{name.replace('.', '/')}"
      rules.append(R(f'{ours}/kernel', (f'blocks.{i}.{name}.weight',), T))
      if name != 'attn.qkv' or config.qkv_bias:
        rules.append(R(f'{ours}/bias', (f'blocks.{i}.{name}.bias',)))
    for norm in ('norm1', 'norm2'):
      rules.append(R(f'blocks_{i}/{norm}/scale', (f'blocks.{i}.{norm}.weight',)))
      rules.append(R(f'blocks_{i}/{norm}/bias', (f'blocks.{i}.{norm}.bias',)))
  if config.representation_size:
    rules += [R('pre_logits/kernel', ('pre_logits.fc.weight',), T),
              R('pre_logits/bias', ('pre_logits.fc.bias',))]
  if load_head:
    rules += [R('head/kernel', ('head.weight',), T), R('head/bias', ('head.bias',))]
  return rules


def _describe(config: ViTConfig) -> str:
  return (f'ViT (dim {config.embed_dim}, depth {config.depth}, heads {config.num_heads}, '
          f'patch {config.patch_size})')


def convert_npz(checkpoint: Mapping[str, np.ndarray], config: ViTConfig, *, load_head: bool = False,
                resize: str = 'bilinear', ignore: Sequence[str] = (), source: str = 'checkpoint') -> dict:
  """Google's original ViT layout ('Transformer/encoderblock_0/...') -> our params."""
  prefix = next((p for p in ('opt/target/', 'params/') if f'{p}embedding/kernel' in checkpoint), '')
  ignore = list(ignore) + ([] if load_head else [rf'{prefix}head/.*'])
  return importers.convert(checkpoint, npz_import_rules(config, prefix, resize, load_head),
                           param_shapes(config), source=source, model=_describe(config),
                           ignore=ignore, optional=[] if load_head else ['head/.*'])


def convert_timm(state: Mapping[str, np.ndarray], config: ViTConfig, *, load_head: bool = False,
                 resize: str = 'bilinear', ignore: Sequence[str] = (), source: str = 'checkpoint') -> dict:
  """A timm VisionTransformer state dict (torch names and layouts) -> our params."""
  ignore = list(ignore) + ([] if load_head else [r'head\..*'])
  return importers.convert(state, timm_import_rules(config, resize, load_head),
                           param_shapes(config), source=source, model=_describe(config),
                           ignore=ignore,
                           optional=[] if load_head else ['head/.*'])


def load_npz(path, config: ViTConfig, *, load_head: bool = False, resize: str = 'bilinear',
             ignore: Sequence[str] = (), dtype=jnp.float32) -> dict:
  """Params from an original ViT / AugReg `.npz` (e.g. ImageNet-21k `ViT-B_16.npz`).

  Without `load_head` the checkpoint's head is dropped and the params have no
  'head' (see `add_head`). The position embedding is resized to `config.image_size`
  with `resize`. A checkpoint's `pre_logits` layer needs `config.representation_size`
  or `ignore=('pre_logits/.*',)` (timm drops it). Every mismatch raises one ValueError."""
  return importers.cast(convert_npz(importers.read_npz(path), config, load_head=load_head,
                                    resize=resize, ignore=ignore, source=str(path)), dtype)


def load_timm(path, config: ViTConfig, *, load_head: bool = False, resize: str = 'bilinear',
              ignore: Sequence[str] = (), dtype=jnp.float32) -> dict:
  """Params from a timm VisionTransformer state dict saved as safetensors; as `load_npz`."""
  return importers.cast(convert_timm(importers.read_safetensors(path), config, load_head=load_head,
                                     resize=resize, ignore=ignore, source=str(path)), dtype)


# --------------------------------------------------------------------------- #
# timm's config.json (hub format), both ways
# --------------------------------------------------------------------------- #

# (embed_dim, depth, num_heads, mlp_ratio) of timm's plain ViT sizes.
_TIMM_SIZES = {
    'base': (768, 12, 12, 4.0),
    'small': (384, 12, 6, 4.0),
    'tiny': (192, 12, 3, 4.0),
    'large': (1024, 24, 16, 4.0),
    'huge': (1280, 32, 16, 4.0),
    'giant': (1408, 40, 16, 48 / 11),
    'gigantic': (1664, 48, 16, 64 / 13),
}
# (patch, image) of each size's plain entrypoint 'vit_<size>_patch<P>_<I>' in timm 1.0.31.
_TIMM_VARIANTS = {
    'base': ((16, 224), (16, 384), (8, 224), (32, 224), (32, 384)),
    'small': ((16, 224), (16, 384), (8, 224), (32, 224), (32, 384)),
    'tiny': ((16, 224), (16, 384)),
    'large': ((16, 224), (16, 384), (14, 224), (32, 224), (32, 384)),
    'huge': ((14, 224),), 'giant': ((14, 224),), 'gigantic': ((14, 224),),
}
# timm's registered ViTs whose entrypoints set nothing but these shapes, so that
# model_args (which override them) fully decide the model. scripts/make_torch_fixtures.py
# ('vit_export') checks each against timm.
TIMM_ARCHITECTURES = {
    f'vit_{size}_patch{patch}_{image}': dict(
        img_size=image, patch_size=patch, embed_dim=_TIMM_SIZES[size][0],
        depth=_TIMM_SIZES[size][1], num_heads=_TIMM_SIZES[size][2],
        mlp_ratio=_TIMM_SIZES[size][3])
    for size, variants in _TIMM_VARIANTS.items() for patch, image in variants
}
# timm's ViT LayerNorm; a config.json cannot set another eps.
TIMM_LAYER_NORM_EPS = 1e-6
# The preprocessing of data/vtab.py (bicubic resize to the full size, ImageNet mean/std):
# timm's data transforms read it from pretrained_cfg; no model reads it.
_TIMM_INPUT = {'interpolation': 'bicubic', 'crop_pct': 1.0, 'crop_mode': 'squash',
               'mean': [0.485, 0.456, 0.406], 'std': [0.229, 0.224, 0.225]}
# model_args that we read into ViTConfig.
_TIMM_READ_ARGS = ('img_size', 'patch_size', 'in_chans', 'embed_dim', 'depth', 'num_heads',
                   'mlp_ratio', 'qkv_bias', 'num_classes')
# model_args of timm's VisionTransformer that we accept only at values giving our ViT.
_TIMM_FIXED_ARGS = {
    'class_token': (True,), 'global_pool': ('token',), 'representation_size': (None, 0),
    'qk_norm': (False,), 'proj_bias': (True,), 'init_values': (None,), 'pos_embed': ('learn',),
    'no_embed_class': (False,), 'reg_tokens': (0,), 'pre_norm': (False,), 'final_norm': (True,),
    'fc_norm': (None, False), 'pool_include_prefix': (False,), 'scale_attn_norm': (False,),
    'scale_mlp_norm': (False,), 'dynamic_img_pad': (False,), 'embed_norm_layer': (None,),
    'norm_layer': (None, 'layernorm'), 'act_layer': (None, 'gelu'),
}
_TIMM_FIXED_WHY = {'class_token': 'the head reads the class token',
                   'global_pool': 'the head reads the class token',
                   'representation_size': 'a pre_logits layer has no timm layout'}
# model_args that only change training, initialisation or other input sizes, not the
# function at the model's own image size.
_TIMM_IGNORED_ARGS = ('weight_init', 'fix_init', 'dynamic_img_size', 'strict_img_size')


def _timm_architecture(config: ViTConfig) -> str:
  """The registered plain timm ViT of config's patch size, preferring its image size and
  then its width and depth; 'vit_base_patch16_224' when no name has the patch size."""
  dims = (config.embed_dim, config.depth, config.num_heads, config.mlp_dim / config.embed_dim)

  def match(name):
    a = TIMM_ARCHITECTURES[name]
    return (a['patch_size'] == config.patch_size, a['img_size'] == config.image_size,
            (a['embed_dim'], a['depth'], a['num_heads'], a['mlp_ratio']) == dims)

  best = max(TIMM_ARCHITECTURES, key=match)
  return best if match(best)[0] else 'vit_base_patch16_224'


def to_timm(config: ViTConfig, dtype=jnp.float32) -> dict:
  """config.json in timm's hub format, for `timm.create_model('local-dir:<dir>',
  pretrained=True)` with model.safetensors (timm's key names) beside it.

  `model_args` carry every shape, so any size builds; `architecture` is the registered
  plain ViT nearest in patch and image size, a name only (model_args override its
  shapes). Top-level and pretrained_cfg num_classes equal model_args', so timm keeps the
  head. pretrained_cfg records ImageNet mean/std (0.485, 0.456, 0.406) / (0.229, 0.224,
  0.225), bicubic, crop_pct 1.0, as data/vtab.py preprocesses: timm's data transforms
  read it; our model takes images the caller normalised and its logits do not depend on
  it. 'glora_jax' (ignored by timm) records the weights' `dtype`. A config timm cannot
  build the same is a ValueError naming the field."""
  problems = []
  if config.representation_size:
    problems.append(f'representation_size {config.representation_size}: timm\'s '
                    'VisionTransformer has no pre_logits layer; expected None')
  if config.layer_norm_eps != TIMM_LAYER_NORM_EPS:
    problems.append(f"layer_norm_eps {config.layer_norm_eps}: timm's ViT LayerNorm has eps "
                    f'{TIMM_LAYER_NORM_EPS} and config.json cannot set another')
  mlp_ratio = config.mlp_dim / config.embed_dim
  if int(config.embed_dim * mlp_ratio) != config.mlp_dim:
    problems.append(f'mlp_dim {config.mlp_dim}: timm builds int(embed_dim * mlp_ratio) = '
                    f'{int(config.embed_dim * mlp_ratio)}')
  if problems:
    raise ValueError(f'{_describe(config)} has no timm config: ' + '; '.join(problems))
  size = config.image_size
  return {
      'architecture': _timm_architecture(config),
      'num_classes': config.num_classes,
      'num_features': config.embed_dim,
      'global_pool': 'token',
      'model_args': {
          'img_size': size, 'patch_size': config.patch_size, 'in_chans': config.in_channels,
          'embed_dim': config.embed_dim, 'depth': config.depth, 'num_heads': config.num_heads,
          'mlp_ratio': mlp_ratio, 'qkv_bias': config.qkv_bias,
          'num_classes': config.num_classes, 'global_pool': 'token', 'class_token': True,
      },
      'pretrained_cfg': {
          'custom_load': False, 'input_size': [config.in_channels, size, size],
          'fixed_input_size': True, **_TIMM_INPUT, 'num_classes': config.num_classes,
          'pool_size': None, 'first_conv': 'patch_embed.proj', 'classifier': 'head',
      },
      'glora_jax': {'dtype': jnp.dtype(dtype).name},
  }


def _square(value, field: str, problems: list[str]) -> int | None:
  """An int, or a (h, w) pair with h == w, as timm writes img_size and patch_size."""
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      problems.append(f'{field} {list(value)}: our ViT is square; expected an int or [n, n]')
      return None
    value = value[0]
  return int(value)


def _timm_args_problems(args: Mapping[str, Any]) -> list[str]:
  """What in timm's model_args builds a ViT other than ours."""
  problems = []
  for key, value in args.items():
    if key in _TIMM_FIXED_ARGS and value not in _TIMM_FIXED_ARGS[key]:
      allowed = ' or '.join(repr(v) for v in _TIMM_FIXED_ARGS[key])
      why = f' ({_TIMM_FIXED_WHY[key]})' if key in _TIMM_FIXED_WHY else ''
      problems.append(f'model_args {key}={value!r}: our ViT needs {allowed}{why}')
    elif key not in (*_TIMM_READ_ARGS, *_TIMM_FIXED_ARGS, *_TIMM_IGNORED_ARGS) \
        and not key.endswith('drop_rate'):
      problems.append(f"model_args '{key}' is not a VisionTransformer argument we read; we "
                      f'read {", ".join(_TIMM_READ_ARGS + tuple(_TIMM_FIXED_ARGS))}')
  return problems


def from_timm(config_json: Mapping[str, Any], source: str = 'config.json') -> ViTConfig:
  """The ViTConfig of a timm config.json: `to_timm`'s, our older exports' (model_args
  without pretrained_cfg) or timm's own for a plain ViT (shapes from the architecture
  name, image size from pretrained_cfg, where model_args do not give them).

  Execution fields (dtype, remat, attention, dropout rates) keep their defaults. What we
  cannot build (another architecture, pre_logits, global_pool other than 'token', no
  class token, ...) is one ValueError naming each field."""
  arch = str(config_json.get('architecture', ''))
  defaults = TIMM_ARCHITECTURES.get(arch.partition('.')[0])  # a '.tag' names weights only
  if defaults is None:
    raise ValueError(f"{source}: architecture '{arch}' is not a plain timm ViT; expected "
                     "'vit_<size>_patch<P>_<I>' with size tiny, small, base, large, huge, "
                     "giant or gigantic, e.g. 'vit_base_patch16_224'")
  args = dict(config_json.get('model_args') or {})
  # timm's older hub format keeps the pretrained_cfg fields at the top level.
  pretrained = config_json.get('pretrained_cfg', config_json)
  problems = _timm_args_problems(args)
  pool = config_json.get('global_pool', 'token')
  if pool != 'token' and 'global_pool' not in args:
    problems.append(f"global_pool {pool!r}: our ViT classifies the class token; expected 'token'")
  input_size = pretrained.get('input_size') or [3, defaults['img_size'], defaults['img_size']]
  if 'img_size' not in args and input_size[1] != input_size[2]:
    problems.append(f'pretrained_cfg input_size {list(input_size)}: our ViT is square')
  image = _square(args.get('img_size', input_size[1]), 'img_size', problems)
  patch = _square(args.get('patch_size', defaults['patch_size']), 'patch_size', problems)
  dim = int(args.get('embed_dim', defaults['embed_dim']))
  # timm drops the checkpoint's head when the classes it records differ from the model's.
  recorded = config_json.get('num_classes', pretrained.get('num_classes'))
  classes = args.get('num_classes', 1000 if recorded is None else recorded)
  recorded = classes if recorded is None else recorded
  if recorded != classes:
    problems.append(f'num_classes {recorded} but model_args num_classes {classes}: timm '
                    'would drop the head')
  if config_json.get('num_features', dim) != dim:
    problems.append(f"num_features {config_json['num_features']} but embed_dim {dim}: the "
                    'features of a ViT are its embed_dim')
  if problems:
    raise ValueError(f'{source} describes a ViT we cannot build: ' + '; '.join(problems))
  try:
    return ViTConfig(
        image_size=image, patch_size=patch, in_channels=int(args.get('in_chans', input_size[0])),
        embed_dim=dim, depth=int(args.get('depth', defaults['depth'])),
        num_heads=int(args.get('num_heads', defaults['num_heads'])),
        mlp_dim=int(dim * float(args.get('mlp_ratio', defaults['mlp_ratio']))),  # timm's rule
        qkv_bias=bool(args.get('qkv_bias', True)), num_classes=int(classes),
        layer_norm_eps=float(config_json.get('glora_jax', {}).get('layer_norm_eps',
                                                                  TIMM_LAYER_NORM_EPS)))
  except ValueError as e:
    raise ValueError(f'{source} describes a ViT we cannot build: {e}') from None


def partition_rules() -> list[tuple[str, P]]:
  """(path regex, PartitionSpec) over a ('data', 'model') mesh, first match wins."""
  return [
      (r'.*/attn/qkv/kernel', P(None, 'model')),
      (r'.*/attn/qkv/bias', P('model')),
      (r'.*/mlp/fc1/kernel', P(None, 'model')),
      (r'.*/mlp/fc1/bias', P('model')),
      (r'.*/(attn/proj|mlp/fc2)/kernel', P('model', None)),
      (r'patch_embed/proj/kernel', P(None, None, None, 'model')),
      (r'.*', P()),
  ]
