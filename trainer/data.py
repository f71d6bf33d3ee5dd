"""The input pipeline: a split's records as one token stream, cut into rows, indexed by step.

The records of a split (all of them, or those a selection keeps) are laid end to end
in shard order: one token stream. Row r is tokens [r*S, (r+1)*S) of it, S = L + 1;
the last row of the stream is padded. Every epoch visits all rows in a new order
(Grain's index shuffle, reseeded per epoch), so over an epoch each token, and so
each document, is read exactly once.

The global batch of step s is rows [s*B, (s+1)*B) of that shuffled order, and
process p of P reads its part [p*B/P, (p+1)*B/P). A batch is a pure function of
(data, seed, seq_len, B, step): the loader's whole state is the step. A job resumed
at step s reads what the uninterrupted job would have read at s, and because the
global batch does not depend on P, this holds when it resumes on a different number
of hosts too (each host then reads a different slice of the same global batch).

A batch is a dict of [B/P, L] numpy arrays:
  inputs, targets       token ids; targets[i] is the token after inputs[i]
  positions             each token's position in its document
  segment_ids           1, 2, ... per document piece in the row; 0 is padding
  weights               1.0 where the target follows in the same document, else 0.0
"""

import concurrent.futures
import fcntl
import functools
import glob
import logging
import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path
from typing import IO

import absl.flags
import grain
import numpy as np

from trainer import processes, tokenizer
from trainer.errors import UserError
from trainer.prepare import file_sha256, read_manifest


# Shards already hashed by this process, keyed by (path, size, mtime): a run opens the
# training split more than once (all records, a selection) and need not read it twice.
_verified: set[tuple[str, int, int]] = set()


def _check_shard(data_dir: Path, shard: dict, verify_hashes: bool) -> None:
  """A shard and its index must be there and hold what `salt prepare` wrote (size, and
  with `verify_hashes` the sha256 of each), so damage is found at the start, by file name."""
  files = [(shard['file'], shard.get('bytes'), shard.get('sha256')), (shard['index'], None, shard.get('index_sha256'))]
  for name, size, sha256 in files:
    path = data_dir / name
    if not path.is_file():
      raise UserError(f'{path} is missing; prepare the data again')
    stat = path.stat()
    if size is not None and stat.st_size != size:
      raise UserError(f'{path} is {stat.st_size} bytes, but salt prepare wrote {size}: it was truncated or changed '
                      'since; prepare the data again')
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if verify_hashes and sha256 and key not in _verified:
      if file_sha256(path) != sha256:
        raise UserError(f'{path} does not hold what salt prepare wrote (its sha256 differs from the manifest\'s): '
                        'it was damaged or changed since; prepare the data again')
      _verified.add(key)


def _check_shards(data_dir: Path, shards: list[dict], verify_hashes: bool) -> None:
  # Hashing reads every byte: shards are read in parallel (hashlib releases the GIL).
  start, hashed = time.perf_counter(), len(_verified)
  with concurrent.futures.ThreadPoolExecutor(min(8, len(shards) or 1)) as pool:
    list(pool.map(lambda shard: _check_shard(data_dir, shard, verify_hashes), shards))
  if len(_verified) > hashed:
    logging.info('verified %d files of %s against the manifest in %.1f s (data.verify_hashes)',
                 len(_verified) - hashed, data_dir, time.perf_counter() - start)


_INDEX_PREFIX = 'salt-index-'


def _index_dir() -> tuple[str, IO]:
  """A new temporary directory for a stream's index, and the open file of its `lock`,
  which this process holds under an exclusive flock while the stream lives."""
  _remove_orphaned_indexes()
  directory = tempfile.mkdtemp(prefix=_INDEX_PREFIX)
  lock = open(os.path.join(directory, 'lock.partial'), 'w')
  fcntl.flock(lock, fcntl.LOCK_EX)
  # Named `lock` only once locked, so that no other process takes a fresh directory for an orphan.
  os.replace(lock.name, os.path.join(directory, 'lock'))
  return directory, lock


def _remove_orphaned_indexes() -> None:
  """Removes the index directories of processes that died without removing them (a
  SIGKILL runs no finalizer): the kernel dropped their flock, so it can be taken."""
  for lock_path in glob.glob(os.path.join(tempfile.gettempdir(), f'{_INDEX_PREFIX}*', 'lock')):
    try:
      with open(lock_path) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        shutil.rmtree(os.path.dirname(lock_path), ignore_errors=True)
    except OSError:  # its owner lives, another process removed it first, or another user's
      continue


def _remove_index(directory: str, lock: IO, creator: int) -> None:
  # A forked child inherits the finalizer; only the process that wrote the files removes them.
  if os.getpid() == creator:
    shutil.rmtree(directory, ignore_errors=True)
    lock.close()


class TokenStream:
  """Random access to the rows of a split's token stream.

  The index (per record of the split: document and start; per record of the stream:
  offsets, and for a selection the record ids) lives in .npy files of a temporary
  directory, memory-mapped read-only, which the stream removes when it is garbage
  collected (or the next stream opened, where its process was killed). A worker process
  that receives the stream pickled maps the same files: the processes share one copy in
  the page cache instead of each holding its own.
  """

  def __init__(self, data_dir: Path, split: str, seq_len: int, records: np.ndarray | None = None,
               verify_hashes: bool = True):
    """`records`: the record ids to read, ascending (a selection); None reads them all.
    `verify_hashes`: hash every shard against the manifest (else sizes only)."""
    manifest = read_manifest(data_dir)
    if split not in manifest['splits']:
      raise UserError(f'{data_dir} has no {split!r} split; it has {sorted(manifest["splits"])}')
    shards = [s for s in manifest['splits'][split]['shards'] if s['records']]
    _check_shards(Path(data_dir), shards, verify_hashes)
    self._dir, lock = _index_dir()
    weakref.finalize(self, _remove_index, self._dir, lock, os.getpid())
    total = sum(s['records'] for s in shards)
    # Reading every record, the stream's k-th is record k: no array needed.
    self.records = range(total) if records is None else self._write('records', np.asarray(records, np.int64))
    self._write_index(Path(data_dir), shards, total)
    self.row_len = seq_len + 1
    self.num_rows = -(-int(self.offsets[-1]) // self.row_len)
    self.dtype = np.dtype(manifest['dtype'])
    self.paths = [str(Path(data_dir) / s['file']) for s in shards]
    self.shard_records = [s['records'] for s in shards]
    self._source = None

  def _write_index(self, data_dir: Path, shards: list[dict], total: int) -> None:
    """Fills document, start and offsets shard by shard, straight into their files, so
    that the whole index is never in this process's memory."""
    document, start = self._create('document', total), self._create('start', total)
    offsets = self._create('offsets', len(self.records) + 1)
    offsets[0] = 0
    lo, at, documents = 0, 0, 0  # the shard's first record, stream record, document
    for shard in shards:
      hi = lo + shard['records']
      with np.load(data_dir / shard['index']) as index:
        # Documents are numbered within a shard; offset them so that ids are unique.
        document[lo:hi] = index['document'] + documents
        start[lo:hi] = index['start']
        length = index['length']
      if not isinstance(self.records, range):
        length = length[self.records[np.searchsorted(self.records, lo):np.searchsorted(self.records, hi)] - lo]
      offsets[at + 1:at + 1 + length.size] = offsets[at] + np.cumsum(length)
      lo, at, documents = hi, at + length.size, documents + shard['documents']
    for name, array in (('document', document), ('start', start), ('offsets', offsets)):
      array.flush()
      setattr(self, name, self._open(name))

  def _path(self, name: str) -> str:
    return os.path.join(self._dir, f'{name}.npy')

  def _create(self, name: str, size: int) -> np.memmap:
    return np.lib.format.open_memmap(self._path(name), mode='w+', dtype=np.int64, shape=(size,))

  def _open(self, name: str) -> np.memmap:
    return np.load(self._path(name), mmap_mode='r')

  def _write(self, name: str, array: np.ndarray) -> np.memmap:
    np.save(self._path(name), array)
    return self._open(name)

  def __len__(self) -> int:
    return self.num_rows

  def __getstate__(self):
    # A worker process maps this process's files rather than receive copies of the
    # arrays, and opens its own readers.
    mapped = [k for k, v in self.__dict__.items() if isinstance(v, np.memmap)]
    return {**{k: v for k, v in self.__dict__.items() if k not in mapped}, '_source': None, '_mapped': mapped}

  def __setstate__(self, state: dict) -> None:
    mapped = state.pop('_mapped')
    self.__dict__.update(state)
    for name in mapped:
      setattr(self, name, self._open(name))

  def _reader(self) -> grain.sources.ArrayRecordDataSource:
    if self._source is None:
      self._source = grain.sources.ArrayRecordDataSource(self.paths)
    return self._source

  def record_tokens(self, ks: list[int]) -> list[np.ndarray]:
    """The tokens of the stream's records ks, read together.

    Raises UserError naming the shards read when a record cannot be read (a shard
    changed after its size was checked, or damaged inside).
    """
    ids = [int(self.records[k]) for k in ks]
    try:
      return [np.frombuffer(raw, self.dtype) for raw in self._reader().__getitems__(ids)]
    except Exception as e:  # ArrayRecord raises several types for damaged files
      bounds = np.cumsum(self.shard_records)
      files = sorted({self.paths[int(np.searchsorted(bounds, i, side='right'))] for i in ids})
      raise UserError(f'records {ids[0]}..{ids[-1]} cannot be read from {", ".join(files)} '
                      f'({type(e).__name__}); prepare the data again') from None

  def row(self, r: int) -> dict[str, np.ndarray]:
    """Tokens, segment ids and positions of row r, each [S]."""
    tokens = np.zeros(self.row_len, np.int32)
    segments = np.zeros(self.row_len, np.int32)
    positions = np.zeros(self.row_len, np.int32)
    lo = r * self.row_len
    hi = min(lo + self.row_len, int(self.offsets[-1]))
    if lo >= hi:  # past the end of the stream: an empty (all padding) row
      return {'tokens': tokens, 'segment_ids': segments, 'positions': positions}
    first = int(np.searchsorted(self.offsets, lo, side='right')) - 1
    last = int(np.searchsorted(self.offsets, hi, side='left'))
    ids = np.asarray(self.records[first:last]).tolist()
    at, segment, previous = 0, 0, None
    for k, raw in zip(range(first, last), self._reader().__getitems__(ids)):
      record = self.records[k]
      begin, end = max(lo - self.offsets[k], 0), min(hi - self.offsets[k], self.offsets[k + 1] - self.offsets[k])
      piece = np.frombuffer(raw, self.dtype)[begin:end]
      # A piece continues the previous one's segment only if it is the next part of
      # the same document (a selection may drop the parts between).
      continues = previous is not None and self.document[record] == self.document[previous] and \
          self.start[record] == self.start[previous] + self.offsets[k] - self.offsets[k - 1]
      segment += 0 if continues else 1
      tokens[at:at + piece.size] = piece
      segments[at:at + piece.size] = segment
      positions[at:at + piece.size] = self.start[record] + begin + np.arange(piece.size)
      at, previous = at + piece.size, record
    return {'tokens': tokens, 'segment_ids': segments, 'positions': positions}


def to_model_inputs(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  tokens, segments = row['tokens'], row['segment_ids']
  same_doc = (segments[1:] == segments[:-1]) & (segments[1:] != 0)
  return {
      'inputs': tokens[:-1],
      'targets': tokens[1:],
      'positions': row['positions'][:-1],
      'segment_ids': segments[:-1],
      'weights': same_doc.astype(np.float32),
  }


def _batches(rows: grain.MapDataset, stream: TokenStream, *, global_batch: int, first_step: int,
             num_steps: int, process_index: int, process_count: int, workers: int) -> grain.DatasetIterator:
  """Batches of this process for steps [first_step, first_step + num_steps) of `rows`."""
  if global_batch % process_count:
    raise UserError(f'data.global_batch_size={global_batch} does not divide over {process_count} processes')
  per_process = global_batch // process_count

  def global_row(k: int) -> int:
    step, j = divmod(k, per_process)
    return step * global_batch + process_index * per_process + j

  ds = grain.MapDataset.range(first_step * per_process, (first_step + num_steps) * per_process)
  ds = ds.map(lambda k: to_model_inputs(stream.row(rows[global_row(k)])))
  ds = ds.batch(per_process, drop_remainder=True).to_iter_dataset()
  if workers:
    # Grain's worker processes read absl flags; salt is not an absl app, so take the defaults.
    if not absl.flags.FLAGS.is_parsed():
      absl.flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers),
                        worker_init_fn=functools.partial(_start_worker, os.getpid()))
  return iter(ds)


def _start_worker(parent_pid: int, index: int, count: int) -> None:
  """A loader worker's set-up: it ends with the process it loads for, which may be
  SIGKILLed and then cannot stop it."""
  del index, count  # Grain passes the worker's place among its peers
  processes.die_with_parent(parent_pid)


def train_batches(stream: TokenStream, *, global_batch: int, seed: int, first_step: int, num_steps: int,
                  process_index: int = 0, process_count: int = 1, workers: int = 0) -> grain.DatasetIterator:
  """This process's training batches of steps [first_step, first_step + num_steps).

  Close the iterator when done: with workers it holds processes and shared memory.
  """
  rows = grain.MapDataset.range(len(stream)).shuffle(seed).repeat()
  return _batches(rows, stream, global_batch=global_batch, first_step=first_step, num_steps=num_steps,
                  process_index=process_index, process_count=process_count, workers=workers)


def eval_batches(stream: TokenStream, *, global_batch: int, max_batches: int,
                 process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
  """The first `max_batches` batches of the stream in order; rows past its end are empty."""
  num_steps = min(max_batches, -(-len(stream) // global_batch))
  rows = grain.MapDataset.range(num_steps * global_batch)
  return _batches(rows, stream, global_batch=global_batch, first_step=0, num_steps=num_steps,
                  process_index=process_index, process_count=process_count, workers=0)


SELECTION_RULES = ('top', 'band')


def select_records(scores: np.ndarray, *, rule: str, keep_fraction: float = 1.0,
                   band: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
  """Ids of the records a selection rule keeps, ascending.

  scores: one float per record of the split; NaN means unscored, never kept.
  rule 'top': the round(keep_fraction * n) highest of the n scored records.
  rule 'band': the scored records whose rank from the lowest score, as a fraction of
    n, lies in [band[0], band[1]): (0.25, 0.75) keeps the middle half.
  Equal scores are ordered by record id, so the result is deterministic.
  """
  scored = np.flatnonzero(~np.isnan(scores))
  n = scored.size
  if rule == 'top':
    descending = scored[np.lexsort((scored, -scores[scored]))]
    keep = descending[:int(round(keep_fraction * n))]
  elif rule == 'band':
    ascending = scored[np.lexsort((scored, scores[scored]))]
    keep = ascending[int(round(band[0] * n)):int(round(band[1] * n))]
  else:
    raise UserError(f'selection rule {rule!r} must be one of {SELECTION_RULES}')
  return np.sort(keep)


def token_bytes(tokenizer_path: Path) -> np.ndarray:
  """UTF-8 bytes each token id stands for (special tokens 0, byte tokens 1), for bits per
  byte: `tokenizer_path` is a prepared directory's tokenizer (its manifest names it)."""
  return tokenizer.load(tokenizer_path).token_bytes()
