"""Tokens/s and MFU of the train step for a named config on whatever devices JAX finds.

    python bench/step.py --config configs/demo.py [--config.KEY=VALUE ...] [--steps 20]

Runs on random tokens (the step's cost does not depend on their values), so it needs
no prepared data. Prints one line per measurement and a JSON summary.
"""

import argparse
import json
import time

import jax
import numpy as np

from trainer import config as config_lib
from trainer import dryrun, sharding, train
from trainer.config import mesh_shape
from trainer.metrics import peak_flops
from trainer.model import ModelConfig, flops_per_token, param_count


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--config', required=True)
  parser.add_argument('--steps', type=int, default=20)
  args, overrides = parser.parse_known_args()
  config = config_lib.load(args.config, overrides)
  config_lib.validate(config, jax.device_count())
  mesh = sharding.make_mesh(mesh_shape(config.mesh, jax.device_count()))
  model_cfg = ModelConfig(**config.model)
  program = train.build(config, mesh, np.ones(model_cfg.vocab_size, np.int32))
  state = program.init(config.seed)
  rows, seq_len = config.data.global_batch_size // jax.process_count(), config.data.seq_len
  batch = sharding.host_batch_to_global(dryrun.random_batch(rows, seq_len, model_cfg.vocab_size, seed=0),
                                        program.batch_sharding)

  start = time.perf_counter()
  state, metrics = program.train_step(state, batch)
  jax.block_until_ready(metrics)
  compile_seconds = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(args.steps):
    state, metrics = program.train_step(state, batch)
  jax.block_until_ready(metrics)
  step_seconds = (time.perf_counter() - start) / args.steps

  tokens_per_sec = config.data.global_batch_size * seq_len / step_seconds
  model_flops_per_sec = flops_per_token(model_cfg, seq_len) * tokens_per_sec
  peak = peak_flops(jax.devices()[0])
  mfu = model_flops_per_sec / (peak * jax.device_count()) if peak else None
  print(json.dumps({
      'config': args.config, 'overrides': overrides, 'device': jax.devices()[0].device_kind,
      'devices': jax.device_count(), 'params': param_count(model_cfg),
      'compile_s': round(compile_seconds, 2), 'step_s': round(step_seconds, 4),
      'tokens_per_sec': round(tokens_per_sec), 'model_tflops_per_sec': round(model_flops_per_sec / 1e12, 4),
      'mfu': None if mfu is None else round(mfu, 4),
  }))


if __name__ == '__main__':
  main()
