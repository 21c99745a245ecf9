"""Defaults shared by every experiment; each config file overrides what differs."""
import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = 'text_classification'
  c.method = 'glora'  # glora | lora | surm | full | linear_probe

  c.model = ml_collections.ConfigDict()
  c.model.name = 'minilm'
  c.model.param_dtype = 'float32'
  c.model.frozen_dtype = 'float32'  # 'bfloat16' keeps the frozen backbone in bf16
  c.model.remat = 'none'  # per-layer remat: none | full | dots (models/common.py)
  c.model.attention = 'xla'  # xla | chunked | dot_product (LLaMA, ViT; BERT keeps xla)

  c.data = ml_collections.ConfigDict()
  c.data.name = 'bbc_news'
  c.data.data_dir = ''  # '' = $GLORA_DATA_DIR, else $TFDS_DATA_DIR, else ~/tensorflow_datasets
  c.data.max_len = 128
  c.data.train_split = 'train'
  c.data.eval_split = 'val'
  c.data.test_split = 'test'
  c.data.limit = 0  # > 0 keeps the first `limit` examples of each split (tests)

  c.adapter = ml_collections.ConfigDict()
  c.adapter.targets = ''  # '' = the model's default (every linear layer but the head)
  c.adapter.exclude = ''
  c.adapter.ranks = (4,)
  c.adapter.structured_b = ()
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
