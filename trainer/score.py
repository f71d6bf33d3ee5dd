"""`salt score`: how "challenging yet learnable" the small model finds each training record.

    S(x) = median { -log p(x_t | x_<t) : x_t in top_k(p(. | x_<t)) }      (k = 10)

the median loss over the tokens whose true value the model ranks in its top k. A
record with no such token has no score (NaN) and is never selected. Records are read
in windows of the model's sequence length (context restarts at each window); each
token after a record's first is predicted once.

`every` = n > 1 scores every n-th record only (the others stay NaN, never selected):
when stage 1 needs far fewer tokens than the corpus holds, a sample is enough to
select from, for 1/n of the cost.

The job runs on all devices and hosts (each host reads its rows of every global
batch), shows progress and continues where it stopped when run again. Output, beside
the shards: `scores.npy` (float32, one per training record, in record order) and
`scores.json` (teacher, k, counts).

What the job holds grows with records, not tokens. The sampled records' windows are
numbered in record order, so a record's windows are consecutive and it is complete
once its last window is scored. Each batch's losses come back to every host, which
takes the medians of the records completed in it, in NumPy (a median depends only on
its values, so these equal those of the whole corpus's losses sorted at once, bit for
bit); the one record still open at a batch's end carries its learnable losses, at most
one record's tokens, into the next. Besides that the job keeps an int64 per sampled
record (where its windows begin).

Progress lives in OUTPUT.partial/: settings.json, and one append-only file per
process, scores-P.bin, of blocks (one per batch in which P completed records) of a
header (magic, entries, CRC-32) and (record int64, score float32) entries. Each host
appends the records whose last window was among its rows of the batch: hosts write
their own parts. A rerun continues from the batch holding the first window of the
first record no part holds; process 0 reads every part, so with several processes
OUTPUT must be on storage they share, as the data already is. A block cut short or
damaged (a kill mid-write, a bad disk) ends its file: the rest is cut off with a
warning and its records are scored again. At the end process 0 joins the parts into
OUTPUT and OUTPUT.json and removes OUTPUT.partial/.
"""

import json
import logging
import os
import shutil
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from kernels import ce_and_rank
from kernels.attention import Attention
from trainer import data, salt, sharding, train
from trainer.config import mesh_shape
from trainer.errors import UserError
from trainer.lock import RunLock
from trainer.prepare import read_manifest
from trainer.progress import bar as progress_bar
from trainer.step import hidden_and_unembedding

log = logging.getLogger('salt')
# A progress block: magic, how many entries follow, the CRC-32 of their bytes.
BLOCK_HEADER = struct.Struct('<4sII')
BLOCK_MAGIC = b'SCR1'
ENTRY = np.dtype([('record', '<i8'), ('score', '<f4')])
SUMMARY_KEYS = frozenset({'teacher', 'top_k', 'every', 'scored'})
Carry = tuple[int, np.ndarray] | None  # the open record's sampled index and learnable losses so far


class Windows:
  """The windows of the sampled records (every `every`-th), numbered in record order.

  Holds `begins`, int64 [sampled + 1]: sampled record j has windows [begins[j], begins[j + 1])."""

  def __init__(self, offsets: np.ndarray, seq_len: int, every: int):
    lengths = np.diff(offsets)[::every]
    counts = np.maximum(-(-(lengths - 1) // seq_len), 0)
    self.begins = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    self.seq_len, self.every = seq_len, every
    self.count = int(self.begins[-1])

  def at(self, first: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Windows [first, stop) (those that exist): each one's sampled record j, start token,
    and whether it is its record's last."""
    w = np.arange(first, min(stop, self.count))
    j = np.searchsorted(self.begins, w, side='right') - 1
    return j, (w - self.begins[j]) * self.seq_len, w == self.begins[j + 1] - 1

  def records(self, j: np.ndarray) -> np.ndarray:
    return j * self.every


def read_window(record_tokens: np.ndarray, start: int, seq_len: int) -> dict[str, np.ndarray]:
  raw = record_tokens[start:start + seq_len + 1]
  tokens = np.zeros(seq_len + 1, np.int32)
  tokens[:raw.size] = raw
  valid = np.zeros(seq_len, np.float32)
  valid[:raw.size - 1] = 1.0
  return {'inputs': tokens[:-1], 'targets': tokens[1:], 'positions': np.arange(seq_len, dtype=np.int32) + start,
          'segment_ids': np.ones(seq_len, np.int32), 'weights': valid}


def make_score_step(graphdef: nnx.GraphDef, top_k: int, chunk: int, attention: Attention):
  """(params, batch) -> per-token loss and whether the target is in the model's top k, [B, L]."""

  def score_step(params, batch):
    h_TxD, w_DxV = hidden_and_unembedding(graphdef, params, batch, attention)
    loss, rank = ce_and_rank(h_TxD, w_DxV, batch['targets'].reshape(-1), chunk=chunk)
    shape = batch['targets'].shape
    return loss.reshape(shape), (rank < top_k).reshape(shape) & (batch['weights'] > 0)

  return score_step


def batch_scores(j_N: np.ndarray, last_N: np.ndarray, loss_NxL: np.ndarray, learnable_NxL: np.ndarray,
                 carry: Carry) -> tuple[np.ndarray, np.ndarray, Carry]:
  """The medians of the records completed in a batch's N windows (in window order), and
  what the record open at its end carries into the next batch.

  j_N: each window's sampled record; last_N: whether it is its record's last window.
  Returns (the completed records' j, their scores, float32, NaN for none learnable; the carry).
  """
  keep = learnable_NxL.reshape(-1)
  token_j = np.repeat(j_N, loss_NxL.shape[1])[keep]
  token_loss = loss_NxL.reshape(-1)[keep]
  if carry is not None:
    token_j = np.concatenate([np.full(carry[1].size, carry[0]), token_j])
    token_loss = np.concatenate([carry[1], token_loss])
  done = j_N[last_N]
  # Windows are in record order, so each record's tokens are one run of token_j.
  lo, hi = np.searchsorted(token_j, done, 'left'), np.searchsorted(token_j, done, 'right')
  scores = np.array([np.median(token_loss[a:b]) if b > a else np.nan for a, b in zip(lo, hi)], np.float32)
  if last_N[-1]:
    return done, scores, None
  return done, scores, (int(j_N[-1]), token_loss[np.searchsorted(token_j, j_N[-1], 'left'):].copy())


def score(teacher_path: str, data_dir: Path, *, top_k: int = 10, batch_size: int | None = None,
          every: int = 1, output: Path | None = None, progress: bool = True, restart: bool = False) -> dict:
  """Scores the training records of `data_dir` (every `every`-th) with the model at `teacher_path`;
  returns the summary.

  The work so far is kept in OUTPUT.partial/ with the settings it was made with; a run
  with other settings refuses to mix its scores into it, unless `restart` says to score
  from the start.
  """
  if every < 1:
    raise UserError(f'--every {every} must be >= 1')
  if top_k < 1:
    raise UserError(f'--top-k {top_k} must be >= 1: with no token counted as learnable, no record has a score')
  if batch_size is not None and batch_size < 1:
    raise UserError(f'--batch {batch_size} must be >= 1')
  data_dir = Path(data_dir)
  manifest = read_manifest(data_dir)
  output = _check_output(Path(output or data_dir / 'scores.npy'))
  meta_config = salt.teacher_metadata(teacher_path)['config']
  if top_k > meta_config['model']['vocab_size']:
    raise UserError(f'--top-k {top_k} is more than the {meta_config["model"]["vocab_size"]} tokens of the '
                    'vocabulary')
  seq_len = meta_config['data']['seq_len']
  batch_size = meta_config['data']['global_batch_size'] if batch_size is None else batch_size
  teacher, step, batch_sharding = _scorer(teacher_path, meta_config, batch_size, top_k, manifest['tokenizer_sha256'])
  stream = data.TokenStream(data_dir, 'train', seq_len)
  windows = Windows(stream.offsets, seq_len, every)

  partial = output.with_name(output.name + '.partial')
  settings = {'teacher': str(Path(teacher_path).resolve()), 'top_k': top_k, 'every': every, 'seq_len': seq_len,
              'batch': batch_size, 'records': len(stream.records), 'tokenizer_sha256': manifest['tokenizer_sha256']}
  lock = RunLock.beside(output)

  def claim() -> int:
    """One job writes OUTPUT: process 0 holds its lock, takes OUTPUT.partial/ over and says where to start."""
    lock.acquire()
    return _claim(partial, settings, restart, windows, batch_size)

  try:
    first = _on_process_0(claim)
    start = time.perf_counter()
    _score_batches(first, partial, teacher, step, batch_sharding, stream, windows, batch_size, progress)
    salt.free(teacher)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('salt score: every part appended')
    scored = _on_process_0(lambda: _join(partial, output, windows, len(stream.records)))
    candidates = -(-len(stream.records) // every)
    summary = {**settings, 'teacher': teacher_path, 'seconds': round(time.perf_counter() - start, 1),
               'sampled': candidates, 'scored': scored, 'unscored': candidates - scored}
    if jax.process_index() == 0:
      output.with_suffix('.json').write_text(json.dumps(summary, indent=2))
      shutil.rmtree(partial)
    return summary
  finally:
    lock.release()


def _score_batches(first: int, partial: Path, teacher: salt.Teacher, step: Callable, batch_sharding,
                   stream: data.TokenStream, windows: 'Windows', batch_size: int, progress: bool) -> None:
  """Scores batches [first, ...), each process appending the records it completes to its part."""
  n_batches = -(-windows.count // batch_size)
  if first:
    log.info('continuing from batch %d of %d', first, n_batches)
  per_process = batch_size // jax.process_count()
  mine = jax.process_index() * per_process
  bar = progress_bar(n_batches, first, enabled=progress, unit='batch', desc='scoring ')
  carry = None
  with _Part(partial / f'scores-{jax.process_index()}.bin') as part:
    for b in range(first, n_batches):
      j, starts, last = windows.at(b * batch_size, (b + 1) * batch_size)
      rows = slice(mine, mine + per_process)
      batch = _host_batch(stream, windows.records(j[rows]), starts[rows], per_process)
      loss, learnable = jax.device_get(step(teacher.params, sharding.host_batch_to_global(batch, batch_sharding)))
      done, scores, carry = batch_scores(j, last, loss[:j.size], learnable[:j.size], carry)
      # This process's records (their last window among its rows), and none that began
      # before this run: the losses of their first windows are not here.
      ours = np.flatnonzero(last) // per_process == jax.process_index()
      ours &= windows.begins[done] >= first * batch_size
      part.append(windows.records(done[ours]), scores[ours])
      bar.update(1)
  bar.close()


def _check_output(output: Path) -> Path:
  """OUTPUT, refused before any work when the scores or their summary cannot go there."""
  summary = output.with_suffix('.json')
  if output.suffix != '.npy':
    raise UserError(f'--output {output} must end in .npy: the summary goes beside it, ending in .json')
  if output.is_dir():
    raise UserError(f'--output {output} is a directory; name the scores file, such as {output / "scores.npy"}')
  if summary.is_dir():
    raise UserError(f'--output {output}: its summary {summary} would replace a directory; choose another --output')
  if not output.parent.is_dir():
    raise UserError(f'--output {output}: the directory {output.parent} does not exist')
  if summary.exists() and not _is_summary(summary):
    raise UserError(f'--output {output}: its summary {summary} exists and is not a salt score summary; '
                    'choose another --output')
  return output


def _is_summary(path: Path) -> bool:
  try:
    written = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, ValueError):
    return False
  return isinstance(written, dict) and SUMMARY_KEYS <= written.keys()


def _on_process_0(work: Callable[[], int]) -> int:
  """`work()` (a count >= 0), done by process 0 and told to the others. A UserError it
  raises stops every process: the others must not wait at a collective it never reaches."""
  value, error = -1, None
  if jax.process_index() == 0:
    try:
      value = work()
    except UserError as e:
      error = e
  value = int(multihost_utils.broadcast_one_to_all(np.int32(value)))
  if error:
    raise error
  if value < 0:
    raise UserError('process 0 stopped the job; its log says why')
  return value


def _claim(partial: Path, settings: dict, restart: bool, windows: Windows, batch_size: int) -> int:
  """Makes OUTPUT.partial/ this run's and returns the batch to start at: the one holding
  the first window of the first record that no part holds. A directory made with other
  settings is refused: its scores would mix two definitions."""
  if partial.exists() and not partial.is_dir():
    raise UserError(f'{partial} is not the directory salt score keeps its progress in; move it away')
  if restart:
    shutil.rmtree(partial, ignore_errors=True)
  partial.mkdir(exist_ok=True)
  settings_file = partial / 'settings.json'
  if not settings_file.exists():
    tmp = settings_file.with_name('settings.json.tmp')
    tmp.write_text(json.dumps(settings))
    os.replace(tmp, settings_file)
  try:
    before = json.loads(settings_file.read_text())
  except ValueError:
    raise UserError(f'{settings_file} is damaged; run with --restart to score from the start') from None
  changed = [f'{k} {before.get(k)!r} -> {v!r}' for k, v in settings.items() if before.get(k) != v]
  if changed:
    raise UserError(f'{partial} holds scores made with other settings ({"; ".join(changed)}); run with those '
                    'to continue it, or with --restart to score from the start')
  missing = _read_parts(partial, settings['records'], windows)[1]
  if not missing.size:
    return -(-windows.count // batch_size)
  return int(windows.begins[missing[0]]) // batch_size


def _read_parts(partial: Path, records: int, windows: Windows) -> tuple[np.ndarray, np.ndarray]:
  """The scores every part holds, float32 [records] (NaN where none), and the sampled
  records with windows that no part holds, ascending (their j)."""
  scores, held = np.full(records, np.nan, np.float32), np.zeros(records, bool)
  for path in partial.glob('scores-*.bin'):
    entries = read_part(path)[0]
    scores[entries['record']], held[entries['record']] = entries['score'], True
  return scores, np.flatnonzero(~held[::windows.every] & (np.diff(windows.begins) > 0))


def _join(partial: Path, output: Path, windows: Windows, records: int) -> int:
  """Writes OUTPUT from every part; returns how many records have a score."""
  scores, missing = _read_parts(partial, records, windows)
  if missing.size:
    raise UserError(f'{partial} lacks the scores of {missing.size} records (record {windows.records(missing[0])} '
                    'first): with several processes, --output must be on storage that all of them write to')
  tmp = output.with_name(output.name + '.tmp.npy')
  np.save(tmp, scores)
  os.replace(tmp, output)
  return int(np.isfinite(scores).sum())


def read_part(path: Path) -> tuple[np.ndarray, int]:
  """A progress part's entries, ENTRY [n], and how many of its bytes are whole blocks:
  reading stops at the first block cut short or failing its CRC."""
  raw = memoryview(path.read_bytes())
  blocks, at = [], 0
  while at + BLOCK_HEADER.size <= len(raw):
    magic, n, crc = BLOCK_HEADER.unpack_from(raw, at)
    body = at + BLOCK_HEADER.size
    end = body + n * ENTRY.itemsize
    if magic != BLOCK_MAGIC or end > len(raw) or zlib.crc32(raw[body:end]) != crc:
      break
    blocks.append(np.frombuffer(raw[body:end], ENTRY))
    at = end
  return (np.concatenate(blocks) if blocks else np.zeros(0, ENTRY)), at


class _Part:
  """This process's progress part, opened for appending after its last whole block."""

  def __init__(self, path: Path):
    path.parent.mkdir(exist_ok=True)  # on a host that does not share process 0's disk; _join then says so
    whole = read_part(path)[1] if path.exists() else 0
    if path.exists() and path.stat().st_size > whole:
      log.warning('%s: its last %d bytes are not whole blocks (a run stopped while writing, or damage); they are '
                  'cut off and their records scored again', path, path.stat().st_size - whole)
    self.file = open(path, 'ab')
    self.file.truncate(whole)

  def append(self, records: np.ndarray, scores: np.ndarray) -> None:
    if not records.size:
      return
    entries = np.empty(records.size, ENTRY)
    entries['record'], entries['score'] = records, scores
    body = entries.tobytes()
    # One write, flushed: a kill leaves whole blocks and at most one torn one.
    self.file.write(BLOCK_HEADER.pack(BLOCK_MAGIC, records.size, zlib.crc32(body)) + body)
    self.file.flush()

  def __enter__(self) -> '_Part':
    return self

  def __exit__(self, *exc) -> None:
    self.file.close()


def _scorer(teacher_path: str, meta_config: dict, batch_size: int, top_k: int, tokenizer_sha256: str):
  """The teacher in the mesh its run used, its jitted scoring step and the batch's sharding."""
  mesh = sharding.make_mesh(mesh_shape(meta_config['mesh'], jax.device_count()))
  rules = sharding.parse_rules(meta_config['sharding'])
  batch_shards = int(np.prod([mesh.shape[a] for a in rules['batch']]))
  if batch_size % batch_shards or batch_size % jax.process_count():
    raise UserError(f'--batch {batch_size} does not divide over the batch axes ({batch_shards}) and processes')
  teacher = salt.load_teacher(teacher_path, mesh, rules, tokenizer_sha256)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  attention = train.attention_fn('auto', teacher.model, meta_config['data']['seq_len'], mesh, rules)
  # Replicated: every host gets the batch's losses, so a record whose windows span hosts' rows needs no exchange.
  step = jax.jit(make_score_step(teacher.graphdef, top_k, meta_config['loss']['vocab_chunk'], attention),
                 in_shardings=(jax.tree.map(lambda x: x.sharding, teacher.params), batch_sharding),
                 out_shardings=sharding.replicated(mesh))
  return teacher, step, batch_sharding


def _host_batch(stream: data.TokenStream, records: np.ndarray, starts: np.ndarray, rows: int) -> dict:
  """This process's `rows` windows of the batch: (records, starts), then empty ones past the last window."""
  seq_len = stream.row_len - 1
  # A record's windows are neighbours: read each record of the batch once.
  needed = sorted({int(r) for r in records})
  # A process's rows of the last batch may all lie past the last window: it reads nothing.
  tokens = dict(zip(needed, stream.record_tokens(needed))) if needed else {}
  host = [read_window(tokens[int(r)], int(s), seq_len) for r, s in zip(records, starts)]
  host += [_empty_window(seq_len)] * (rows - len(host))
  return {k: np.stack([w[k] for w in host]) for k in host[0]}


def describe(summary: dict) -> str:
  return (f'scored {summary["scored"]} of {summary["records"]} records (every {summary["every"]}); '
          f'{summary["unscored"]} of the sampled have no token in the top {summary["top_k"]} and are never selected')


def _empty_window(seq_len: int) -> dict[str, np.ndarray]:
  zeros = np.zeros(seq_len, np.int32)
  return {'inputs': zeros, 'targets': zeros, 'positions': zeros, 'segment_ids': zeros,
          'weights': np.zeros(seq_len, np.float32)}
