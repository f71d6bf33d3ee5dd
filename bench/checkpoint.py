"""Save and restore time of a ~300M-parameter model's train state, and what asynchronous
saves cost the training loop.

    python -m bench.checkpoint [--dir /tmp/salt-ckpt-bench] [--steps 4]

Measures the step time without saving, the time `save` blocks the loop (the first save
of a run, which also compiles the checksum function, and a later one), the step time
while the write runs in the background, the time until the save is committed, and the
restore time. The overhead at a 10-minute interval is (blocking + extra step time during
the write) / 600 s. Runs on random tokens: no data needed.
"""

import argparse
import shutil
import time
from pathlib import Path

import jax
import numpy as np

from bench.results import record
from trainer import checkpoint, dryrun, sharding, train
from trainer import config as config_lib
from trainer.config import mesh_shape
from trainer.model import ModelConfig, param_count

SIZE = ['--config.model.vocab_size=32000', '--config.model.d_model=1024', '--config.model.n_layers=20',
        '--config.model.n_heads=16', '--config.model.n_kv_heads=16', '--config.model.head_dim=64',
        '--config.model.d_ff=2816', '--config.data.seq_len=64', '--config.data.global_batch_size=1',
        '--config.loss.vocab_chunk=8192']


def timed_steps(program, state, batch, steps):
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = program.train_step(state, batch)
  jax.block_until_ready(state)
  return state, (time.perf_counter() - start) / steps


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--dir', default='/tmp/salt-ckpt-bench')
  parser.add_argument('--steps', type=int, default=4)
  args, overrides = parser.parse_known_args()
  config = config_lib.load('configs/demo.py', SIZE + overrides)
  config_lib.validate(config, jax.device_count())
  mesh = sharding.make_mesh(mesh_shape(config.mesh, jax.device_count()))
  model_cfg = ModelConfig(**config.model)
  program = train.build(config, mesh, np.ones(model_cfg.vocab_size, np.int32))
  state = program.init(0)
  batch = sharding.host_batch_to_global(
      dryrun.random_batch(config.data.global_batch_size, config.data.seq_len, model_cfg.vocab_size, seed=0),
      program.batch_sharding)
  state, _ = timed_steps(program, state, batch, 1)  # compile
  state, step_s = timed_steps(program, state, batch, args.steps)

  shutil.rmtree(args.dir, ignore_errors=True)
  ckpts = checkpoint.Checkpoints(args.dir, every_steps=1, max_to_keep=2)
  start = time.perf_counter()
  ckpts.save(int(state.step), state, {'bench': True})
  blocking_s = time.perf_counter() - start
  state, step_during_write_s = timed_steps(program, state, batch, args.steps)
  ckpts.wait()
  committed_s = time.perf_counter() - start
  start = time.perf_counter()
  ckpts.save(int(state.step), state, {'bench': True})
  later_blocking_s = time.perf_counter() - start
  ckpts.wait()

  start = time.perf_counter()
  restored, _ = ckpts.restore(program.abstract_state, 'auto')
  jax.block_until_ready(restored)
  restore_s = time.perf_counter() - start
  ckpts.close()
  size_gb = sum(f.stat().st_size for f in (Path(args.dir) / str(int(state.step))).rglob('*') if f.is_file()) / 1e9
  shutil.rmtree(args.dir, ignore_errors=True)

  extra_s = max(step_during_write_s - step_s, 0.0) * args.steps
  record('checkpoint_overhead', round((blocking_s + extra_s) / 600, 5), interval_s=600,
         params=param_count(model_cfg), checkpoint_gb=round(size_gb, 2), step_s=round(step_s, 3),
         save_blocking_s=round(blocking_s, 3), later_save_blocking_s=round(later_blocking_s, 3),
         step_during_write_s=round(step_during_write_s, 3),
         save_committed_s=round(committed_s, 2), restore_s=round(restore_s, 2))


if __name__ == '__main__':
  main()
