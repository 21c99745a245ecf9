"""GLUE (dev sets reported; GLUE's test labels are hidden) on a BERT or RoBERTa checkpoint,
at LoRA's RoBERTa-base recipe (Hu et al. 2021, Table 9): batch 16, max length 512,
AdamW, 6% warm-up, per-task epochs and learning rates; adapters on every linear layer.

  python train.py --config configs/glue.py:task=rte,method=lora \
      --config.model.checkpoint=/path/roberta-base --config.data.data_dir=/path/tfds
  python search.py --ckpt <workdir>          # GLoRA: its fitness is the task's metric

The data is tfds's glue/<task> prepared in data_dir (the error says how otherwise).
train: tfds train less a stratified 10% carved off for validation (data.val_fraction,
the search's fitness and the epoch-end monitor); test: the dev split (validation;
MNLI validation_matched, pass --config.data.test_split=validation_mismatched for the
other). Differences from the recipe: warm-up then cosine decay (LoRA's decay is linear);
the adapters' own hyperparameters are this house's defaults (configs/common.py).
"""
from configs.common import base_config, parse_arg

# task: (epochs, learning rate), LoRA's RoBERTa-base table.
RECIPE = {'cola': (80, 4e-4), 'sst2': (60, 5e-4), 'mrpc': (30, 4e-4), 'stsb': (40, 4e-4),
          'qqp': (25, 5e-4), 'mnli': (30, 5e-4), 'qnli': (25, 4e-4), 'rte': (80, 5e-4)}
WARMUP_SHARE = 0.06


def get_config(arg: str | None = None):
  from glora_jax.data import glue
  arg = parse_arg(arg, __file__, task=tuple(RECIPE), method=('glora', 'lora', 'surm'))
  c = base_config()
  c.method = arg.method
  c.model.name = 'roberta'  # model.checkpoint's config.json names the family (bert or roberta)
  c.model.checkpoint = ''  # a directory transformers' save_pretrained wrote
  c.data.name = f'glue/{arg.task}'
  c.data.max_len = 512
  c.data.train_split, c.data.eval_split = 'train', ''
  c.data.val_fraction = 0.1
  c.data.test_split = glue.dev_split(arg.task)
  c.num_epochs, c.optim.lr = RECIPE[arg.task]
  c.optim.weight_decay = 0.01
  c.optim.schedule = 'cosine'
  c.optim.warmup_epochs = max(1, round(WARMUP_SHARE * c.num_epochs))
  c.batch_size = c.eval_batch_size = 16
  c.log_every_steps = 50
  return c
