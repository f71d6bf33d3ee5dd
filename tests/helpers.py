"""What the tests share: a made-up corpus and a model small enough for a CPU."""

import contextlib
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from trainer.config import defaults

WORDS = ('the king queen fool sword crown night day love death speaks runs falls rises '
         'and or but with without under over castle forest sea storm').split()


def write_corpus(directory, n_docs: int, seed: int) -> list[str]:
  """Small text files of made-up sentences: enough structure for a model to learn."""
  rng = random.Random(seed)
  paths = []
  for i in range(n_docs):
    lines = [' '.join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))) + '.'
             for _ in range(rng.randint(5, 30))]
    path = directory / f'doc{i:03d}.txt'
    path.write_text('\n'.join(lines))
    paths.append(str(path))
  return paths



def tiny_config(data_dir=None):
  """A model small enough that a step compiles and runs in about a second on CPU."""
  c = defaults()
  c.total_steps = 40
  c.model.update(vocab_size=320, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                 d_ff=128, dtype='float32')
  c.data.update(path=str(data_dir or ''), seq_len=32, global_batch_size=8)
  c.optim.update(lr=3e-3, warmup_steps=4)
  c.loss.vocab_chunk = 128
  c.eval.update(every_steps=20, batches=2)
  c.log.every_steps = 5
  return c


@contextlib.contextmanager
def lock_held_elsewhere(output: Path) -> Iterator[int]:
  """Another process holds the lock of the single-file output `output`; yields its pid."""
  code = ('import sys, time; from trainer.lock import RunLock\n'
          'with RunLock.beside(sys.argv[1]):\n'
          '  print("held", flush=True); time.sleep(60)\n')
  holder = subprocess.Popen([sys.executable, '-c', code, str(output)], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == 'held\n'
    yield holder.pid
  finally:
    holder.kill()
    holder.wait()
