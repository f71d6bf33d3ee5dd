"""Joining the processes of a multi-host job, before anything else touches a JAX backend.

A job says it has several processes in one of two ways:

* SALT_COORDINATOR (host:port of process 0), SALT_NUM_PROCESSES and SALT_PROCESS_ID:
  set by `salt launch local`, or by any launcher of your own.
* SALT_DISTRIBUTED=auto: JAX finds the cluster itself (the workers of a Cloud TPU pod,
  SLURM tasks started by srun, Open MPI). `salt launch tpu` sets it on every worker.

Anything else is a single process, and nothing happens: guessing from the environment
(an sbatch script's SLURM_NTASKS, say) could leave one process waiting for peers that
never start. On CPU the processes' collectives go over gloo.
"""

import logging
import os

import jax

from trainer.errors import UserError

COORDINATOR = 'SALT_COORDINATOR'
NUM_PROCESSES = 'SALT_NUM_PROCESSES'
PROCESS_ID = 'SALT_PROCESS_ID'
MODE = 'SALT_DISTRIBUTED'

log = logging.getLogger('salt')


def _explicit() -> dict | None:
  """initialize()'s arguments from the SALT_* variables, or None when they are not set."""
  named = {name: os.environ.get(name) for name in (COORDINATOR, NUM_PROCESSES, PROCESS_ID)}
  if not any(named.values()):
    return None
  missing = [name for name, value in named.items() if not value]
  if missing:
    raise UserError(f'{", ".join(missing)} not set; a multi-process job needs all of {", ".join(named)}')
  try:
    count, index = int(named[NUM_PROCESSES]), int(named[PROCESS_ID])
  except ValueError:
    raise UserError(f'{NUM_PROCESSES}={named[NUM_PROCESSES]!r} and {PROCESS_ID}={named[PROCESS_ID]!r} '
                    'must be integers') from None
  if not 0 <= index < count:
    raise UserError(f'{PROCESS_ID}={index} must be in [0, {NUM_PROCESSES}={count})')
  return {'coordinator_address': named[COORDINATOR], 'num_processes': count, 'process_id': index}


def _detected() -> bool:
  """Whether JAX should detect a cluster itself."""
  mode = os.environ.get(MODE, '')
  if mode not in ('', 'auto'):
    raise UserError(f"{MODE}={mode!r}: the one value it takes is 'auto'")
  return mode == 'auto'


def initialize() -> None:
  """Joins this process to the others of its job, if there are others.

  Call it first in a command that touches devices: JAX refuses to join once a backend
  is up. Only process 0 then logs at INFO; the others say only what goes wrong.
  """
  explicit = _explicit()
  if explicit is None and not _detected():
    return
  # Processes on CPU (the local cluster) sum gradients over gloo; other platforms ignore it.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(**(explicit or {}))
  if jax.process_index() != 0:
    log.setLevel(logging.WARNING)
