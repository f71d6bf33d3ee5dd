"""What `salt score` holds and writes as the corpus grows: 1x, 10x, 100x the records.

    python -m bench.score_scale [--records 250] [--scales 1 10 100] [--batch 64]

Builds a synthetic corpus (made-up sentences, records of at most 64 tokens, a
320-token vocabulary) at each scale with one tokenizer, trains a tiny teacher (one
layer, d_model 32, seq_len 32) for 2 steps on the smallest, and scores each corpus on
this host's devices. Per scale it reports, per scored token (each token predicted) and
per record:

* kept: the arrays the scorer keeps across batches, by their sizes: the sampled
  records' window bounds (`Windows.begins`) and the largest carry of an open record's
  losses between two batches;
* loop peak: tracemalloc's peak over the scoring loop, tracing from the second batch
  (the first compiles the step) to the last: what the loop allocates and holds at once,
  the carry and each batch's transients (its windows, the losses fetched, the medians).
  Device buffers are XLA's, not traced;
* join peak: tracemalloc's peak while process 0 joins the parts into OUTPUT;
* progress bytes: the size of OUTPUT.partial/ when the loop ends. It is append-only,
  so this is all that was written to it.
"""

import argparse
import json
import random
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np

from bench.results import record
from trainer import config as config_lib
from trainer import data, train
from trainer import score as score_lib
from trainer.prepare import prepare

WORDS = ('the king queen fool sword crown night day love death speaks runs falls rises '
         'and or but with without under over castle forest sea storm').split()


def write_documents(path: Path, n_docs: int, seed: int) -> Path:
  """n_docs made-up documents of 5-30 sentences, one JSON line each."""
  rng = random.Random(seed)
  with open(path, 'w') as f:
    for _ in range(n_docs):
      text = '\n'.join(' '.join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))) + '.'
                       for _ in range(rng.randint(5, 30)))
      f.write(json.dumps({'text': text}) + '\n')
  return path


def tiny_teacher(data_dir: Path, workdir: Path) -> str:
  config = config_lib.defaults()
  config.total_steps = 2
  config.model.update(vocab_size=320, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=16, d_ff=64,
                      dtype='float32')
  config.data.update(path=str(data_dir), seq_len=32, global_batch_size=8)
  config.loss.vocab_chunk = 128
  config.optim.warmup_steps = 1
  config.checkpoint.every_steps = 2
  config.eval.every_steps = 1000
  train.train(config, workdir)
  return str(workdir / 'checkpoints' / '2')


class Probe:
  """Wraps the scorer's per-batch functions to measure what it holds and writes."""

  def __init__(self):
    self.batches = self.loop_peak = self.join_peak = self.progress_bytes = self.carry_bytes = 0

  def host_batch(self, read):
    def wrapped(*args):
      self.batches += 1
      if self.batches == 2:
        tracemalloc.start()
      return read(*args)
    return wrapped

  def batch_scores(self, reduce):
    def wrapped(*args):
      done, scores, carry = reduce(*args)
      self.carry_bytes = max(self.carry_bytes, 0 if carry is None else carry[1].nbytes)
      return done, scores, carry
    return wrapped

  def join(self, join):
    def wrapped(partial, *args):
      self.loop_peak = tracemalloc.get_traced_memory()[1]
      self.progress_bytes = sum(p.stat().st_size for p in partial.iterdir())
      tracemalloc.reset_peak()
      base = tracemalloc.get_traced_memory()[0]
      scored = join(partial, *args)
      self.join_peak = tracemalloc.get_traced_memory()[1] - base
      return scored
    return wrapped


def measure(teacher: str, data_dir: Path, batch: int) -> dict:
  probe = Probe()
  originals = {name: getattr(score_lib, name) for name in ('_host_batch', 'batch_scores', '_join')}
  score_lib._host_batch = probe.host_batch(originals['_host_batch'])
  score_lib.batch_scores = probe.batch_scores(originals['batch_scores'])
  score_lib._join = probe.join(originals['_join'])
  try:
    summary = score_lib.score(teacher, data_dir, top_k=10, batch_size=batch, output=data_dir / 'scores.npy',
                              progress=False)
  finally:
    tracemalloc.stop()  # a no-op where the loop had one batch and never started it
    for name, fn in originals.items():
      setattr(score_lib, name, fn)
  offsets = data.TokenStream(data_dir, 'train', 32).offsets
  tokens, records = int(np.maximum(np.diff(offsets) - 1, 0).sum()), summary['records']
  kept = score_lib.Windows(offsets, 32, every=1).begins.nbytes + probe.carry_bytes

  def figures(name: str, n: int) -> dict:
    return {f'{name}_bytes': n, f'{name}_per_token': round(n / tokens, 4), f'{name}_per_record': round(n / records, 2)}

  return {'records': records, 'scored_tokens': tokens, 'batches': probe.batches, **figures('kept', kept),
          **figures('loop_peak', probe.loop_peak), **figures('join_peak', probe.join_peak),
          **figures('progress', probe.progress_bytes), 'seconds': summary['seconds']}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--records', type=int, default=250, help='about how many records at scale 1')
  parser.add_argument('--scales', type=int, nargs='+', default=[1, 10, 100])
  parser.add_argument('--batch', type=int, default=64, help='windows per batch')
  args = parser.parse_args()
  docs = max(1, args.records // 6)  # a document of 5-30 sentences makes about 6 records of 64 tokens
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    teacher = tokenizer = None
    for scale in sorted(args.scales):
      data_dir = tmp / f'x{scale}'
      manifest = prepare([str(write_documents(tmp / f'x{scale}.jsonl', docs * scale, seed=scale))], data_dir,
                         vocab_size=320, tokenizer=tokenizer, max_record_tokens=64, workers=1)
      tokenizer = tokenizer or data_dir / manifest['tokenizer']
      teacher = teacher or tiny_teacher(data_dir, tmp / 'teacher')
      figures = measure(teacher, data_dir, args.batch)
      record('score_scale_loop_peak_bytes_per_record', figures['loop_peak_per_record'], scale=scale,
             batch=args.batch, **figures)


if __name__ == '__main__':
  main()
