"""`salt prepare`: raw text -> a sentencepiece model and tokenized ArrayRecord shards.

Each input file is one task, run in parallel over the cores; task i of a split writes

  {split}-{i:05d}.arrayrecord   records of at most `max_record_tokens` token ids (little-endian)
  {split}-{i:05d}.index.npz     per record: document (within the task), start, length;
                                and the task's token counts (for the unigram entropy)
  {split}-{i:05d}.json          the task's counts, skipped input and problems; written last

A document longer than `max_record_tokens` spans consecutive records, so a reader
fetches a few KB for a row of tokens, never a whole book. Every document ends with
the EOS token. A file is written under a `.partial` name and renamed when complete,
and a task's `.json` comes after its data: re-running skips the tasks whose `.json`
exists and redoes the rest, and `manifest.json`, written last of all, marks the whole
directory complete. `settings.json`, written first, records the inputs (path, size,
modification time) and every setting: a run with others refuses the directory rather
than mix or return stale shards, unless told to prepare it again (`overwrite`).
"""

import collections
import glob
import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import sentencepiece as spm
from array_record.python.array_record_module import ArrayRecordWriter

from trainer.errors import UserError
from trainer.progress import bar as progress_bar

MANIFEST = 'manifest.json'
SETTINGS = 'settings.json'
TOKENIZER = 'tokenizer.model'
MAX_PROBLEMS = 1000
# Bumped whenever the layout of a prepared directory changes.
FORMAT = 1


def expand(patterns: list[str]) -> list[Path]:
  """Paths and globs -> existing files, in order; a pattern that matches nothing is an error."""
  files = []
  for pattern in patterns:
    is_glob = any(c in pattern for c in '*?[')
    matches = sorted(glob.glob(pattern, recursive=True)) if is_glob else [pattern]
    matches = [Path(m) for m in matches if Path(m).is_file()]
    if not matches:
      raise UserError(f'input {pattern!r} matches no file')
    for path in matches:
      if path.suffix not in ('.txt', '.jsonl', '.parquet'):
        raise UserError(f'{path}: unsupported input type {path.suffix!r}; use .txt, .jsonl or .parquet')
    files += matches
  return files


class Skips:
  """Counts what was skipped and why, and keeps the first problems with file and line."""

  def __init__(self):
    self.counts, self.problems = collections.Counter(), []

  def add(self, reason: str, where: str) -> None:
    self.counts[reason] += 1
    if len(self.problems) < MAX_PROBLEMS:
      self.problems.append(f'{where}: {reason}')


def read_documents(path: Path, *, txt_split: str, text_field: str, text_column: str, skips: Skips) -> Iterator[str]:
  """The documents of one input file; what cannot be read is skipped and recorded."""
  if path.suffix == '.jsonl':
    with open(path, 'rb') as f:
      for line_no, raw in enumerate(f, 1):
        if not raw.strip():
          continue
        try:
          record = json.loads(raw.decode('utf-8'))
        except UnicodeDecodeError as e:
          skips.add('invalid UTF-8', f'{path}:{line_no}: byte {e.start}')
          continue
        except ValueError:
          skips.add('not JSON', f'{path}:{line_no}')
          continue
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
          skips.add(f'no text field {text_field!r}', f'{path}:{line_no}')
        elif not text.strip():
          skips.add('empty document', f'{path}:{line_no}')
        else:
          yield text
  elif path.suffix == '.parquet':
    yield from _read_parquet(path, text_column, skips)
  else:
    try:
      text = path.read_bytes().decode('utf-8')
    except UnicodeDecodeError as e:
      skips.add('invalid UTF-8', f'{path}: byte {e.start}')
      return
    blocks = [text] if txt_split == 'file' else text.split('\n\n')
    for block_no, block in enumerate(blocks, 1):
      if block.strip():
        yield block.strip('\n')
      else:
        skips.add('empty document', f'{path}' + (f': block {block_no}' if txt_split != 'file' else ''))


def _read_parquet(path: Path, column: str, skips: Skips) -> Iterator[str]:
  import pyarrow.parquet as pq

  try:
    table = pq.ParquetFile(path)
  except Exception as e:  # pyarrow raises several types for a file it cannot parse
    skips.add('unreadable parquet file', f'{path}: {e}')
    return
  if column not in table.schema_arrow.names:
    skips.add(f'no column {column!r}', f'{path}: columns are {table.schema_arrow.names}')
    return
  row = 0
  for batch in table.iter_batches(columns=[column]):
    for text in batch.column(0).to_pylist():
      row += 1
      if not isinstance(text, str) or not text.strip():
        skips.add('empty document', f'{path}: row {row}')
      else:
        yield text


def train_tokenizer(documents: Iterator[str], vocab_size: int, model_path: Path) -> None:
  """A BPE sentencepiece model that keeps newlines and indentation and falls back to bytes."""
  lines = (line for doc in documents for line in doc.split('\n') if line.strip())
  with tempfile.TemporaryDirectory() as tmp:
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=lines, model_prefix=f'{tmp}/sp', vocab_size=vocab_size, model_type='bpe',
          byte_fallback=True, split_digits=True, normalization_rule_name='identity',
          remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, user_defined_symbols=['\n'],
          input_sentence_size=2_000_000, shuffle_input_sentence=True, minloglevel=2)
    except RuntimeError as e:
      if 'sentences_.empty()' in str(e):
        raise UserError('the inputs hold no text to train a vocabulary on (every document is empty or blank)') from None
      raise UserError(f'sentencepiece could not train a {vocab_size}-token vocabulary: {e}') from None
    _atomic_copy(Path(f'{tmp}/sp.model'), model_path)


def file_sha256(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    while chunk := f.read(1 << 22):
      digest.update(chunk)
  return digest.hexdigest()


def _atomic_copy(source: Path, target: Path) -> None:
  partial = target.with_name(target.name + '.partial')
  shutil.copyfile(source, partial)
  os.replace(partial, target)


_worker_tokenizer: spm.SentencePieceProcessor | None = None


def _load_tokenizer(path: str) -> None:
  global _worker_tokenizer
  _worker_tokenizer = spm.SentencePieceProcessor(model_file=path)


def _tokenize_file(task: dict) -> dict:
  """Tokenizes one input file into one shard; returns (and writes) its summary."""
  sp, output, stem = _worker_tokenizer, Path(task['output']), task['stem']
  dtype, limit = np.dtype(task['dtype']), task['max_record_tokens']
  skips = Skips()
  documents, starts, lengths = [], [], []
  counts = np.zeros(sp.vocab_size(), np.int64)
  shard = output / f'{stem}.arrayrecord'
  writer = ArrayRecordWriter(str(shard) + '.partial', 'group_size:1')
  docs = read_documents(Path(task['source']), txt_split=task['txt_split'], text_field=task['text_field'],
                        text_column=task['text_column'], skips=skips)
  for doc_index, ids in enumerate(_encode_batches(sp, docs)):
    ids = np.asarray(ids + [sp.eos_id()], dtype=dtype)
    counts += np.bincount(ids, minlength=counts.size)
    for start in range(0, ids.size, limit):
      piece = ids[start:start + limit]
      writer.write(piece.tobytes())
      documents.append(doc_index)
      starts.append(start)
      lengths.append(piece.size)
  writer.close()
  os.replace(str(shard) + '.partial', shard)
  with open(output / f'{stem}.index.npz.partial', 'wb') as f:
    np.savez(f, document=np.asarray(documents, np.int64), start=np.asarray(starts, np.int64),
             length=np.asarray(lengths, np.int64), token_counts=counts)
  os.replace(output / f'{stem}.index.npz.partial', output / f'{stem}.index.npz')
  summary = {'file': shard.name, 'index': f'{stem}.index.npz', 'source': task['source'],
             'sha256': file_sha256(shard), 'bytes': shard.stat().st_size,
             'index_sha256': file_sha256(output / f'{stem}.index.npz'),
             'documents': documents[-1] + 1 if documents else 0, 'records': len(lengths), 'tokens': int(sum(lengths)),
             'skipped': dict(skips.counts), 'problems': skips.problems}
  partial = output / f'{stem}.json.partial'
  partial.write_text(json.dumps(summary))
  os.replace(partial, output / f'{stem}.json')
  return summary


def _encode_batches(sp: spm.SentencePieceProcessor, docs: Iterator[str], size: int = 256) -> Iterator[list[int]]:
  batch = []
  for doc in docs:
    batch.append(doc)
    if len(batch) == size:
      yield from sp.encode(batch)
      batch = []
  if batch:
    yield from sp.encode(batch)


def prepare(train: list[str], output: Path, *, validation: list[str] = (), vocab_size: int = 32000,
            tokenizer: Path | None = None, txt_split: str = 'file', text_field: str = 'text',
            text_column: str = 'text', max_record_tokens: int = 2048, workers: int | None = None,
            progress: bool = False, overwrite: bool = False) -> dict:
  """Tokenizes `train` (and `validation`) inputs into `output`; returns the manifest.

  Resumes a directory that an interrupted run with the same inputs and settings left:
  the tokenizer and every finished task are kept; a finished one is returned as it is.
  Raises UserError for missing inputs, an unsupported file type, a tokenizer that does
  not exist, or a directory made from other inputs or settings (`overwrite` prepares it
  again instead).
  """
  output = Path(output)
  splits = {'train': expand(train)}
  if validation:
    splits['validation'] = expand(validation)
  if tokenizer and not Path(tokenizer).is_file():
    raise UserError(f'tokenizer {str(tokenizer)!r} does not exist')
  settings = {
      'format': FORMAT,
      'inputs': {split: [{'path': str(f.resolve()), 'bytes': f.stat().st_size, 'mtime_ns': f.stat().st_mtime_ns}
                         for f in files] for split, files in splits.items()},
      'tokenizer': {'sha256': file_sha256(Path(tokenizer))} if tokenizer else {'trained': vocab_size},
      'txt_split': txt_split, 'text_field': text_field, 'text_column': text_column,
      'max_record_tokens': max_record_tokens,
  }
  _claim(output, settings, overwrite)
  if (output / MANIFEST).exists():
    return read_manifest(output)
  model_path = output / TOKENIZER
  if tokenizer:
    _atomic_copy(Path(tokenizer), model_path)
  elif not model_path.exists():
    docs = (d for f in splits['train']
            for d in read_documents(f, txt_split=txt_split, text_field=text_field, text_column=text_column,
                                    skips=Skips()))
    train_tokenizer(docs, vocab_size, model_path)

  sp = spm.SentencePieceProcessor(model_file=str(model_path))
  dtype = '<u2' if sp.vocab_size() <= 2**16 else '<u4'
  tasks = [dict(source=str(f), output=str(output), stem=f'{split}-{i:05d}', dtype=dtype,
                max_record_tokens=max_record_tokens, txt_split=txt_split, text_field=text_field,
                text_column=text_column)
           for split, files in splits.items() for i, f in enumerate(files)]
  summaries = {t['stem']: json.loads((output / f'{t["stem"]}.json').read_text())
               for t in tasks if (output / f'{t["stem"]}.json').exists()}
  todo = [t for t in tasks if t['stem'] not in summaries]
  workers = max(1, min(workers or os.cpu_count() or 1, len(todo)))
  bar = progress_bar(len(tasks), len(tasks) - len(todo), enabled=progress, unit='file')
  if todo:
    # spawn, not fork: the caller may have started JAX's threads.
    with multiprocessing.get_context('spawn').Pool(workers, _load_tokenizer, (str(model_path),)) as pool:
      for task, summary in zip(todo, pool.imap(_tokenize_file, todo)):
        summaries[task['stem']] = summary
        bar.update(1)
  bar.close()
  by_split = {split: [summaries[t['stem']] for t in tasks if t['stem'].startswith(split + '-')] for split in splits}
  manifest = _manifest(by_split, output, sp, model_path, dtype, max_record_tokens)
  if not manifest['splits']['train']['tokens']:
    raise UserError(f'no document of {train} could be read; see the problems: {manifest["problems"][:3]}')
  partial = output / (MANIFEST + '.partial')
  partial.write_text(json.dumps(manifest, indent=2))
  os.replace(partial, output / MANIFEST)
  return manifest


def _manifest(by_split: dict[str, list[dict]], output: Path, sp: spm.SentencePieceProcessor, model_path: Path,
              dtype: str, max_record_tokens: int) -> dict:
  """manifest.json's content, from the summaries of each split's shards."""
  skipped, problems, manifest_splits = collections.Counter(), [], {}
  counts = np.zeros(sp.vocab_size(), np.int64)
  for split, shards in by_split.items():
    for shard in shards:
      skipped.update(shard['skipped'])
      problems += shard['problems']
      if split == 'train':
        counts += np.load(output / shard['index'])['token_counts']
    manifest_splits[split] = {
        'shards': [{k: s[k] for k in ('file', 'index', 'source', 'sha256', 'bytes', 'index_sha256', 'documents',
                                      'records', 'tokens')} for s in shards],
        **{k: sum(s[k] for s in shards) for k in ('documents', 'records', 'tokens')}}
  p = counts[counts > 0] / max(counts.sum(), 1)
  return {
      'format': FORMAT,
      'tokenizer': TOKENIZER,
      'tokenizer_sha256': file_sha256(model_path),
      'vocab_size': sp.vocab_size(),
      'eos_id': sp.eos_id(),
      'dtype': np.dtype(dtype).name,
      'max_record_tokens': max_record_tokens,
      'splits': manifest_splits,
      'skipped': dict(skipped),
      'problems': problems[:MAX_PROBLEMS],
      # Entropy of the training unigram distribution, in nats/token: the loss of a model
      # that ignores context, a yardstick for what training has learned.
      'unigram_entropy': float(-(p * np.log(p)).sum()),
  }


def _claim(output: Path, settings: dict, overwrite: bool) -> None:
  """Makes `output` this preparation's: new, or made with the same settings, or (with
  `overwrite`) emptied of what an earlier one wrote. Raises UserError otherwise."""
  # A settings file that never got its name is no preparation's.
  ours = [p for pattern in (MANIFEST, SETTINGS, TOKENIZER, '*.partial', 'train-*', 'validation-*')
          for p in output.glob(pattern) if p.name != SETTINGS + '.partial'] if output.is_dir() else []
  path = output / SETTINGS
  if ours and not overwrite:
    before = json.loads(path.read_text()) if path.exists() else None
    if before == settings:
      return
    changed = ('it was made by an earlier salt, which did not record them' if before is None else
               ', '.join(k for k in settings if before.get(k) != settings[k]) + ' differ')
    raise UserError(f'{output} holds data prepared from other inputs or settings ({changed}); give another '
                    '--output, or --overwrite to prepare it again')
  for p in ours:
    if p.is_dir():
      shutil.rmtree(p)
    else:
      p.unlink()
  output.mkdir(parents=True, exist_ok=True)
  partial = output / (SETTINGS + '.partial')
  partial.write_text(json.dumps(settings, indent=2))
  os.replace(partial, path)


def read_manifest(directory: Path) -> dict:
  path = Path(directory) / MANIFEST
  if not path.is_file():
    raise UserError(f'{str(directory)!r} holds no {MANIFEST}; write one with `salt prepare INPUT... --output DIR`')
  manifest = json.loads(path.read_text())
  if manifest.get('format') != FORMAT:
    raise UserError(f'{directory} was prepared by another version of salt (format '
                    f'{manifest.get("format")}, this salt reads {FORMAT}); run `salt prepare` again')
  return manifest
