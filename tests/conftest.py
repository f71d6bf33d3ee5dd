"""Every test runs on CPU with 8 simulated devices, so each sharding path is exercised."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # noqa: E402

from tests.helpers import write_corpus  # noqa: E402
from trainer.prepare import prepare  # noqa: E402


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
