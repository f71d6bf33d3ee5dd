"""Running `salt train` in a subprocess, stopping it with a signal, and reading what it left."""

import json
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp


def write_config(path, data_dir, steps: int, **checkpoint) -> str:
  """A config file for `salt train` subprocesses: the tiny model for `steps` steps, every step
  logged, evaluation off, `checkpoint` settings applied; returns its path."""
  path.write_text(
      'from tests.helpers import tiny_config\n'
      'def get_config(arg=None):\n'
      f'  c = tiny_config({str(data_dir)!r})\n'
      f'  c.total_steps = {steps}\n'
      f'  c.checkpoint.update(**{checkpoint!r})\n'
      '  c.log.every_steps = 1\n'
      '  c.eval.every_steps = 1000\n'
      '  return c\n')
  return str(path)


def logged(workdir):
  path = workdir / 'metrics.jsonl'
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def salt_train(config_file, workdir, *overrides, stop_at=None, sig=signal.SIGKILL):
  """Runs `salt train`; with `stop_at`, sends `sig` once step `stop_at` is logged. Returns the exit code."""
  process = subprocess.Popen([sys.executable, '-m', 'trainer.cli', 'train', '--config', config_file,
                              '--workdir', str(workdir), *overrides], stderr=subprocess.PIPE, text=True)
  if stop_at is not None:
    deadline = time.time() + 300
    while not any(r['step'] >= stop_at for r in logged(workdir)):
      if process.poll() is not None or time.time() > deadline:
        raise RuntimeError(f'salt train ended before step {stop_at}: {process.stderr.read()}')
      time.sleep(0.02)
    process.send_signal(sig)
  code = process.wait()
  process.stderr.close()
  return code


def saved_state(workdir, step):
  """The arrays of the checkpoint at `step`, as numpy, by path."""
  restored = ocp.StandardCheckpointer().restore((workdir / 'checkpoints' / str(step) / 'state').resolve())
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(restored)}


def differences(workdir, losses: dict[int, float], state: dict[str, np.ndarray], final_step: int) -> list[str]:
  """How a run differs from a reference: its per-step losses (every step it ran, also the
  ones run again after a kill, must be bitwise the reference's, which shows the same data
  and parameters) and its final checkpoint."""
  found = []
  records = logged(workdir)
  found += [f'step {r["step"]}: loss {r["loss"]} != {losses.get(r["step"])}' for r in records
            if r['loss'] != losses.get(r['step'])]
  if {r['step'] for r in records} != set(losses):
    found.append(f'steps logged {sorted({r["step"] for r in records})} != {sorted(losses)}')
  got = saved_state(workdir, final_step)
  if got.keys() != state.keys():
    found.append('the final checkpoints hold different arrays')
  found += [f'{key} differs' for key in state if key in got and not np.array_equal(got[key], state[key])]
  return found
