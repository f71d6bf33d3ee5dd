"""Progress for people and for logs: a bar on a terminal, a plain line every few seconds elsewhere.

Where output is not a terminal (a pod worker's log, CI, `| tee`), a bar's carriage
returns would make one unreadable line per run; there each report is a line such as
`step 120/1000 (12%), 0:05:12 elapsed, 0:38:08 left: loss 3.214, ...`, which
`salt launch tpu` also reads to see training advance.
"""

import datetime
import sys
import time

import tqdm

PLAIN_EVERY_SECONDS = 10.0


def _clock(seconds: float) -> str:
  return str(datetime.timedelta(seconds=round(seconds)))


class PlainProgress:
  """tqdm's interface, as the trainer uses it, writing plain lines."""

  def __init__(self, total: int, initial: int, unit: str, desc: str, disable: bool):
    self.total, self.n, self.unit, self.desc, self.disable = total, initial, unit, desc, disable
    self.first, self.start, self.postfix = initial, time.monotonic(), ''
    self.last_line = self.start

  def update(self, n: int = 1) -> None:
    self.n += n
    now = time.monotonic()
    if now - self.last_line >= PLAIN_EVERY_SECONDS or self.n == self.total:
      self._line(now)

  def set_postfix_str(self, postfix: str, refresh: bool = True) -> None:
    self.postfix = postfix

  def _line(self, now: float) -> None:
    self.last_line = now
    if self.disable:
      return
    elapsed, done = now - self.start, self.n - self.first
    left = f', {_clock(elapsed / done * (self.total - self.n))} left' if done else ''
    print(f'{self.desc}{self.unit} {self.n}/{self.total} ({self.n / max(self.total, 1):.0%}), {_clock(elapsed)} elapsed{left}'
          + (f': {self.postfix}' if self.postfix else ''), file=sys.stderr, flush=True)

  def close(self) -> None:
    if self.n != self.total and self.n != self.first:
      self._line(time.monotonic())


def bar(total: int, initial: int = 0, *, enabled: bool = True, unit: str = 'step', desc: str = ''):
  """A tqdm bar on a terminal, otherwise PlainProgress."""
  if not (sys.stderr.isatty() and sys.stdout.isatty()):
    return PlainProgress(total, initial, unit, desc, disable=not enabled)
  return tqdm.tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, unit=unit, desc=desc,
                   bar_format='{desc}{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}] {postfix}')
