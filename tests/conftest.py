"""Every test runs on CPU with 8 simulated devices, so each sharding path is exercised."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import random  # noqa: E402

import pytest  # noqa: E402

from trainer.config import defaults  # noqa: E402
from trainer.prepare import prepare  # noqa: E402

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


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory):
  """A prepared directory: 60 training documents (records of at most 64 tokens, so long
  documents span several), 8 validation documents, a 320-token vocabulary."""
  root = tmp_path_factory.mktemp('corpus')
  (root / 'train').mkdir()
  (root / 'valid').mkdir()
  train = write_corpus(root / 'train', 60, seed=0)
  valid = write_corpus(root / 'valid', 8, seed=1)
  out = root / 'prepared'
  prepare(train, out, validation=valid, vocab_size=320, max_record_tokens=64, workers=2)
  return out


@pytest.fixture(scope='session')
def sp_model(tiny_data):
  """The tiny corpus's sentencepiece model (320 tokens)."""
  return tiny_data / 'tokenizer.model'


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
