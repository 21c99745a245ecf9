"""Model families by name: what is specific to each family, in one table.

A family's entry holds its config.json both ways, its import rules (read forwards to
import, backwards to export), partition rules, default adapter targets, the batch
inputs its module takes, the bias flags a merged layer may need and the files an
export carries. It is looked up by `config.model.name`, by a checkpoint's own
config.json (HF `model_type`, timm's `architecture`) or by a built module; tasks,
setup, search/export and interop read the table and never branch on a family's name.
Models never import adapters: the forward that runs adapters is built from the entry
by `glora_jax.train.tasks.make_forward`.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from glora_jax import bundled
from glora_jax.models import bert, importers, llama, stacking, vit

CONFIG = 'config.json'
# The files of a HF model directory, besides weights and config, that its tokenizer reads.
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json',
                   'vocab.txt', 'vocab.json', 'merges.txt', 'tokenizer.model')
# Fields of a model config that change how a model computes, never what: a run's
# config.model sets them on any family that has them.
EXECUTION_FIELDS = ('remat', 'attention', 'attention_chunk', 'scan_layers')


@dataclasses.dataclass(frozen=True)
class Family:
  """One model family: a linen module and its config, and its PyTorch home.

  read_config / write_config: the home library's config.json <-> our module (with its
  head, if the file describes one). rules: the importer's table for a built module
  (head included when it has one), read forwards by `read` and backwards by
  `importers.invert`. inputs: a batch -> the module's positional and keyword inputs.
  new_config: a run's config.model fields -> the config of a randomly initialised
  model (tests, training from scratch). bias_flags: config field -> regex of the Dense
  layer paths whose bias that field switches on; bias_fallback: config -> the config of
  a family of the same module whose layout holds the biases this one cannot.
  layer_path: regex whose group 1 is a repeated block's index."""
  name: str
  task: str  # the task its outputs serve
  library: str  # 'hf' (transformers) or 'timm': the export's folder name
  module: type[nn.Module]
  config_cls: type
  describes: Callable[[Mapping[str, Any]], bool]  # does a config.json describe this family
  read_config: Callable[[Mapping[str, Any], str], nn.Module]
  write_config: Callable[[nn.Module, Any], dict]
  rules: Callable[[nn.Module], Sequence[importers.Rule]]
  read: Callable[[nn.Module, Mapping[str, np.ndarray], str], dict]
  example_inputs: Callable[[Any], tuple]
  inputs: Callable[[Mapping[str, Any]], tuple[tuple, dict]]
  partition_rules: Callable[[], list[tuple[str, P]]]
  default_targets: str
  new_config: Callable[[Any, int], Any]  # (config.model, max_len) -> config
  with_classes: Callable[[Any, int], nn.Module]  # (config, num_classes) -> module
  init_head: Callable[[nn.Module, Any], dict] | None  # (module, key) -> head params
  layer_path: str
  depth_field: str
  dropout_fields: tuple[str, ...] = ()
  bias_flags: Mapping[str, str] = dataclasses.field(default_factory=dict)
  bias_fallback: Callable[[Any], Any] | None = None
  export_files: tuple[str, ...] = ()
  optional: tuple[str, ...] = ()  # our paths an export may lack (a head not yet added)
  # (path, config, dtype) -> params of a weights file that is not a model directory
  load_file: Callable[[str, Any, Any], dict] | None = None
  # (config, batch, max_len) -> an empty KV cache the module's cache= argument fills
  # (glora_jax.generate); None: the family does not generate
  init_cache: Callable[[Any, int, int], Any] | None = None

  def describe(self, model: nn.Module) -> str:
    c = model.config
    flags = ''.join(f', {f}={getattr(c, f)}' for f in self.bias_flags)
    return f'{self.name} ({getattr(c, self.depth_field)} layers{flags})'


# --------------------------------------------------------------------------- #
# Encoders: BERT and RoBERTa (one module, bert.BertClassifier)
# --------------------------------------------------------------------------- #

# Our BertClassifier's head on top of HF's BertModel: logits = head(mean of
# last_hidden_state over the attention mask). The name 'head' is ours; 'head.weight' is
# where PEFT's modules_to_save puts it.
_ENCODER_HEAD_RULES = (importers.Rule('head/kernel', ('head.weight',), importers.transpose),
                       importers.Rule('head/bias', ('head.bias',)))
_ENCODER_HEAD_NOTE = ('logits = head(mean of last_hidden_state over the attention mask); '
                      'head.weight is (num_classes, hidden)')


def _read_encoder(hf: Mapping[str, Any], source: str) -> nn.Module:
  extra = hf.get('glora_jax', {})
  return bert.BertClassifier(bert.BertConfig.from_hf(hf, source=source),
                             int(extra.get('num_classes', 0)))


def _write_encoder(model: bert.BertClassifier, dtype) -> dict:
  config = bert.to_hf(model.config, dtype)
  if model.num_classes:
    config['glora_jax'] = {'num_classes': model.num_classes, 'head': _ENCODER_HEAD_NOTE}
  return config


def _encoder_rules(model: bert.BertClassifier):
  return tuple(bert.import_rules(model.config)) + (_ENCODER_HEAD_RULES if model.num_classes else ())


def _read_encoder_params(model: bert.BertClassifier, state, source: str) -> dict:
  """bert.convert_hf for the backbone, the head rules for 'head.*' when present."""
  head_keys = [r.sources[0] for r in _ENCODER_HEAD_RULES]
  params = bert.convert_hf({k: v for k, v in state.items() if k not in head_keys},
                           model.config, source=source)
  if any(k in state for k in head_keys):
    if not model.num_classes:
      raise ValueError(f'{source} holds a head (head.weight) but the model has no classes')
    shapes = {'head/kernel': (model.config.hidden_size, model.num_classes),
              'head/bias': (model.num_classes,)}
    params['head'] = importers.convert({k: state[k] for k in head_keys if k in state},
                                       _ENCODER_HEAD_RULES, shapes, source=source,
                                       model=f'a head of {model.num_classes} classes')['head']
  return params


def _encoder_inputs(batch):
  kwargs = {'token_type_ids': batch['token_type_ids']} if 'token_type_ids' in batch else {}
  return (batch['input_ids'], batch['attention_mask']), kwargs


def _new_encoder(mc, max_len: int) -> bert.BertConfig:
  return bert.BertConfig(hidden_size=mc.hidden, num_hidden_layers=mc.layers,
                         num_attention_heads=mc.heads, intermediate_size=4 * mc.hidden,
                         max_position_embeddings=max(512, max_len))


def _encoder(name: str) -> Family:
  return Family(
      name=name, task='text_classification', library='hf', module=bert.BertClassifier,
      config_cls=bert.BertConfig, describes=lambda hf: hf.get('model_type') == name,
      read_config=_read_encoder, write_config=_write_encoder, rules=_encoder_rules,
      read=_read_encoder_params,
      example_inputs=lambda c: (jnp.zeros((1, 4), jnp.int32),) * 2,
      inputs=_encoder_inputs, partition_rules=bert.partition_rules,
      default_targets=bert.DEFAULT_TARGETS, new_config=_new_encoder,
      with_classes=bert.BertClassifier,
      init_head=lambda m, key: bert.init_head(m.config, m.num_classes, key),
      layer_path=r'encoder/layer_(\d+)/.*', depth_field='num_hidden_layers',
      dropout_fields=('hidden_dropout_prob', 'attention_probs_dropout_prob'),
      export_files=TOKENIZER_FILES, optional=('head/.*',))


# --------------------------------------------------------------------------- #
# Decoders: Llama 1-3.x, Qwen2, Mistral (one module, llama.LlamaForCausalLM)
# --------------------------------------------------------------------------- #


# What generating from a decoder's export reads besides its tokenizer (glora_jax.generate):
# the chat template and the eos ids of generation_config.json.
DECODER_FILES = ('chat_template.jinja', 'generation_config.json')


def _decoder_inputs(batch):
  """Packed rows (segment_ids, their padding segment 0) replace attention_mask;
  position_ids, when the batch has them, restart per packed example."""
  kwargs = {k: batch[k] for k in ('position_ids', 'segment_ids') if k in batch}
  if 'segment_ids' in batch:
    return (batch['input_ids'],), kwargs
  return (batch['input_ids'], batch['attention_mask']), kwargs


def _as_llama(config: llama.LlamaConfig) -> llama.LlamaConfig:
  """A Qwen2 or Mistral config as Llama's, whose flags hold o_proj and MLP biases. Llama
  has no sliding window: one at least max_position_embeddings long cuts no sequence
  within the model's positions and is dropped; a shorter one stays, and Llama's layout
  refuses it with the reason."""
  window = config.sliding_window
  if window is not None and window >= config.max_position_embeddings:
    window = None
  return dataclasses.replace(config, model_type='llama', sliding_window=window)


def _decoder(name: str, bias_flags: Mapping[str, str], bias_fallback) -> Family:
  def new_config(mc, max_len):
    # The bundled MiniLM tokenizer's vocabulary: a random decoder trains on its ids.
    return llama.LlamaConfig(
        model_type=name, vocab_size=30522, hidden_size=mc.hidden,
        intermediate_size=mc.intermediate, num_hidden_layers=mc.layers,
        num_attention_heads=mc.heads, num_key_value_heads=mc.kv_heads,
        max_position_embeddings=max(512, max_len))

  return Family(
      name=name, task='causal_lm', library='hf', module=llama.LlamaForCausalLM,
      config_cls=llama.LlamaConfig, describes=lambda hf: hf.get('model_type') == name,
      read_config=lambda hf, source: llama.LlamaForCausalLM(llama.LlamaConfig.from_hf(
          hf, source=source)),
      write_config=lambda model, dtype: llama.to_hf(model.config, dtype),
      rules=lambda model: tuple(llama.import_rules(model.config)),
      read=lambda model, state, source: llama.convert_hf(state, model.config, source=source),
      example_inputs=lambda c: (jnp.zeros((1, 4), jnp.int32),),
      inputs=_decoder_inputs, partition_rules=llama.partition_rules,
      default_targets=llama.DEFAULT_TARGETS, new_config=new_config,
      with_classes=_no_classes(name, llama.LlamaForCausalLM), init_head=None,
      layer_path=r'layers_(\d+)/.*', depth_field='num_hidden_layers',
      dropout_fields=('attention_dropout',), bias_flags=bias_flags,
      bias_fallback=bias_fallback, export_files=TOKENIZER_FILES + DECODER_FILES,
      init_cache=llama.init_cache)


def _no_classes(name: str, module):
  def build(config, num_classes: int):
    if num_classes:
      raise ValueError(f"model family '{name}' has no classification head; it serves causal_lm")
    return module(config)
  return build


_LLAMA_BIAS_FLAGS = {'attention_bias': r'layers_\d+/self_attn/(q|k|v|o)_proj',
                     'mlp_bias': r'layers_\d+/mlp/(gate|up|down)_proj'}


# --------------------------------------------------------------------------- #
# ViT (timm's layout; big_vision / original .npz files are read by vit.load_npz)
# --------------------------------------------------------------------------- #


def _vit_inputs(batch):
  images = batch['image']
  if images.dtype == jnp.uint8:  # bundled digits: scale to [0, 1] and standardise
    images = (images.astype(jnp.float32) / 255.0 - 0.5) / 0.5
  return (images,), {}


def _new_vit(mc, max_len: int) -> vit.ViTConfig:
  del max_len
  # model.depth (0: the preset's) shortens the preset, for tests.
  depth = {'depth': mc.depth} if mc.get('depth', 0) else {}
  return vit.preset(mc.preset, image_size=mc.image_size, in_channels=mc.get('in_channels', 3),
                    drop_path_rate=mc.get('drop_path', 0.0),
                    representation_size=mc.get('representation_size', 0) or None, **depth)


def _vit_load_file(path: str, config: vit.ViTConfig, dtype) -> dict:
  """A big_vision / original ViT .npz or a timm state dict in safetensors, without its
  head; a pre_logits layer is dropped unless the config has one (as timm does)."""
  load = vit.load_npz if path.endswith('.npz') else vit.load_timm
  return load(path, config, ignore=[] if config.representation_size else ['pre_logits/.*'],
              dtype=dtype)


def _vit_read_config(config_json, source: str) -> nn.Module:
  return vit.VisionTransformer(vit.from_timm(config_json, source))


_VIT = Family(
    name='vit', task='image_classification', library='timm', module=vit.VisionTransformer,
    config_cls=vit.ViTConfig,
    describes=lambda cfg: ('model_args' in cfg
                           and str(cfg.get('architecture', 'vit')).startswith('vit')),
    read_config=_vit_read_config,
    write_config=lambda model, dtype: vit.to_timm(model.config, dtype),
    rules=lambda model: tuple(vit.timm_import_rules(model.config, 'bilinear',
                                                    load_head=bool(model.config.num_classes))),
    read=lambda model, state, source: vit.convert_timm(
        state, model.config, load_head=bool(model.config.num_classes), source=source),
    example_inputs=lambda c: (jnp.zeros((1, c.image_size, c.image_size, c.in_channels)),),
    inputs=_vit_inputs, partition_rules=vit.partition_rules,
    default_targets=vit.DEFAULT_TARGETS, new_config=_new_vit,
    with_classes=lambda c, n: vit.VisionTransformer(dataclasses.replace(c, num_classes=n)),
    init_head=lambda m, key: vit.init_head(m.config, key),
    layer_path=r'blocks_(\d+)/.*', depth_field='depth',
    dropout_fields=('dropout_rate', 'attention_dropout_rate'),
    bias_flags={'qkv_bias': r'blocks_\d+/attn/qkv'}, load_file=_vit_load_file)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    _encoder('bert'), _encoder('roberta'),
    _decoder('llama', _LLAMA_BIAS_FLAGS, None),
    # Qwen2 always has q/k/v biases and no flag for others; Mistral has no bias flag.
    # A merged layer's extra bias switches the written config to Llama's layout.
    _decoder('qwen2', {}, _as_llama), _decoder('mistral', {}, _as_llama),
    _VIT)}
# Checkpoints that ship with the install, by name: (family, directory).
BUNDLED: dict[str, tuple[str, Callable[[], pathlib.Path]]] = {
    'minilm': ('bert', bundled.minilm_dir)}


# --------------------------------------------------------------------------- #
# Lookup
# --------------------------------------------------------------------------- #


def get(name: str) -> Family:
  """The family called `name`."""
  if name not in FAMILIES:
    raise ValueError(f"unknown model family '{name}'; known: {sorted(FAMILIES)} "
                     f'(and the bundled checkpoints {sorted(BUNDLED)})')
  return FAMILIES[name]


def of_model(model: nn.Module) -> Family:
  """The family of a built module: its class, and its config's model_type where the
  module serves several families."""
  for family in FAMILIES.values():
    if (type(model) is family.module
        and getattr(model.config, 'model_type', family.name) == family.name):
      return family
  raise ValueError(f'{type(model).__name__} belongs to no model family; known modules: '
                   f'{sorted({f.module.__name__ for f in FAMILIES.values()})}')


def of_config_json(config_json: Mapping[str, Any], source: str = CONFIG) -> Family:
  """The family a checkpoint's config.json describes (HF model_type, timm's model_args)."""
  found = [f for f in FAMILIES.values() if f.describes(config_json)]
  if not found:
    said = (f"model_type '{config_json['model_type']}'" if 'model_type' in config_json
            else f"architecture '{config_json.get('architecture')}'")
    raise ValueError(f'{source}: {said} is not a known model family; known: HF model_type '
                     f"{sorted(f.name for f in FAMILIES.values() if f.library == 'hf')}, "
                     "timm ViT ('architecture' vit_* with 'model_args')")
  return found[0]


def model_from_config_json(config_json: Mapping[str, Any], source: str = CONFIG) -> nn.Module:
  """The module a checkpoint's config.json describes (with its head, if it has one)."""
  family = of_config_json(config_json, source)
  try:
    return family.read_config(config_json, source)
  except (KeyError, TypeError) as e:
    raise ValueError(f'{source} does not describe a {family.name} model we can build: '
                     f'{type(e).__name__} {e}') from None


def param_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
  """{path: shape} of every parameter `model` reads, in the per-layer layout files
  hold (a scan_layers model's params are these, stacked: `stack_of`), without
  allocating them."""
  model = unrolled(model)
  return importers.param_shapes(model, *of_model(model).example_inputs(model.config))


def unrolled(model: nn.Module) -> nn.Module:
  """`model` with its layers an unrolled loop (scan_layers off): the per-layer layout
  of files, importers, adapters and exports."""
  if not getattr(getattr(model, 'config', None), 'scan_layers', False):
    return model
  return model.clone(config=dataclasses.replace(model.config, scan_layers=False))


def stack_of(model: nn.Module) -> stacking.Stack | None:
  """How a scan_layers model stacks its family's blocks (None: it does not):
  `stacking.stack(params, stack_of(model))` turns per-layer params into its own."""
  if not getattr(getattr(model, 'config', None), 'scan_layers', False):
    return None
  family = of_model(model)
  return stacking.Stack.from_layer_path(family.layer_path,
                                        getattr(model.config, family.depth_field))


# --------------------------------------------------------------------------- #
# Checkpoints: directories the real libraries write
# --------------------------------------------------------------------------- #


def read_config_json(path) -> dict:
  path = pathlib.Path(path)
  if not (path / CONFIG).is_file():
    raise ValueError(f'{path / CONFIG} does not exist; expected a model directory written by '
                     "transformers' or timm's save_pretrained (config.json + model.safetensors)")
  return json.loads((path / CONFIG).read_text())


def load(path, dtype=None) -> tuple[nn.Module, dict]:
  """(module, params) of a model directory: config.json picks the family and builds
  the module, the family's rules read the safetensors (single or sharded). `dtype`
  (None: float32 activations, each weight as stored) sets parameter and activation
  dtypes."""
  path = pathlib.Path(path)
  model = model_from_config_json(read_config_json(path), str(path / CONFIG))
  params = of_model(model).read(model, importers.read_safetensors(path), str(path))
  if dtype is not None:
    model = model.clone(config=dataclasses.replace(model.config, dtype=dtype))
    params = importers.cast(params, dtype)
  return model, params


def load_file(family: Family, path, config, dtype) -> dict:
  """Params of a weights file (not a model directory) for a config built from the run's
  fields; only families with such files (ViT's .npz) have a reader."""
  if family.load_file is None:
    raise ValueError(f"checkpoint {path} is a file; a {family.name} checkpoint is a directory "
                     "that transformers' save_pretrained wrote (config.json, *.safetensors)")
  return family.load_file(str(path), config, dtype)


def checkpoint_dir(model_config) -> pathlib.Path | None:
  """The directory a run's pretrained model comes from: config.model.checkpoint when
  it is a directory, else the bundled checkpoint config.model.name names, else None."""
  checkpoint = model_config.get('checkpoint', '')
  if checkpoint:
    return pathlib.Path(checkpoint) if pathlib.Path(checkpoint).is_dir() else None
  if model_config.get('name') in BUNDLED:
    return BUNDLED[model_config.name][1]()
  return None


def tokenizer_path(model_config) -> pathlib.Path:
  """tokenizer.json of the run's checkpoint; a randomly initialised text model uses
  the bundled MiniLM tokenizer (its vocabulary is the random model's)."""
  directory = checkpoint_dir(model_config)
  if directory is None:
    return bundled.minilm_tokenizer_path()
  path = directory / 'tokenizer.json'
  if not path.is_file():
    raise ValueError(f'{directory} has no tokenizer.json; text is tokenised by the '
                     "checkpoint's own tokenizer (save it with the model: "
                     'tokenizer.save_pretrained(dir))')
  return path


def keep_layers(family: Family, model: nn.Module, params: dict,
                layers: int) -> tuple[nn.Module, dict]:
  """The first `layers` repeated blocks of a model and its params (small test models)."""
  depth = getattr(model.config, family.depth_field)
  if not 0 < layers <= depth:
    raise ValueError(f'model.keep_layers={layers}: the checkpoint has {depth} layers')
  flat = {p: v for p, v in importers.flatten(params).items()
          if (m := re.fullmatch(family.layer_path, p)) is None or int(m.group(1)) < layers}
  config = dataclasses.replace(model.config, **{family.depth_field: layers})
  return model.clone(config=config), importers.unflatten(flat)


def init_params(model: nn.Module, seed: int) -> dict:
  """Random params of `model` (its own initialisers), one compiled program, in the
  per-layer layout (a scan_layers model's: stack them with `stack_of`)."""
  family = of_model(model)
  inputs = family.example_inputs(model.config)
  return jax.jit(lambda key: unrolled(model).init(key, *inputs))(jax.random.key(seed))['params']
