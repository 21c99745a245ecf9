"""The GLoRA authors' VTAB-1k recipe (REFERENCE.md §1): ViT-B/16 ImageNet-21k
(original ViT-B_16.npz), drop-path 0.1, AdamW lr 1e-4, weight decay 1e-4, batch 64
(drop last), 500 epochs, 10 warm-up epochs from 1e-6, cosine to 1e-5, rank 4.
Train on train800, evaluate on val200 (search there too), report on test.

  python train.py --config configs/vtab1k_vit_b16_glora.py:cifar100 \
      --config.model.checkpoint=/path/ViT-B_16.npz --config.data.data_dir=/path/tfds

Differences from the authors' code: the cosine schedule is stepped per step, not
per epoch; the data must be prepared beforehand (see glora_jax/data/vtab.py).
"""
from configs.common import base_config, parse_arg


def get_config(arg: str | None = None):
  c = base_config()
  c.task = 'image_classification'
  c.method = 'glora'
  c.model.name = 'vit'
  c.model.preset = 'B/16'
  c.model.image_size = 224
  c.model.drop_path = 0.1
  c.model.checkpoint = ''  # path to ViT-B_16.npz (ImageNet-21k) or a timm safetensors file
  c.model.representation_size = 0
  c.data.name = f"vtab/{parse_arg(arg, __file__, dataset='cifar100').dataset}"
  c.data.train_split, c.data.eval_split, c.data.test_split = 'train800', 'val200', 'test'
  c.adapter.ranks = (4,)
  c.optim.lr = 1e-4
  c.optim.weight_decay = 1e-4
  c.optim.schedule = 'cosine'
  c.optim.warmup_epochs = 10
  c.optim.warmup_init_lr = 1e-6
  c.optim.min_lr = 1e-5
  c.batch_size = 64
  c.eval_batch_size = 64
  c.drop_remainder = True
  c.num_epochs = 500
  c.log_every_steps = 50
  return c
