"""One job per output: `RUN/lock` (or `FILE.lock` beside an output that is one file) names
the host and process that write there.

Two jobs on one output would write over each other (checkpoints, metrics, shards,
scores), so a second job stops with one line that names the holder.

The holder keeps the lock file open under an exclusive `flock` from `acquire` to
`release`. A job that gets the flock is the only one deciding whether the lock it found
is stale, and it takes the lock over by rewriting that same file, so two jobs that find
one stale lock cannot both take it (unlinking and recreating it, as salt once did, let
the second delete the first's fresh lock). Having the flock, a job confirms that its
open file is still the one at the path: a holder that releases unlinks the file, and a
job that opened it before that must open the new one instead. The kernel drops the
flock when its holder dies (a child forked without exec would share it: salt starts
its processes with spawn); Linux's NFS client forwards flocks to the server.

The JSON inside (host, pid, since) names the holder in the message, and it still
decides staleness for holders that a flock cannot show: a job of an older salt (which
held no flock), or one on another host of a filesystem whose locks stay on each host.
A holder on this host is gone when its process is; one on another host when nobody
has refreshed the file, which the holder does every HEARTBEAT_SECONDS, for
STALE_SECONDS. Such a lock is taken over, with a warning, and so is a file whose flock
nobody holds that names no holder (empty, or not the JSON above). Object stores (gs://)
have no locks, so remote outputs are not locked.
"""

import fcntl
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

from etils import epath

from trainer.errors import UserError

log = logging.getLogger('salt')
HEARTBEAT_SECONDS = 60
STALE_SECONDS = 300


class RunLock:
  """Held from `acquire` to `release`; a context manager.

  `RunLock(directory)` locks an output directory with `directory/lock`;
  `RunLock.beside(file)` locks an output file with `file.lock` next to it. `flag` is
  the option that names the output, for the advice to give this job another one.
  """

  def __init__(self, workdir: epath.PathLike, *, flag: str = '--workdir'):
    self.output = Path(workdir)
    self.path = None if '://' in str(workdir) else self.output / 'lock'
    self.flag = flag
    self._fd = None
    self._stop = threading.Event()
    self._heartbeat = None

  @classmethod
  def beside(cls, output: epath.PathLike, *, flag: str = '--output') -> 'RunLock':
    """The lock of an output that is one file: `OUTPUT.lock` in the same directory."""
    lock = cls(output, flag=flag)
    if lock.path is not None:
      lock.path = lock.output.with_name(lock.output.name + '.lock')
    return lock

  def __enter__(self) -> 'RunLock':
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()

  def acquire(self) -> None:
    """Raises UserError when another live job holds the output."""
    if self.path is None:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    fd, created = self._open_locked()
    try:
      other = _parse(_read(fd))
      if other is not None and not _stale(other, fd):
        raise self._in_use(other)
      if not created:
        log.warning('taking over %s from a job that is gone (%s)', self.path, other or 'unreadable lock')
      holder = {'host': socket.gethostname(), 'pid': os.getpid(), 'since': time.strftime('%Y-%m-%d %H:%M:%S')}
      os.ftruncate(fd, 0)
      os.pwrite(fd, json.dumps(holder).encode(), 0)
    except BaseException:
      os.close(fd)
      raise
    self._fd = fd
    self._stop.clear()
    self._heartbeat = threading.Thread(target=self._beat, daemon=True)
    self._heartbeat.start()

  def release(self) -> None:
    if self._fd is None:
      return
    self._stop.set()
    self._heartbeat.join()
    self._heartbeat = None
    # A job on another host may have taken the lock over through a filesystem that
    # keeps flocks per host; its lock is not ours to remove.
    holder = _parse(_read(self._fd)) or {}
    if (holder.get('host'), holder.get('pid')) == (socket.gethostname(), os.getpid()) and self._is_at_path(self._fd):
      self.path.unlink(missing_ok=True)
    os.close(self._fd)
    self._fd = None

  def _open_locked(self) -> tuple[int, bool]:
    """An fd of the file at the path, under this job's flock, and whether this job created
    the file. Raises UserError when another job holds the flock."""
    while True:
      try:
        fd, created = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
      except FileExistsError:
        try:
          fd, created = os.open(self.path, os.O_RDWR), False
        except FileNotFoundError:  # released in between
          continue
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        other = _parse(_read(fd))
        os.close(fd)
        raise self._in_use(other) from None
      if self._is_at_path(fd):
        return fd, created
      os.close(fd)

  def _is_at_path(self, fd: int) -> bool:
    try:
      at_path = os.stat(self.path)
    except FileNotFoundError:
      return False
    opened = os.fstat(fd)
    return (opened.st_dev, opened.st_ino) == (at_path.st_dev, at_path.st_ino)

  def _in_use(self, holder: dict | None) -> UserError:
    # A holder that has just taken the flock may not have written its name yet.
    who = (f'process {holder["pid"]} on {holder["host"]} (since {holder["since"]})' if holder
           else f'another job (which holds {self.path})')
    return UserError(f'{self.output} is in use by {who}; stop that job first, or give this one another {self.flag}')

  def _beat(self) -> None:
    while not self._stop.wait(HEARTBEAT_SECONDS):
      try:
        os.utime(self._fd)
      except OSError:
        return


def _read(fd: int) -> bytes:
  return os.pread(fd, 1 << 16, 0)


def _parse(text: bytes) -> dict | None:
  """The holder a lock file names, or None when it names none."""
  try:
    holder = json.loads(text)
  except ValueError:
    return None
  if not isinstance(holder, dict):
    return None
  pid, host, since = holder.get('pid'), holder.get('host'), holder.get('since')
  if type(pid) is not int or pid <= 0 or not isinstance(host, str) or not isinstance(since, str):
    return None
  return holder


def _stale(holder: dict, fd: int) -> bool:
  if holder['host'] == socket.gethostname():
    return not _alive(holder['pid'])
  return time.time() - os.fstat(fd).st_mtime > STALE_SECONDS


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True
