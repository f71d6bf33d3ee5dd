"""Attention forward + backward per layer, each implementation on the device found, and
its agreement with the XLA reference on packed rows.

    python -m bench.attention                               # B 16, L 2048, H 16, E 128, bf16
    python -m bench.attention --batch 2 --seq 256 --heads 4 --head-dim 32 --dtype float32   # a CPU
    python -m bench.attention --window 512                  # sliding-window attention

Rows pack documents of random lengths (segment ids), as training rows do. For each
implementation that can run here (kernels.attention.unsupported), one JSON line
(`what`: attention_ms_per_layer): ms, the compiled temporaries, and the largest error
of the output and the gradients relative to the reference's largest value. On CPU the
Pallas kernels interpret, so their time means nothing there.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.results import record
from kernels import attention


def packed_segments(batch: int, seq_len: int, mean_length: int, seed: int = 0) -> np.ndarray:
  """[B, L] segment ids 1, 2, ...: documents of exponentially distributed lengths."""
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(batch):
    lengths = np.maximum(rng.exponential(mean_length, seq_len).astype(int), 1)
    ids = np.repeat(np.arange(1, lengths.size + 1), lengths)[:seq_len]
    rows.append(ids)
  return np.stack(rows).astype(np.int32)


def forward_and_backward(kernel: attention.Attention, window: int = 0):
  def run(q, k, v, segments, cotangent):
    out, vjp = jax.vjp(lambda q, k, v: kernel(q, k, v, segments, window=window), q, k, v)
    return (out, *vjp(cotangent))

  return jax.jit(run)


def time_compiled(compiled, args, repeats: int) -> float:
  """Seconds per call, after one call to warm up."""
  jax.block_until_ready(compiled(*args))
  start = time.perf_counter()
  for _ in range(repeats):
    out = compiled(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / repeats


def layer_inputs(B: int, L: int, H: int, K: int, E: int, dtype, mean_doc: int):
  keys = jax.random.split(jax.random.key(0), 4)
  return (jax.random.normal(keys[0], (B, L, H, E), dtype), jax.random.normal(keys[1], (B, L, K, E), dtype),
          jax.random.normal(keys[2], (B, L, K, E), dtype), jnp.asarray(packed_segments(B, L, mean_doc)),
          jax.random.normal(keys[3], (B, L, H, E), dtype))


def attention_seconds(impl: str, args, repeats: int, window: int = 0) -> tuple[float, jax.stages.Compiled]:
  compiled = forward_and_backward(attention.make_attention(impl), window).lower(*args).compile()
  return time_compiled(compiled, args, repeats), compiled


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--seq', type=int, default=2048)
  parser.add_argument('--heads', type=int, default=16)
  parser.add_argument('--kv-heads', type=int, default=0, help='default: as many as --heads')
  parser.add_argument('--head-dim', type=int, default=128)
  parser.add_argument('--dtype', default='bfloat16')
  parser.add_argument('--mean-doc', type=int, default=512, help='mean document length in a row')
  parser.add_argument('--window', type=int, default=0, help='sliding window in tokens; 0: none')
  parser.add_argument('--repeats', type=int, default=10)
  args = parser.parse_args()
  B, L, H, E = args.batch, args.seq, args.heads, args.head_dim
  K, dtype = args.kv_heads or H, jnp.dtype(args.dtype)
  backend = jax.default_backend()
  inputs = layer_inputs(B, L, H, K, E, dtype, args.mean_doc)
  shape = dict(B=B, L=L, H=H, K=K, E=E, dtype=dtype.name, mean_doc=args.mean_doc, window=args.window)
  reference = None
  for impl in attention.IMPLS[:-1]:
    reason = attention.unsupported(impl, backend, dtype, L, E, args.window)
    if reason:
      print(f'# {impl}: {reason}', flush=True)
      continue
    try:
      seconds, compiled = attention_seconds(impl, inputs, args.repeats, args.window)
    except Exception as e:  # a kernel that fails to compile on this device is a finding, not a crash
      print(f'# {impl}: failed: {type(e).__name__}: {str(e)[:300]}', flush=True)
      continue
    outputs = [np.asarray(x, np.float32) for x in compiled(*inputs)]
    reference = outputs if impl == 'xla' else reference
    error = max(float(np.abs(o - r).max() / np.abs(r).max()) for o, r in zip(outputs, reference))
    record('attention_ms_per_layer', round(seconds * 1e3, 3), impl=impl, **shape,
           temp_GB=round(compiled.memory_analysis().temp_size_in_bytes / 1e9, 3),
           max_rel_error_vs_xla=float(f'{error:.3g}'))
  print(f'# auto chooses {attention.choose("auto", backend, dtype, L, E, args.window)} on {backend}', flush=True)


if __name__ == '__main__':
  main()
