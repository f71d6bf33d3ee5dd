"""The teacher-student loss, forward + backward, on the device found: ms, peak memory, TFLOP/s.

    python -m bench.kernel                                     # the issue's shapes (a GPU or TPU)
    python -m bench.kernel --tokens 1024 --vocab 8192,32768     # a size a CPU finishes

Implementations: `naive` (whole [T, V] logits of both models, plain XLA), `xla` (the
vocabulary-chunked reference), `pallas` (the fused TPU kernels; interpret mode on
CPU, where its time means nothing) and `token_chunks` (the GPU shape). The loss is sum((1 - w) CE + w KD) at tau = 1, w = 0.5, in
bf16; gradients with respect to the student's hidden states and unembedding. FLOPs
are counted as in ../shared/bench/liger_kd.py: 2 T V (3 Ds + Dt). Peak memory is the
compiled program's arguments + temporaries + outputs (`memory_analysis`), so it is
comparable across devices. One JSON line per implementation and vocabulary (`what`:
loss_ms). With `--liger FILE`, the JSON lines ../shared/bench/liger_kd.py printed in
the same device run, also `liger_ms` and, per implementation, `loss_speedup_vs_liger`
(Liger's ms over ours) and `loss_peak_over_liger` (our peak over Liger's).
"""

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from bench.results import record
from kernels import weighted_loss


def naive_losses(h_s, w_s, targets, teacher):
  z = jnp.dot(h_s, w_s, preferred_element_type=jnp.float32)
  u = jnp.dot(*teacher, preferred_element_type=jnp.float32)
  log_p = jax.nn.log_softmax(z)
  ce = -jnp.take_along_axis(log_p, targets[:, None], -1)[:, 0]
  kd = -(jax.nn.softmax(u) * log_p).sum(-1)
  return ce, kd


def objective(impl: str, chunk_tokens: int):
  def loss(h_s, w_s, targets, h_t, w_t):
    if impl == 'naive':
      ce, kd = naive_losses(h_s, w_s, targets, (h_t, w_t))
      return (0.5 * ce + 0.5 * kd).sum()
    half = jnp.full(targets.shape, 0.5)
    return weighted_loss(h_s, w_s, targets, (h_t, w_t), half, half, impl=impl, chunk_tokens=chunk_tokens)[0]

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def run(impl: str, T: int, Ds: int, Dt: int, V: int, repeats: int, chunk_tokens: int = 0) -> dict:
  k = jax.random.split(jax.random.key(0), 5)
  args = (jax.random.normal(k[0], (T, Ds), jnp.bfloat16),
          (jax.random.normal(k[1], (Ds, V)) * 0.02).astype(jnp.bfloat16),
          jax.random.randint(k[4], (T,), 0, V),
          jax.random.normal(k[2], (T, Dt), jnp.bfloat16),
          (jax.random.normal(k[3], (Dt, V)) * 0.02).astype(jnp.bfloat16))
  step = objective(impl, chunk_tokens)
  compiled = step.lower(*args).compile()
  memory = compiled.memory_analysis()
  jax.block_until_ready(compiled(*args))
  start = time.perf_counter()
  for _ in range(repeats):
    out = compiled(*args)
  jax.block_until_ready(out)
  seconds = (time.perf_counter() - start) / repeats
  inputs = sum(x.size * x.dtype.itemsize for x in args)
  peak = memory.argument_size_in_bytes + memory.temp_size_in_bytes + memory.output_size_in_bytes
  return dict(impl=impl, device=jax.devices()[0].device_kind, T=T, Ds=Ds, Dt=Dt, V=V, ms=round(seconds * 1e3, 2),
              peak_GB=round(peak / 1e9, 3), inputs_GB=round(inputs / 1e9, 3),
              tflops=round(2 * T * V * (3 * Ds + Dt) / seconds / 1e12, 2), loss=float(out[0]))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--tokens', type=int, default=8192)
  parser.add_argument('--student-width', type=int, default=2048)
  parser.add_argument('--teacher-width', type=int, default=1024)
  parser.add_argument('--vocab', default='32768,131072,262144')
  parser.add_argument('--impls', default='naive,xla,token_chunks')
  parser.add_argument('--repeats', type=int, default=10)
  parser.add_argument('--chunk-tokens', type=int, default=0, help="token_chunks' chunk (0: its default)")
  parser.add_argument('--liger', type=Path, help="liger_kd.py's JSON lines from the same device run")
  args = parser.parse_args()
  liger = {}
  if args.liger and args.liger.exists():
    liger = {line['V']: line for line in map(json.loads, args.liger.read_text().splitlines()) if 'ms' in line}
  for V in (int(v) for v in args.vocab.split(',')):
    shape = dict(T=args.tokens, Ds=args.student_width, Dt=args.teacher_width, V=V)
    chunk = dict(chunk_tokens=args.chunk_tokens) if args.chunk_tokens else {}
    if V in liger:
      record('liger_ms', liger[V]['ms'], impl='liger', peak_GB=liger[V]['peak_GB'], **shape)
    for impl in args.impls.split(','):
      try:
        result = run(impl, args.tokens, args.student_width, args.teacher_width, V, args.repeats, args.chunk_tokens)
      except ValueError as e:  # an implementation this device does not run
        print(json.dumps(dict(impl=impl, V=V, error=str(e))), flush=True)
        continue
      record('loss_ms', result['ms'], impl=impl, peak_GB=result['peak_GB'], tflops=result['tflops'], **shape, **chunk)
      if V in liger:
        record('loss_speedup_vs_liger', round(liger[V]['ms'] / result['ms'], 3), impl=impl, **shape, **chunk)
        record('loss_peak_over_liger', round(result['peak_GB'] / liger[V]['peak_GB'], 3), impl=impl, **shape,
               **chunk)


if __name__ == '__main__':
  main()
