"""Joining a run of several processes (hosts): jax.distributed.initialize, called
before anything touches a device, with CPU collectives through gloo."""
from __future__ import annotations

import jax


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """jax.distributed.initialize with the arguments that are given.

  On a cluster (TPU pod, SLURM, Open MPI, GKE) call it with none: jax detects the
  coordinator and this process's place. Elsewhere pass all three, e.g. two
  processes on one machine: ('127.0.0.1:12345', 2, 0) and ('127.0.0.1:12345', 2, 1)."""
  given = {'coordinator_address': coordinator_address, 'num_processes': num_processes,
           'process_id': process_id}
  if num_processes is not None and num_processes < 1:
    raise ValueError(f'num_processes is {num_processes}; expected at least 1')
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f'process_id {process_id} is outside [0, num_processes={num_processes})')
  # CPU devices of different processes only reach each other through a collectives
  # library; without one a cross-process psum fails at run time. It configures the
  # CPU client alone, so GPUs (NCCL) and TPUs (ICI) are unaffected. Must precede
  # the backend's creation, as must initialize itself.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(**{k: v for k, v in given.items() if v is not None})
