r"""Train a model with adapters (GLoRA supernet, LoRA, SURM) or a baseline.

  python train.py --config configs/bbc_minilm_glora.py --workdir runs/bbc
  python train.py --config configs/bbc_minilm_lora.py --workdir runs/lora --config.optim.lr=5e-4

Rerunning the same command resumes from the last checkpoint in --workdir.
Several processes (hosts) run the same command, each with --distributed. On a TPU
pod, SLURM or Open MPI that is all; elsewhere name process 0's host:port and each
process's place, e.g. two processes on one machine (and --process_id=1 beside it):

  python train.py --config configs/tiny_bbc_glora.py --workdir runs/two --distributed \
    --coordinator_address=127.0.0.1:12345 --num_processes=2 --process_id=0
"""

from absl import app, flags
from ml_collections import config_flags

from glora_jax import cli

config_flags.DEFINE_config_file('config', None, 'Path to a config file (configs/*.py[:arg]).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and plots.')
flags.DEFINE_bool('distributed', False,
                  'Join a run of several processes (hosts) with jax.distributed.initialize(); '
                  'alone it auto-detects the cluster (TPU pod, SLURM, Open MPI).')
flags.DEFINE_string('coordinator_address', None,
                    'With --distributed: host:port of process 0, e.g. 127.0.0.1:12345.')
flags.DEFINE_integer('num_processes', None, 'With --distributed: how many processes take part.')
flags.DEFINE_integer('process_id', None, 'With --distributed: this process, 0 .. num_processes-1.')
flags.mark_flags_as_required(['config', 'workdir'])
CLUSTER_FLAGS = ('coordinator_address', 'num_processes', 'process_id')
FLAGS = flags.FLAGS


@flags.multi_flags_validator(('distributed',) + CLUSTER_FLAGS)
def _cluster_flags_need_distributed(values):
  given = [f'--{name}' for name in CLUSTER_FLAGS if values[name] is not None]
  if given and not values['distributed']:
    raise flags.ValidationError(f'{", ".join(given)} given without --distributed; add --distributed')
  return True


def work():
  if FLAGS.distributed:  # before anything below touches a device
    from glora_jax.train import distributed
    try:
      distributed.initialize(*(FLAGS[name].value for name in CLUSTER_FLAGS))
    except ValueError as e:
      raise app.UsageError(str(e)) from None
  from glora_jax.train import loop
  loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  cli.main(work)
