"""The Grain input pipeline: ArrayRecord shards -> packed, batched model inputs.

source -> shuffle by seed (reshuffled every epoch) -> this process's share ->
concat-then-split into rows of L + 1 tokens (segment ids and positions mark the
documents) -> window shuffle of rows -> batch -> shift into inputs and targets.

A batch is a dict of [B, L] numpy arrays (B = rows of this process):
  inputs, targets       token ids; targets[i] = the token after inputs[i]
  positions             position of each token inside its document
  segment_ids           1, 2, ... per document in the row; 0 is padding
  weights               1.0 where the target belongs to the same document, else 0.0
"""

from collections.abc import Iterator
from pathlib import Path

import grain
import numpy as np
import sentencepiece as spm

from trainer.prepare import read_manifest

# Rows kept in the window shuffle. Concat-then-split emits neighbouring rows of the same
# document; shuffling a window of rows keeps one long document from filling a batch.
ROW_SHUFFLE_WINDOW = 1024


def _source(data_dir: Path, split: str) -> grain.MapDataset:
  manifest = read_manifest(data_dir)
  if split not in manifest['splits']:
    raise ValueError(f'{data_dir} has no {split!r} split; it has {sorted(manifest["splits"])}')
  paths = [str(Path(data_dir) / s['file']) for s in manifest['splits'][split]['shards']]
  dtype = np.dtype(manifest['dtype'])
  return grain.MapDataset.source(grain.sources.ArrayRecordDataSource(paths)).map(
      lambda record: {'tokens': np.frombuffer(record, dtype=dtype).astype(np.int32)})


def _pack_and_batch(ds: grain.IterDataset, seq_len: int, batch_size: int, seed: int | None) -> grain.IterDataset:
  ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct={'tokens': seq_len + 1})
  if seed is not None:
    ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=ROW_SHUFFLE_WINDOW, seed=seed)
  return ds.batch(batch_size, drop_remainder=seed is not None).map(_to_model_inputs)


def _to_model_inputs(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  tokens, segments = rows['tokens'], rows['tokens_segment_ids']
  same_doc = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] != 0)
  return {
      'inputs': tokens[:, :-1],
      'targets': tokens[:, 1:],
      'positions': rows['tokens_positions'][:, :-1],
      'segment_ids': segments[:, :-1],
      'weights': same_doc.astype(np.float32),
  }


def train_batches(data_dir: Path, *, seq_len: int, batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Endless training batches of `batch_size` rows for this process."""
  ds = _source(data_dir, 'train').shuffle(seed).repeat()
  ds = ds[process_index::process_count].to_iter_dataset()
  return iter(_pack_and_batch(ds, seq_len, batch_size, seed))


def eval_batches(data_dir: Path, *, seq_len: int, batch_size: int, max_batches: int,
                 process_index: int = 0, process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """The first `max_batches` batches of the validation split, in order, unshuffled.

  The last batch is padded with rows of segment id 0 (weight 0) to `batch_size`.
  """
  ds = _source(data_dir, 'validation')[process_index::process_count].to_iter_dataset()
  for i, batch in enumerate(_pack_and_batch(ds, seq_len, batch_size, seed=None)):
    if i == max_batches:
      return
    yield _pad_rows(batch, batch_size)


def _pad_rows(batch: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
  missing = rows - len(batch['inputs'])
  return {k: np.pad(v, ((0, missing), (0, 0))) for k, v in batch.items()}


def token_bytes(tokenizer_path: Path) -> np.ndarray:
  """UTF-8 bytes each token id stands for (control tokens 0, byte tokens 1), for bits per byte."""
  sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
  sizes = np.zeros(sp.vocab_size(), np.int32)
  for i in range(sp.vocab_size()):
    if sp.is_byte(i):
      sizes[i] = 1
    elif not (sp.is_control(i) or sp.is_unknown(i)):
      sizes[i] = len(sp.id_to_piece(i).replace('\u2581', ' ').encode('utf-8'))
  return sizes
