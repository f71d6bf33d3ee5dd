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
batch), shows progress, saves its progress every `SAVE_EVERY` batches and continues
from there when run again. Output, beside the shards: `scores.npy` (float32, one per
training record, in record order) and `scores.json` (teacher, k, counts).
"""

import json
import logging
import os
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from kernels import ce_and_rank
from kernels.attention import Attention
from trainer import data, salt, sharding, train
from trainer.progress import bar as progress_bar
from trainer.config import mesh_shape
from trainer.errors import UserError
from trainer.prepare import read_manifest

log = logging.getLogger('salt')
SAVE_EVERY = 50


def windows(stream: data.TokenStream, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """(record, start) of every window of seq_len + 1 tokens; windows overlap by one token."""
  lengths = np.diff(stream.offsets)
  counts = np.maximum(-(-(lengths - 1) // seq_len), 0)
  records = np.repeat(np.arange(lengths.size), counts)
  starts = np.concatenate([np.arange(c) * seq_len for c in counts]) if counts.sum() else np.zeros(0, np.int64)
  return records, starts.astype(np.int64)


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
    model = nnx.merge(graphdef, params)
    h = model(batch['inputs'], batch['positions'], batch['segment_ids'], attention)
    loss, rank = ce_and_rank(h.reshape(-1, h.shape[-1]), model.unembedding(), batch['targets'].reshape(-1),
                             chunk=chunk)
    shape = batch['targets'].shape
    return loss.reshape(shape), (rank < top_k).reshape(shape) & (batch['weights'] > 0)

  return score_step


def median_per_record(records: np.ndarray, losses: np.ndarray, learnable: np.ndarray, n: int) -> np.ndarray:
  """Median of the learnable tokens' losses of each record; NaN where there is none."""
  keep = learnable.astype(bool)
  rec, loss = records[keep], losses[keep]
  order = np.lexsort((loss, rec))
  rec, loss = rec[order], loss[order]
  scores = np.full(n, np.nan, np.float32)
  bounds = np.searchsorted(rec, np.arange(n + 1))
  for r in np.flatnonzero(np.diff(bounds)):
    scores[r] = np.median(loss[bounds[r]:bounds[r + 1]])
  return scores


def score(teacher_path: str, data_dir: Path, *, top_k: int = 10, batch_size: int | None = None,
          every: int = 1, output: Path | None = None, progress: bool = True, restart: bool = False) -> dict:
  """Scores the training records of `data_dir` (every `every`-th) with the model at `teacher_path`;
  returns the summary.

  The work so far is kept in OUTPUT.partial.npz with the settings it was made with; a
  run with other settings refuses to mix its scores into it, unless `restart` says to
  score from the start.
  """
  if every < 1:
    raise UserError(f'--every {every} must be >= 1')
  if top_k < 1:
    raise UserError(f'--top-k {top_k} must be >= 1: with no token counted as learnable, no record has a score')
  data_dir = Path(data_dir)
  manifest = read_manifest(data_dir)
  output = Path(output or data_dir / 'scores.npy')
  if not output.parent.is_dir():
    raise UserError(f'--output {output}: the directory {output.parent} does not exist')
  meta_config = salt.teacher_metadata(teacher_path)['config']
  seq_len = meta_config['data']['seq_len']
  batch_size = batch_size or meta_config['data']['global_batch_size']
  teacher, step, batch_sharding = _scorer(teacher_path, meta_config, batch_size, top_k, manifest['tokenizer_sha256'])
  stream = data.TokenStream(data_dir, 'train', seq_len)
  records, starts = windows(stream, seq_len)
  sampled = records % every == 0
  records, starts = records[sampled], starts[sampled]
  n_batches = -(-records.size // batch_size)

  partial = output.with_name(output.name + '.partial.npz')
  settings = {'teacher': str(Path(teacher_path).resolve()), 'top_k': top_k, 'every': every, 'seq_len': seq_len,
              'batch': batch_size, 'records': len(stream.records), 'tokenizer_sha256': manifest['tokenizer_sha256']}
  losses = np.zeros((n_batches * batch_size, seq_len), np.float32)
  learnable = np.zeros((n_batches * batch_size, seq_len), bool)
  first = 0 if restart else _continue(partial, settings, losses, learnable)
  if first:
    log.info('continuing from batch %d of %d', first, n_batches)

  per_process = batch_size // jax.process_count()
  mine = jax.process_index() * per_process
  start = time.perf_counter()
  bar = progress_bar(n_batches, first, enabled=progress, unit='batch', desc='scoring ')
  for b in range(first, n_batches):
    batch = _host_batch(stream, records, starts, range(b * batch_size + mine, b * batch_size + mine + per_process))
    loss, ok = jax.device_get(step(teacher.params, sharding.host_batch_to_global(batch, batch_sharding)))
    losses[b * batch_size:(b + 1) * batch_size], learnable[b * batch_size:(b + 1) * batch_size] = loss, ok
    if (b + 1) % SAVE_EVERY == 0 and jax.process_index() == 0:
      _atomic_savez(partial, losses=losses, learnable=learnable, done=b + 1, settings=json.dumps(settings))
    bar.update(1)
  bar.close()

  salt.free(teacher)
  window_records = np.repeat(np.pad(records, (0, n_batches * batch_size - records.size), constant_values=-1),
                             seq_len)
  valid = window_records >= 0
  scores = median_per_record(window_records[valid], losses.reshape(-1)[valid], learnable.reshape(-1)[valid],
                             len(stream.records))
  summary = {**settings, 'teacher': teacher_path, 'seconds': round(time.perf_counter() - start, 1)}
  return _write_scores(scores, summary, output, partial)


def _write_scores(scores: np.ndarray, settings: dict, output: Path, partial: Path) -> dict:
  """OUTPUT (the scores) and OUTPUT.json (the summary, returned), from process 0; the partial file goes."""
  candidates = int(np.ceil(scores.size / settings['every']))
  scored = int(np.isfinite(scores).sum())
  summary = {**settings, 'records': int(scores.size), 'sampled': candidates, 'scored': scored,
             'unscored': candidates - scored}
  if jax.process_index() == 0:
    tmp = output.with_name(output.name + '.tmp.npy')
    np.save(tmp, scores)
    os.replace(tmp, output)
    output.with_suffix('.json').write_text(json.dumps(summary, indent=2))
    partial.unlink(missing_ok=True)
  return summary


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
  step = jax.jit(make_score_step(teacher.graphdef, top_k, meta_config['loss']['vocab_chunk'], attention),
                 in_shardings=(jax.tree.map(lambda x: x.sharding, teacher.params), batch_sharding),
                 out_shardings=sharding.replicated(mesh))
  return teacher, step, batch_sharding


def _continue(partial: Path, settings: dict, losses: np.ndarray, learnable: np.ndarray) -> int:
  """Fills in the batches a partial file holds; returns how many. A file made with other
  settings is refused: its scores would mix two definitions."""
  if not partial.exists():
    return 0
  saved = np.load(partial)
  before = json.loads(str(saved['settings'])) if 'settings' in saved else {}
  changed = [f'{k} {before.get(k)!r} -> {v!r}' for k, v in settings.items() if before.get(k) != v]
  if changed:
    raise UserError(f'{partial} holds scores made with other settings ({"; ".join(changed)}); run with those '
                    'to continue it, or with --restart to score from the start')
  done = int(saved['done'])
  rows = done * settings['batch']
  losses[:rows], learnable[:rows] = saved['losses'][:rows], saved['learnable'][:rows]
  return done


def _host_batch(stream: data.TokenStream, records: np.ndarray, starts: np.ndarray, rows: range) -> dict:
  """This process's windows `rows` of the batch (empty ones past the last window)."""
  seq_len = stream.row_len - 1
  # A record's windows are neighbours: read each record of the batch once.
  needed = sorted({int(records[i]) for i in rows if i < records.size})
  tokens = dict(zip(needed, stream.record_tokens(needed)))
  host = [read_window(tokens[records[i]], starts[i], seq_len) if i < records.size else _empty_window(seq_len)
          for i in rows]
  return {k: np.stack([w[k] for w in host]) for k in host[0]}


def describe(summary: dict) -> str:
  return (f'scored {summary["scored"]} of {summary["records"]} records (every {summary["every"]}); '
          f'{summary["unscored"]} of the sampled have no token in the top {summary["top_k"]} and are never selected')


def _empty_window(seq_len: int) -> dict[str, np.ndarray]:
  zeros = np.zeros(seq_len, np.int32)
  return {'inputs': zeros, 'targets': zeros, 'positions': zeros, 'segment_ids': zeros,
          'weights': np.zeros(seq_len, np.float32)}


def _atomic_savez(path: Path, **arrays) -> None:
  tmp = path.with_name(path.name + '.tmp')
  with open(tmp, 'wb') as f:
    np.savez(f, **arrays)
  os.replace(tmp, path)
