"""Kills one training run with SIGKILL at 20 random steps and checks it ends bitwise equal
to an uninterrupted run (same per-step losses, same final checkpoint).

    python -m bench.kill_soak [--kills 20] [--steps 90] [--seed 0]

Uses the demo config shrunk to a model that takes well under a second per step, on the
embedded corpus, checkpointing every 3 steps. Prints a JSON summary.
"""

import argparse
import json
import random
import signal
import tempfile
import time
from pathlib import Path

from tests.runs import differences, logged, salt_train, saved_state


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--kills', type=int, default=20)
  parser.add_argument('--steps', type=int, default=90)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  overrides = [f'--config.total_steps={args.steps}', '--config.checkpoint.every_steps=3',
               '--config.log.every_steps=1', '--config.eval.every_steps=100000',
               '--config.model.d_model=64', '--config.model.n_layers=2', '--config.model.d_ff=192',
               '--config.data.seq_len=64']
  kills = sorted(random.Random(args.seed).sample(range(2, args.steps - 1), args.kills))
  with tempfile.TemporaryDirectory() as tmp:
    reference, killed = Path(tmp) / 'reference', Path(tmp) / 'killed'
    start = time.time()
    if salt_train('configs/demo.py', reference, *overrides) != 0:
      raise SystemExit('the uninterrupted run failed')
    losses = {r['step']: r['loss'] for r in logged(reference)}
    state = saved_state(reference, args.steps)
    codes = [salt_train('configs/demo.py', killed, *overrides, stop_at=step) for step in kills]
    final = salt_train('configs/demo.py', killed, *overrides)
    found = differences(killed, losses, state, args.steps)
    steps_run = len(logged(killed))
  print(json.dumps({
      'kills': kills, 'kill_exit_codes_ok': all(c == -signal.SIGKILL for c in codes), 'final_exit_code': final,
      'steps': args.steps, 'steps_run_including_repeats': steps_run, 'bitwise_equal': not found,
      'differences': found[:10], 'seconds': round(time.time() - start),
  }))


if __name__ == '__main__':
  main()
