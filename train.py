"""Train a model with adapters (GLoRA supernet, LoRA, SURM) or a baseline.

  python train.py --config configs/bbc_minilm_glora.py --workdir runs/bbc
  python train.py --config configs/bbc_minilm_lora.py --workdir runs/lora --config.optim.lr=5e-4

Rerunning the same command resumes from the last checkpoint in --workdir.
"""
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', None, 'Path to a config file (configs/*.py[:arg]).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and plots.')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() (several hosts).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  import jax
  if flags.FLAGS.distributed:
    jax.distributed.initialize()
  from glora_jax.cli import run_guarded
  from glora_jax.train import loop
  return run_guarded(lambda: loop.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir))


if __name__ == '__main__':
  sys.path.insert(0, '.')  # configs/ imports configs.common
  app.run(main)
