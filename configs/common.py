"""Defaults shared by every experiment; each config file overrides what differs."""
import pathlib

import ml_collections


def parse_arg(arg: str | None, config_file: str, **spec) -> ml_collections.ConfigDict:
  """A config file's argument (`--config configs/x.py:ARG`) as named values, after
  big_vision's parse_arg: ARG is comma-separated items, each `key=value`, the name of
  a bool option (sets it), or a bare value of an option that lists its values (or of
  the first option, if that one takes any value).

  spec: option name -> default (any value of its type; a bool is a flag), or a tuple
  of the allowed values, the first the default. E.g. with setting=('full', '8shot')
  and quick=False: '8shot', 'quick', '8shot,quick' and 'setting=8shot' are accepted;
  anything else is a ValueError naming what is (config_file says whose argument)."""
  allowed = {k: v if isinstance(v, tuple) else None for k, v in spec.items()}
  out = ml_collections.ConfigDict({k: v[0] if isinstance(v, tuple) else v for k, v in spec.items()},
                                  type_safe=False)
  words = [w for k, v in allowed.items() for w in (v[1:] if v else ())]
  words += [k for k, v in out.items() if isinstance(v, bool)]
  first = next(iter(spec), None)

  def unknown(item):
    use = ' or '.join(words) if len(words) < 3 else ', '.join(words[:-1]) + ' or ' + words[-1]
    keys = ', '.join(spec) or 'none'
    return ValueError(f"unknown argument '{item}' for {pathlib.Path(config_file).stem}; "
                      f"use {use or 'key=value'} (options: {keys})")

  for item in filter(None, (arg or '').split(',')):
    key, eq, value = item.partition('=')
    if not eq:  # a flag, or a bare value of the option that takes it
      if isinstance(out.get(key), bool):
        value = 'True'
      else:
        key, value = next((k for k, v in allowed.items() if v and item in v), None), item
        if key is None and first is not None and allowed[first] is None:
          key = first
        if key is None:
          raise unknown(item)
    if key not in out:
      raise unknown(item)
    default = out[key] if allowed[key] is None else allowed[key][0]
    if allowed[key] and value not in allowed[key]:
      raise unknown(item)
    if isinstance(default, bool):
      if value not in ('True', 'true', '1', 'False', 'false', '0'):
        raise unknown(item)
      out[key] = value in ('True', 'true', '1')
    else:
      try:
        out[key] = type(default)(value)
      except ValueError:
        raise unknown(item) from None
  return out


# The BBC News configs' argument: `setting` (BENCH_PROTOCOL.md's two) or k-shot, e.g.
# `configs/bbc_minilm_lora.py:shots=4,shots_seed=1`.
BBC_OPTIONS = {'setting': ('full', '8shot'), 'shots': 0, 'shots_seed': 0}
FEW_SHOT_EPOCHS = 20  # the 8-shot setting's, kept for every k


def apply_setting(c: ml_collections.ConfigDict, arg) -> ml_collections.ConfigDict:
  """BBC News settings (BENCH_PROTOCOL.md): 'full' as is; '8shot' trains on the
  40-document train_8shot split for 20 epochs; shots=k draws k documents of each
  class from train with shots_seed (data.shots, data/sampling.k_shot), 20 epochs."""
  if arg.setting == '8shot' and arg.shots:
    raise ValueError("setting '8shot' is the split file's own 8-shot split; drop it to draw "
                     f'shots={arg.shots} from train')
  if arg.setting == '8shot':
    c.data.train_split, c.num_epochs = 'train_8shot', FEW_SHOT_EPOCHS
  if arg.shots:
    c.data.shots, c.data.shots_seed, c.num_epochs = arg.shots, arg.shots_seed, FEW_SHOT_EPOCHS
  return c


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = 'text_classification'
  c.method = 'glora'  # glora | lora | surm | full | linear_probe

  c.model = ml_collections.ConfigDict()
  # A model family (glora_jax/models/registry.py: a random init) or a bundled checkpoint
  # ('minilm'). model.checkpoint: a directory transformers' or timm's save_pretrained
  # wrote, whose config.json names the family (or a ViT weights file: .npz, safetensors).
  c.model.name = 'minilm'
  c.model.checkpoint = ''
  c.model.keep_layers = 0  # > 0 keeps a checkpoint's first N blocks (small test models)
  c.model.param_dtype = 'float32'
  c.model.frozen_dtype = 'float32'  # 'bfloat16' keeps the frozen backbone in bf16
  # 'int8' | 'nf4' (QLoRA's 4-bit NormalFloat) store the frozen linear kernels (the model's
  # default adapter targets) quantized in blocks of frozen_quant_block along their output
  # dimension, dequantized to frozen_dtype inside each layer's call (glora_jax/quant.py);
  # embeddings, norms, biases and the head stay float. frozen_quant_double: the block
  # scales in 8 bits too; frozen_quant_pad: pad a kernel the block does not divide
  # instead of refusing it.
  c.model.frozen_quant = 'none'
  c.model.frozen_quant_block = 64
  c.model.frozen_quant_double = False
  c.model.frozen_quant_pad = False
  c.model.remat = 'none'  # per-layer remat: none | full | dots (models/common.py)
  c.model.attention = 'xla'  # xla | chunked | dot_product (LLaMA, ViT; BERT keeps xla)
  # The repeated blocks under one nn.scan (stacked params, models/stacking.py): compile
  # time flat in depth, each FSDP gather redone per layer; same outputs. Files, adapters,
  # subnets and exports keep the per-layer layout.
  c.model.scan_layers = False
  # Causal LM: > 0 computes the loss from this many tokens' logits at a time (train/xent.py),
  # never the whole (batch, seq, vocab) logits; 0: the model's full logits.
  c.model.loss_chunk = 0

  c.data = ml_collections.ConfigDict()
  # bbc_news, mnist5k, vtab/<task>; your files: json | csv (texts) | imagefolder, each
  # split a file, a glob or a directory of class folders; 'tfds:<name>[/<config>]' (any
  # dataset prepared in data_dir); 'glue/<task>' (tfds's glue/*, with GLUE's metrics).
  c.data.name = 'bbc_news'
  c.data.data_dir = ''  # '' = $GLORA_DATA_DIR, else $TFDS_DATA_DIR, else ~/tensorflow_datasets
  c.data.max_len = 128
  c.data.train_split = 'train'
  c.data.eval_split = 'val'
  c.data.test_split = 'test'
  c.data.limit = 0  # > 0 keeps the first `limit` examples of each split (tests)
  # k > 0: exactly k training examples of each class, drawn with shots_seed
  # (data/sampling.k_shot); eval and test untouched.
  c.data.shots = 0
  c.data.shots_seed = 0
  # No eval split named (eval_split ''): a stratified val_fraction of train, drawn with val_seed.
  c.data.val_fraction = 0.0
  c.data.val_seed = 0
  # Fields of files and tfds datasets ('': text, no pair, label for files; tfds: from its features).
  c.data.text_key = ''
  c.data.text_pair_key = ''
  c.data.label_key = ''
  c.data.image_size = 0  # > 0: images resized (bicubic) to it and ImageNet-normalised; 0 as stored
  c.data.metrics = ()  # () = the data's own (GLUE's; accuracy; pearson, spearman for regression)
  # Causal LM (train/tasks.causal_lm, data/lm_data.py): 'text' (every token), 'alpaca'
  # (instruction, input, output) or 'chat' (messages or ShareGPT conversations through the
  # checkpoint's chat template); the loss on responses unless train_on_prompt; packing puts
  # several examples in each train row (segment ids, positions restarting per example).
  c.data.format = 'text'
  c.data.train_on_prompt = False
  c.data.packing = False

  c.adapter = ml_collections.ConfigDict()
  c.adapter.targets = ''  # '' = the model's default (every linear layer but the head)
  c.adapter.exclude = ''
  c.adapter.ranks = (4,)
  c.adapter.structured_b = ()
  # GLoRA: False gives vector and constant options parameters of their own instead
  # of the low-rank factor's first column (the authors' sharing; adapters/glora.py).
  c.adapter.share_vectors = True
  c.adapter.lora_rank = 8
  c.adapter.lora_alpha = 16.0
  c.adapter.lora_mode = 'activation'  # activation | weight (adapters/lora.py says when)
  c.adapter.surm = ml_collections.ConfigDict({'kind': 'circulant', 'form': 'lora'})
  # Supernet training (GLoRA without a fixed subnet; train/steps.SupernetOptions).
  # The defaults are the authors': one uniformly drawn subnet per step. A step
  # costs num_random + (1 largest, 2 largest_smallest) forward+backward passes,
  # plus one teacher forward when distill > 0 without a sandwich.
  c.supernet = ml_collections.ConfigDict()
  c.supernet.num_random = 1  # random subnets per step
  c.supernet.sandwich = 'none'  # none | largest | largest_smallest (BigNAS's sandwich rule)
  c.supernet.sampling = 'uniform'  # uniform | fair (FairNAS: each option once per cycle)
  c.supernet.distill = 0.0  # in [0, 1]: weight of KL to the largest subnet's soft labels
  c.supernet.temperature = 1.0  # of the distillation's softmax
  c.supernet.progressive_epochs = 0.0  # > 0: widen from the largest subnet to all options (OFA)
  # A subnet JSON (search.py's best_subnet.json format) that replaces the largest subnet
  # as the sandwich's first subnet and the distillation teacher; '' = the largest.
  c.supernet.anchor = ''
  # > 0 (ours): the sandwich head's (largest or anchor) share of a step's loss, the
  # other subnets share the rest evenly; 0 = the mean over the step's subnets.
  c.supernet.head_weight = 0.0
  c.subnet = ''  # a subnet JSON (search.py output): train that subnet only
  c.init_from = ''  # a train.py workdir: start from its latest trainable params

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-3
  c.optim.weight_decay = 0.01
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.schedule = 'constant'  # constant | cosine (warm-up + cosine)
  c.optim.warmup_steps = 0
  c.optim.warmup_epochs = 0
  c.optim.warmup_init_lr = 0.0
  c.optim.min_lr = 0.0
  c.optim.clip_norm = 0.0
  # (path regex, m) pairs: a trainable leaf whose path matches has lr (and decoupled
  # weight decay) x m, e.g. (('adapters/.*/C[du]', 0.1),) slows GLoRA's C support.
  c.optim.lr_multipliers = ()

  c.batch_size = 32
  c.eval_batch_size = 32
  c.num_epochs = 5
  c.drop_remainder = False
  # num_devices 0 = every device; data -1 = every device not used by 'model'.
  # fsdp: split each large frozen leaf (and so its adapters) over 'data' too.
  # rules: (path regex, axes) pairs tried before the model's own partition rules,
  # e.g. (('.*/mlp/.*/kernel', (None, 'model')),).
  c.mesh = ml_collections.ConfigDict({'data': -1, 'model': 1, 'num_devices': 0, 'fsdp': False,
                                      'rules': ()})
  c.checkpoint = ml_collections.ConfigDict({'every_steps': 0, 'keep': 3, 'async_save': True})
  c.on_nonfinite = 'stop'  # stop | skip
  c.log_every_steps = 5
  c.eval_every_epochs = 1  # 0: evaluate once, at the end
  return c
