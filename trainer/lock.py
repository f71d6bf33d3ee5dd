"""One job per run directory: `RUN/lock` names the host and process that train there.

Two jobs in one directory would save over each other's checkpoints and interleave
their metrics, so a second job stops with one line that names the holder. The holder
refreshes the file every HEARTBEAT_SECONDS; a lock whose process is gone (on this
host) or that nobody has refreshed for STALE_SECONDS (a job killed on another host)
is taken over, with a warning. Object stores (gs://) cannot create a file only if it
is absent, so remote run directories are not locked.
"""

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
  """Held from `acquire` to `release`; a context manager."""

  def __init__(self, workdir: epath.PathLike):
    self.path = None if '://' in str(workdir) else Path(workdir) / 'lock'
    self._stop = threading.Event()
    self._heartbeat = None

  def __enter__(self) -> 'RunLock':
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()

  def acquire(self) -> None:
    """Raises UserError when another live job holds the directory."""
    if self.path is None:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    holder = {'host': socket.gethostname(), 'pid': os.getpid(), 'since': time.strftime('%Y-%m-%d %H:%M:%S')}
    while True:
      try:
        with open(self.path, 'x') as f:
          json.dump(holder, f)
        break
      except FileExistsError:
        other = self._holder()
        if other is not None and not self._stale(other):
          raise UserError(f'{self.path.parent} is in use by process {other["pid"]} on {other["host"]} (since '
                          f'{other["since"]}); stop that job first, or give this one another --workdir') from None
        log.warning('taking over %s from a job that is gone (%s)', self.path, other or 'unreadable lock')
        self.path.unlink(missing_ok=True)
    self._heartbeat = threading.Thread(target=self._beat, daemon=True)
    self._heartbeat.start()

  def release(self) -> None:
    if self._heartbeat is None:
      return
    self._stop.set()
    self._heartbeat.join()
    self._heartbeat = None
    if (self._holder() or {}).get('pid') == os.getpid():
      self.path.unlink(missing_ok=True)

  def _holder(self) -> dict | None:
    try:
      return json.loads(self.path.read_text())
    except (OSError, ValueError):
      return None

  def _stale(self, holder: dict) -> bool:
    try:
      age = time.time() - self.path.stat().st_mtime
    except OSError:
      return True
    if holder.get('host') == socket.gethostname():
      return not _alive(holder.get('pid', -1))
    return age > STALE_SECONDS

  def _beat(self) -> None:
    while not self._stop.wait(HEARTBEAT_SECONDS):
      try:
        os.utime(self.path)
      except OSError:
        return


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True
