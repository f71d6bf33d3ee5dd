"""What a run reports: JSON lines, TensorBoard events, and MFU.

Only process 0 writes; the others get a writer that does nothing, so the training
loop never asks which process it is on.
"""

import json
import math
import time

import jax
from etils import epath
from tensorboardX import SummaryWriter

from trainer import hardware

class MetricWriter:
  """metrics.jsonl (one object per logged step) and TensorBoard events under a directory.

  A local metrics.jsonl is appended to. Object stores (gs://) cannot append, so there
  the file is rewritten whole at each write; it holds one short line per logged step.
  """

  def __init__(self, workdir: epath.PathLike, enabled: bool):
    self.enabled = enabled
    if not enabled:
      return
    self.path = epath.Path(workdir) / 'metrics.jsonl'
    self.remote = '://' in str(workdir)
    if self.remote:
      self.lines = self.path.read_text().splitlines() if self.path.exists() else []
    else:
      self.jsonl = self.path.open('a')
    self.tensorboard = SummaryWriter(str(epath.Path(workdir) / 'tensorboard'))

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    # Standard JSON has no NaN or infinity: a non-finite value is written as null.
    line = json.dumps({'step': step, **{k: v if math.isfinite(v) else None for k, v in metrics.items()}})
    if self.remote:
      self.lines.append(line)
      self.path.write_text('\n'.join(self.lines) + '\n')
    else:
      self.jsonl.write(line + '\n')
      self.jsonl.flush()
    for name, value in metrics.items():
      self.tensorboard.add_scalar(name, value, step)

  def close(self) -> None:
    if self.enabled:
      if not self.remote:
        self.jsonl.close()
      self.tensorboard.close()


class Throughput:
  """Tokens/s and MFU over the steps since the last call, and the training seconds so far.

  `train_seconds` counts wall-clock time in the training loop, across resumes
  (`seconds` carries the interrupted run's), and leaves out the time between a call
  and the next `restart` (evaluation).
  """

  def __init__(self, flops_per_token: float, tokens_per_step: int, devices: list[jax.Device],
               seconds: float = 0.0):
    peak = hardware.peak_flops(devices[0])
    self.flops_per_step = flops_per_token * tokens_per_step
    self.tokens_per_step = tokens_per_step
    self.peak = peak * len(devices) if peak else None
    self.seconds = seconds
    self.last_time, self.last_step = time.perf_counter(), None

  def restart(self, step: int) -> None:
    """Starts the next interval now, so time spent outside training steps is not counted."""
    self.last_time, self.last_step = time.perf_counter(), step

  def elapsed(self) -> float:
    return self.seconds + time.perf_counter() - self.last_time

  def __call__(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    last_step, self.last_step = self.last_step, step
    interval, self.last_time = now - self.last_time, now
    self.seconds += interval
    out = {'train_seconds': self.seconds}
    if last_step is None or step == last_step:
      return out
    seconds_per_step = interval / (step - last_step)
    out.update(tokens_per_sec=self.tokens_per_step / seconds_per_step, step_time=seconds_per_step)
    if self.peak:
      out['mfu'] = self.flops_per_step / seconds_per_step / self.peak
    return out


def describe(metrics: dict[str, float]) -> str:
  """The progress bar's postfix: loss, tokens/s, MFU (n/a where the peak is unknown)."""
  parts = [f'loss {metrics["loss"]:.3f}']
  if 'tokens_per_sec' in metrics:
    parts.append(f'{metrics["tokens_per_sec"]:,.0f} tok/s')
  mfu = metrics.get('mfu')
  parts.append(f'MFU {mfu:.1%}' if mfu is not None else 'MFU n/a')
  return ', '.join(parts)


def bits_per_byte(loss_sum: float, num_bytes: float) -> float:
  return loss_sum / math.log(2) / max(num_bytes, 1.0)
