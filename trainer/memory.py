"""How much memory a device has and a program or state needs, and the one-line answer when it will not fit."""

import math
import os

import jax

from trainer.errors import UserError

GiB = 2 ** 30
REMEDY = ('shard over more devices (--config.mesh.fsdp), recompute activations (--config.model.remat=save_nothing) '
          'or lower data.global_batch_size')
STATE_REMEDY = 'shard it over more devices (--config.mesh.fsdp) or use a smaller model'


def local_device_memory() -> tuple[int | None, str]:
  """Bytes one of this process's devices can hold, and what that figure is."""
  device = jax.local_devices()[0]
  stats = device.memory_stats() or {}
  if stats.get('bytes_limit'):
    return stats['bytes_limit'], f'{device.device_kind} memory limit (memory_stats bytes_limit)'
  if device.platform == 'cpu':
    available = _host_available()
    if available:
      return available // jax.local_device_count(), (f"the host's available memory "
                                                      f'({available / GiB:.1f} GiB) over {jax.local_device_count()} '
                                                      'CPU devices')
  return None, 'unknown'


def _host_available() -> int | None:
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  try:
    return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
  except (ValueError, OSError):
    return None


def needed_bytes(memory) -> int:
  """Per-device bytes of a compiled program: its live arguments and outputs (donated
  inputs counted once), temporaries and code."""
  return (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
          + memory.temp_size_in_bytes + memory.generated_code_size_in_bytes)


def state_bytes(tree) -> int:
  """Per-device bytes of a tree of sharded abstract arrays (the largest shard of each)."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def size(n: float) -> str:
  for unit, scale in (('GiB', GiB), ('MiB', 2 ** 20), ('KiB', 2 ** 10)):
    if n >= scale:
      return f'{n / scale:.2f} {unit}'
  return f'{n:.0f} B'


def check_fits(what: str, need: int, limit: int | None, source: str, remedy: str) -> None:
  """Raises UserError when `need` bytes per device exceed `limit`."""
  if limit and need > limit:
    raise UserError(f'{what} needs {size(need)} per device, more than the {size(limit)} of {source}: it will '
                    f'not fit; {remedy}')
