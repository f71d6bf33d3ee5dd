"""Tokens/s and MFU of the train step for a named config on whatever devices JAX finds,
and how the step's time splits: attention, loss, the rest.

    python -m bench.step --config configs/paper.py:slm --config.mesh.fsdp=1 \
        --config.data.global_batch_size=16 [--config.model.remat=save_matmuls] [--steps 20] [--profile DIR]

Runs on random tokens packed as documents (the step's cost does not depend on the
values), so it needs no prepared data. One JSON line (`what`: step_mfu). The split
times the attention kernel (forward + backward of one layer, and the forward again
where the remat policy recomputes it, times the layers) and the loss (forward +
backward at the step's tokens) alone, at one device's share of the batch and heads;
the rest is the step minus both. `--profile DIR` writes a profiler trace of a few
steps (TensorBoard's profile plugin or Perfetto read it) for the exact split.
"""

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.attention import attention_seconds, layer_inputs, packed_segments, time_compiled
from bench.results import record
from kernels import attention, weighted_loss
from trainer import config as config_lib
from trainer import dryrun, sharding, train
from trainer.hardware import peak_flops
from trainer.model import ModelConfig, flops_per_token, param_count

# Policies that keep the attention output, and so the flash kernels' residuals.
SAVES_ATTENTION = ('save_everything', 'save_attention', 'save_matmuls_and_attention')


def step_seconds(program, batch, steps: int, seed: int) -> tuple[float, float]:
  """(compile seconds, seconds per step)."""
  state = program.init(seed)
  start = time.perf_counter()
  state, metrics = program.train_step(state, batch)
  jax.block_until_ready(metrics)
  compile_seconds = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = program.train_step(state, batch)
  jax.block_until_ready(metrics)
  return compile_seconds, (time.perf_counter() - start) / steps


def split(config, model_cfg: ModelConfig, mesh, impl: str, repeats: int = 5) -> dict[str, float]:
  """Milliseconds per step of attention (all layers) and of the loss, each timed alone on one device."""
  rules = sharding.parse_rules(config.sharding)
  shards = lambda logical: math.prod(mesh.shape[a] for a in rules[logical])
  B, L = config.data.global_batch_size // shards('batch'), config.data.seq_len
  H, K = model_cfg.n_heads // shards('heads'), model_cfg.n_kv_heads // shards('kv_heads')
  dtype = jnp.dtype(model_cfg.dtype)
  layer = layer_inputs(B, L, H, K, model_cfg.head_dim, dtype, mean_doc=512)
  per_layer, _ = attention_seconds(impl, layer, repeats)
  if model_cfg.remat not in SAVES_ATTENTION:
    kernel = attention.make_attention(impl)
    forward = jax.jit(kernel).lower(*layer[:4]).compile()
    per_layer += time_compiled(forward, layer[:4], repeats)

  T, D, V = B * L, model_cfg.d_model, model_cfg.vocab_size // shards('vocab')
  keys = jax.random.split(jax.random.key(1), 3)
  h = jax.random.normal(keys[0], (T, D), dtype)
  w = (jax.random.normal(keys[1], (D, V)) * D ** -0.5).astype(jnp.float32)
  targets = jax.random.randint(keys[2], (T,), 0, V)
  share = jnp.full((T,), 1 / T)
  loss = lambda h, w: weighted_loss(h, w, targets, None, share, impl=config.loss.impl,
                                    chunk=config.loss.vocab_chunk, chunk_tokens=config.loss.chunk_tokens)[0]
  loss_step = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(h, w).compile()
  return {'attention_ms': round(per_layer * model_cfg.n_layers * 1e3, 2),
          'loss_ms': round(time_compiled(loss_step, (h, w), repeats) * 1e3, 2)}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--config', required=True)
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--profile', help='write a profiler trace of 3 steps to this directory')
  args, overrides = parser.parse_known_args()
  config = config_lib.load(args.config, overrides)
  config_lib.validate(config, jax.device_count())
  mesh = train.make_mesh(config)
  model_cfg = ModelConfig(**config.model)
  program = train.build(config, mesh, np.ones(model_cfg.vocab_size, np.int32))
  rows, seq_len = config.data.global_batch_size // jax.process_count(), config.data.seq_len
  host = dryrun.random_batch(rows, seq_len, model_cfg.vocab_size, seed=0)
  host['segment_ids'] = packed_segments(rows, seq_len, mean_length=512)
  batch = sharding.host_batch_to_global(host, program.batch_sharding)
  compile_s, step_s = step_seconds(program, batch, args.steps, config.seed)
  if args.profile:
    with jax.profiler.trace(args.profile):
      step_seconds(program, batch, 3, config.seed)

  impl = attention.choose(config.attention.impl, mesh.devices.flat[0].platform, jnp.dtype(model_cfg.dtype),
                          seq_len, model_cfg.head_dim, model_cfg.sliding_window)
  times = split(config, model_cfg, mesh, impl)
  tokens_per_sec = config.data.global_batch_size * seq_len / step_s
  model_flops_per_sec = flops_per_token(model_cfg, seq_len) * tokens_per_sec
  peak = peak_flops(jax.devices()[0])
  mfu = model_flops_per_sec / (peak * jax.device_count()) if peak else None
  record('step_mfu', None if mfu is None else round(mfu, 4), config=args.config, overrides=overrides,
         params=param_count(model_cfg), B=config.data.global_batch_size, L=seq_len, remat=model_cfg.remat,
         attention=impl, loss=config.loss.impl, devices=jax.device_count(), compile_s=round(compile_s, 1),
         step_ms=round(step_s * 1e3, 1), tokens_per_sec=round(tokens_per_sec),
         model_tflops_per_sec=round(model_flops_per_sec / 1e12, 3), **times,
         rest_ms=round(step_s * 1e3 - times['attention_ms'] - times['loss_ms'], 1))


if __name__ == '__main__':
  main()
