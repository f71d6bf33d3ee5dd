"""Checkpoints: asynchronous Orbax saves, automatic resume, and stop signals.

A checkpoint holds two items: `state` (the train state: step, parameters, optimizer
state) and `meta` (JSON: the resolved config, the versions that wrote it, and the
loader's state, which is the step plus a fingerprint of what the batches depend on).
Orbax writes a step into a temporary directory and renames it when complete, so a
save that dies midway leaves nothing `all_steps()` lists: it is never restored.

The meta item also holds a checksum of each array of the state, checked on restore.
`save` only dispatches their computation on the device; Orbax's background thread
fetches them and writes the meta item, so the loop waits for neither (it had waited
4.67 s a save of a 290M-parameter state on CPU). The file is the JSON that Orbax's own
handler wrote before, so older checkpoints restore and are checked the same way.
"""

import contextlib
import dataclasses
import errno
import logging
import os
import re
import signal
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from trainer.errors import UserError
from trainer.model import ModelConfig

log = logging.getLogger('salt')


def absolute(path: epath.PathLike) -> epath.Path:
  """The path Orbax needs: it reads and writes only absolute paths (remote ones, gs://, are)."""
  return epath.Path(path if '://' in str(path) else os.path.abspath(path))


class Checkpoints:
  """The checkpoints of one run directory."""

  def __init__(self, directory: epath.PathLike, *, every_steps: int, max_to_keep: int,
               keep_every_steps: int = 0, async_save: bool = True):
    self.directory = absolute(directory)
    self.every_steps = every_steps
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=every_steps, max_to_keep=max_to_keep, keep_period=keep_every_steps or None,
            enable_async_checkpointing=async_save, create=True),
        item_names=('state', 'meta'))

  def should_save(self, step: int) -> bool:
    # Orbax's own rule also saves the first step of a run: a wasted write at scale.
    return step % self.every_steps == 0

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Starts saving (returns before the write completes when saves are asynchronous).
    The meta item carries the state's checksums, checked when it is restored."""
    # Dispatched before Orbax copies the state to the host, and before the next step
    # donates its buffers: the device reads them first.
    sums = _sums(state)
    with self._writing():
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=_MetaSave(meta, sums)), force=True)

  @contextlib.contextmanager
  def _writing(self):
    """A save that the storage refuses (full, over quota, read-only) is one line: running
    again cannot help. An asynchronous save fails in Orbax's thread and surfaces at the
    next save, wait or close, so all three pass through here."""
    try:
      yield
    except Exception as e:
      code = _STORAGE_ERRORS.search(str(e))
      errno_ = e.errno if isinstance(e, OSError) else int(code.group(1)) if code else None
      if errno_ not in _STORAGE_ERRNOS:
        raise
      raise UserError(f'a checkpoint could not be written in {self.directory}: {os.strerror(errno_)}; '
                      'make room there (or set --config.checkpoint.max_to_keep lower) and run again to resume '
                      'from the last checkpoint') from None

  def restore(self, abstract_state: Any, resume: str, model: dict | None = None) -> tuple[Any, dict] | None:
    """(state, meta) to resume from, or None to start fresh.

    resume: 'auto' restores the latest readable checkpoint here, falling back to older
      ones when the latest cannot be read (those are set aside, see `_set_aside`);
      'never' starts fresh and requires that there are no checkpoints here; any other
      value is the path of one checkpoint (`RUN/checkpoints/STEP`), restored or
      refused with an error.
    model: the run's model config; a checkpoint of a model of another shape is an
      error that names what differs, never a checkpoint to fall back past.
    """
    steps = self.manager.all_steps()
    if resume == 'never':
      if steps:
        raise UserError(f'{self.directory} holds checkpoints up to step {max(steps)}; --resume=never '
                        'needs a run directory without them (or use --resume=auto)')
      return None
    if resume != 'auto':
      return _restore_path(absolute(resume), abstract_state, model)
    unreadable = []
    try:
      for step in sorted(steps, reverse=True):
        try:
          return _restore(self.manager, step, abstract_state, model)
        except UserError:
          raise
        except Exception as e:  # Orbax and TensorStore raise many types for unreadable data
          log.warning('checkpoint at step %d in %s cannot be read (%s: %s); trying the one before',
                      step, self.directory, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else '')
          unreadable.append(step)
    finally:
      self._set_aside(unreadable)
    if steps:
      raise UserError(f'no checkpoint in {self.directory} can be read (steps {sorted(steps)}); they are now in '
                      f'{self.unreadable_directory}, and the run starts fresh when run again')
    return None

  @property
  def unreadable_directory(self) -> epath.Path:
    return self.directory.parent / f'{self.directory.name}-unreadable'

  def _set_aside(self, steps: list[int]) -> None:
    """Moves unreadable steps out of the way (never deleted: a person may want them), so
    that the run can save those steps again instead of failing on every relaunch."""
    if not steps:
      return
    if jax.process_index() == 0:
      self.unreadable_directory.mkdir(parents=True, exist_ok=True)
      for step in steps:
        target = self.unreadable_directory / str(step)
        suffix = 0
        while target.exists():
          suffix += 1
          target = self.unreadable_directory / f'{step}.{suffix}'
        (self.directory / str(step)).rename(target)
        log.warning('moved the unreadable checkpoint at step %d to %s', step, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('unreadable checkpoints set aside')
    self.manager.reload()

  def wait(self) -> None:
    """Blocks until every started save has been committed."""
    with self._writing():
      self.manager.wait_until_finished()

  def close(self) -> None:
    with self._writing():
      self.manager.close()


# Storage that refuses writes: no space, file too large, over quota, read-only. TensorStore
# reports the errno in its message.
_STORAGE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES)
_STORAGE_ERRORS = re.compile(r"os_error_code='(\d+)'")


def read_meta(path: epath.PathLike, named: str) -> dict:
  """The `meta` item (config, versions) of the checkpoint at `path`, without its arrays.
  `named`: how the user gave the path, for the one-line error when it is no checkpoint."""
  meta = absolute(path) / 'meta'
  if not meta.is_dir():
    raise UserError(f'{named} is not a salt checkpoint (RUN/checkpoints/STEP)')
  try:
    return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(meta)
  except Exception as e:  # Orbax raises several types for unreadable files
    raise UserError(f'{named}: cannot read its metadata ({type(e).__name__})') from None


def _restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any, model: dict | None) -> tuple[Any, dict]:
  if model is not None:
    meta = manager.restore(step, args=ocp.args.Composite(meta=_MetaRestore())).meta
    saved = meta.get('config', {}).get('model', {})
    differing = [k for k in ModelConfig.shape_keys() if k in saved and saved[k] != model[k]]
    if differing:
      raise UserError(
          f'the checkpoint at step {step} in {manager.directory} is of another model: '
          + ', '.join(f'model.{k}={saved[k]!r} there, {model[k]!r} here' for k in differing)
          + '; set them back (' + ' '.join(f'--config.model.{k}={saved[k]}' for k in differing)
          + ') or train this model in another --workdir')
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                           meta=_MetaRestore()))
  if 'checksums' in restored.meta and checksums(restored.state) != restored.meta['checksums']:
    raise ValueError('the restored arrays fail the checksums saved with them (damaged after the save)')
  return restored.state, restored.meta


@jax.jit
def _sums(tree: Any) -> list[jax.Array]:
  def one(x):
    bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    words = jax.lax.bitcast_convert_type(x, bits)
    return jnp.sum(words.astype(jnp.uint32), dtype=jnp.uint32)
  return [one(x) for x in jax.tree.leaves(tree)]


def checksums(tree: Any) -> list[int]:
  """Per array, the sum of its bits as unsigned words modulo 2**32: any flipped bit
  changes it, and the sum is the same however the array is sharded."""
  return _fetched(_sums(tree))


def _fetched(sums: list[jax.Array]) -> list[int]:
  return [int(x) for x in jax.device_get(sums)]


class _MetaHandler(ocp.JsonCheckpointHandler):
  """Writes the meta item with the checksums in Orbax's background thread, once the
  device has computed them; reads it as Orbax's JSON handler does."""

  async def async_save(self, directory: epath.Path, item: Any = None,
                       args: '_MetaSave | None' = None) -> list[ocp.future.Future]:
    async def write():
      await self._save_fn({**args.meta, 'checksums': _fetched(args.sums)}, directory)
    return [ocp.future.CommitFutureAwaitingContractedSignals(write(), name='meta_save')]


@ocp.args.register_with_handler(_MetaHandler, for_save=True)
@dataclasses.dataclass
class _MetaSave(ocp.args.CheckpointArgs):
  meta: dict
  sums: list[jax.Array]


@ocp.args.register_with_handler(_MetaHandler, for_restore=True)
@dataclasses.dataclass
class _MetaRestore(ocp.args.CheckpointArgs):
  """Reads the meta item (the same file for checkpoints of any salt version)."""


def _restore_path(path: epath.Path, abstract_state: Any, model: dict | None) -> tuple[Any, dict]:
  if not path.name.isdigit() or not path.is_dir():
    raise UserError(f'--resume={path} is not a checkpoint directory (RUN/checkpoints/STEP)')
  manager = ocp.CheckpointManager(path.parent, options=ocp.CheckpointManagerOptions(read_only=True),
                                  item_names=('state', 'meta'))
  try:
    return _restore(manager, int(path.name), abstract_state, model)
  except UserError:
    raise
  except Exception as e:  # Orbax and TensorStore raise many types for unreadable data
    raise UserError(f'checkpoint at step {int(path.name)} ({path}) cannot be read: {type(e).__name__}') from None
  finally:
    manager.close()


class StopSignals:
  """SIGTERM and SIGINT ask the run to stop after the current step; a second one ends it now.

  With several processes, a signal reaches one host while the others train on, so the
  hosts must agree on the step: JAX's preemption service turns SIGTERM on any host
  into one step at which all of them stop (`reached_preemption_sync_point`). Our own
  handlers would replace the service's, so there we install none.
  """

  def __init__(self):
    self.requested = False
    self.multi_process = jax.process_count() > 1
    signals = () if self.multi_process else (signal.SIGTERM, signal.SIGINT)
    self.previous = {s: signal.signal(s, self._handle) for s in signals}

  def _handle(self, signum, frame):
    if self.requested:
      os._exit(128 + signum)
    self.requested = True
    log.warning('%s: stopping after this step and saving a checkpoint (send it again to exit now)',
                signal.Signals(signum).name)

  def reached(self, step: int) -> bool:
    """Whether to stop after `step`; every process gets the same answer."""
    if self.multi_process:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def restore(self) -> None:
    for s, handler in self.previous.items():
      signal.signal(s, handler)
