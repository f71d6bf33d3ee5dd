"""Throughput of `salt prepare` and of the loader (read, shuffle, pack, batch) on this host.

    python bench/data.py [--seq-len 2048] [--batch 32] [--steps 200] [--workers 0]

Uses the embedded Shakespeare corpus (downloaded on first use). The prepare figure
excludes sentencepiece training (timed separately); the loader figure is tokens of
finished batches per second, as the trainer would receive them. The index figures are
the bytes per record of the stream's index that the process holds privately and that
each worker process receives pickled (and so holds privately too).
"""

import argparse
import json
import pickle
import tempfile
import time
from pathlib import Path

import numpy as np

from trainer import corpus, data
from trainer.prepare import Skips, prepare, read_documents, train_tokenizer


def private_index_bytes(stream: data.TokenStream) -> int:
  """Bytes of the stream's index arrays in this process's own memory (a memory-mapped
  file's pages are the page cache's, shared by every process that maps it)."""
  return sum(a.nbytes for a in vars(stream).values() if isinstance(a, np.ndarray) and not isinstance(a, np.memmap))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--seq-len', type=int, default=2048)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--steps', type=int, default=200)
  parser.add_argument('--workers', type=int, default=0, help='loader worker processes')
  parser.add_argument('--vocab-size', type=int, default=2048)
  args = parser.parse_args()

  train_files, validation_files = corpus.split_files(corpus.shakespeare_texts())
  text_bytes = sum(f.stat().st_size for f in train_files)
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    start = time.perf_counter()
    docs = (d for f in train_files for d in read_documents(f, txt_split='file', text_field='text',
                                                           text_column='text', skips=Skips()))
    train_tokenizer(docs, args.vocab_size, tmp / 'tokenizer.model')
    tokenizer_seconds = time.perf_counter() - start

    start = time.perf_counter()
    manifest = prepare([str(f) for f in train_files], tmp / 'prepared', tokenizer=tmp / 'tokenizer.model')
    prepare_seconds = time.perf_counter() - start
    tokens = manifest['splits']['train']['tokens']

    stream = data.TokenStream(tmp / 'prepared', 'train', args.seq_len)
    records = manifest['splits']['train']['records']
    index_private, index_pickled = private_index_bytes(stream), len(pickle.dumps(stream))
    batches = data.train_batches(stream, global_batch=args.batch, seed=0, first_step=0,
                                 num_steps=args.steps + 5, workers=args.workers)
    for _ in range(5):  # warm-up: readers open, workers start
      next(batches)
    start = time.perf_counter()
    for _ in range(args.steps):
      next(batches)
    loader_seconds = time.perf_counter() - start
    batches.close()

  print(json.dumps({
      'corpus_mb': round(text_bytes / 1e6, 1), 'tokens': tokens,
      'tokenizer_training_s': round(tokenizer_seconds, 1),
      'prepare_s': round(prepare_seconds, 2),
      'prepare_tokens_per_sec': round(tokens / prepare_seconds),
      'prepare_mb_per_sec': round(text_bytes / 1e6 / prepare_seconds, 2),
      'loader': {'seq_len': args.seq_len, 'batch': args.batch, 'workers': args.workers, 'steps': args.steps},
      'loader_tokens_per_sec': round(args.steps * args.batch * args.seq_len / loader_seconds),
      'index': {'records': records, 'private_bytes_per_record': round(index_private / records, 2),
                'pickled_bytes_per_record': round(index_pickled / records, 2)},
  }))


if __name__ == '__main__':
  main()
