"""Child processes that end with their parent.

A child process (a Grain loader worker, a `salt prepare` tokenizer) is told to stop by
its parent; a parent that is SIGKILLed (the OOM killer, a scheduler, a user) tells it
nothing, and the orphan lives on holding its memory. A child that calls
`die_with_parent` first thing ends when its parent does:

    pool = multiprocessing.get_context('spawn').Pool(
        workers, initializer=processes.die_with_parent, initargs=(os.getpid(),))
"""

import ctypes
import os
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_POLL_SECONDS = 0.5


def die_with_parent(parent_pid: int | None = None) -> None:
  """Makes this process end when its parent process ends; call it at its start.

  `parent_pid`: the parent's pid as the parent saw it (os.getpid() there), so that a
  parent that died while this process was starting up is noticed; None takes the
  current parent. The parent is the process that started this one (with the spawn or
  fork start methods; with forkserver it is the server).

  On Linux the kernel kills this process (SIGKILL) when the parent ends. To the kernel
  the parent is the thread that started this process, so start it from a thread that
  lives as long as it (the main thread, a pool's own threads). Elsewhere a daemon
  thread polls the parent's pid and exits the process when it changes.
  """
  parent = os.getppid() if parent_pid is None else parent_pid
  if not _kill_me_when_parent_dies():
    threading.Thread(target=_exit_when_orphaned, args=(parent,), name='die-with-parent', daemon=True).start()
  # The parent may have gone before the signal was armed: this process was already
  # handed to another (init, or a subreaper).
  if os.getppid() != parent:
    os._exit(1)


def _kill_me_when_parent_dies() -> bool:
  """prctl(PR_SET_PDEATHSIG, SIGKILL); False where there is no such call."""
  if not sys.platform.startswith('linux'):
    return False
  try:
    prctl = ctypes.CDLL(None).prctl
  except (OSError, AttributeError):
    return False
  return prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0


def _exit_when_orphaned(parent: int) -> None:
  while os.getppid() == parent:
    time.sleep(_POLL_SECONDS)
  os._exit(1)
