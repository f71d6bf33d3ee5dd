"""`salt prepare`: raw text -> a tokenizer (trained, or the one given) and tokenized ArrayRecord shards.

Each input file is one task, run in parallel over the cores; task i of a split writes

  {split}-{i:05d}.arrayrecord   records of at most `max_record_tokens` token ids (little-endian)
  {split}-{i:05d}.index.npz     per record: document (within the task), start, length;
                                and the task's token counts (for the unigram entropy)
  {split}-{i:05d}.json          the task's counts, skipped input and problems; written last

A document longer than `max_record_tokens` spans consecutive records, so a reader
fetches a few KB for a row of tokens, never a whole book. Every document ends with
the EOS token. The directory holds the tokenizer's own files (a trained one is a
sentencepiece model, tokenizer.model; a Hugging Face one is tokenizer.json and
tokenizer_config.json), and manifest.json names the one to load. A file is written
under a `.partial` name and renamed when complete, and a task's `.json` comes after
its data: re-running skips the tasks whose `.json` exists and redoes the rest, and
`manifest.json`, written last of all, marks the whole directory complete.
`settings.json`, written first, records the inputs (path, size, modification time),
the tokenizer and every setting: a run with others refuses the directory rather than
mix or return stale shards, unless told to prepare it again (`overwrite`).
"""

import collections
import glob
import hashlib
import io
import itertools
import json
import logging
import multiprocessing
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import sentencepiece as spm
from array_record.python.array_record_module import ArrayRecordWriter

from trainer import tokenizer as tokenizer_lib
from trainer.errors import UserError
from trainer.lock import RunLock
from trainer.processes import die_with_parent
from trainer.progress import bar as progress_bar

log = logging.getLogger('salt')

MANIFEST = 'manifest.json'
SETTINGS = 'settings.json'
MAX_PROBLEMS = 1000
# Bumped whenever the layout of a prepared directory changes.
FORMAT = 1
# Sentencepiece's limit on a training sentence (it drops longer ones) and its sample.
MAX_SENTENCE_BYTES = 1 << 14
SAMPLED_LINES = 2_000_000
# A document longer than this many characters is encoded in parts (see _encode).
PART_CHARS = 1 << 20
PARTS_AT_ONCE = 8


def expand(patterns: list[str]) -> list[Path]:
  """Paths and globs -> existing files, in order, each once however many patterns match
  it; a pattern that matches nothing is an error."""
  files, seen = [], set()
  for pattern in patterns:
    is_glob = any(c in pattern for c in '*?[')
    matches = sorted(glob.glob(pattern, recursive=True)) if is_glob else [pattern]
    matches = [Path(m) for m in matches if Path(m).is_file()]
    if not matches:
      raise UserError(f'input {pattern!r} matches no file')
    for path in matches:
      if path.suffix not in ('.txt', '.jsonl', '.parquet'):
        raise UserError(f'{path}: unsupported input type {path.suffix!r}; use .txt, .jsonl or .parquet')
      if path.resolve() not in seen:
        seen.add(path.resolve())
        files.append(path)
  return files


def _check_inputs(splits: dict[str, list[Path]], output: Path) -> None:
  """A file in both splits would be trained and validated on, and an output directory
  that holds an input would be written over it: both are refused."""
  if 'validation' in splits:
    both = {f.resolve() for f in splits['train']} & {f.resolve() for f in splits['validation']}
    if both:
      raise UserError(f'{sorted(both)[0]} is both a training and a validation input; a file belongs to one split')
  out = output.resolve()
  for f in (f for files in splits.values() for f in files):
    if f.resolve() == out or out in f.resolve().parents:
      raise UserError(f'--output {output} holds the input {f}; give an --output outside the inputs')


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
  """A BPE sentencepiece model that keeps newlines and indentation and falls back to bytes.

  The model is a pure function of the documents and the settings: the same bytes on
  every run and machine. Sentencepiece drops every sentence longer than its limit
  without a word, so a longer line is cut into pieces within it; sentencepiece learns
  from a sample of SAMPLED_LINES lines at most. Both are counted and logged.
  """
  counts = collections.Counter()
  writer = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_sentences(documents, counts), model_writer=writer, vocab_size=vocab_size,
        model_type='bpe', byte_fallback=True, split_digits=True, normalization_rule_name='identity',
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, user_defined_symbols=['\n'],
        max_sentence_length=MAX_SENTENCE_BYTES, input_sentence_size=SAMPLED_LINES, shuffle_input_sentence=True,
        minloglevel=2)
  except RuntimeError as e:
    if 'sentences_.empty()' in str(e):
      raise UserError('the inputs hold no text to train a vocabulary on (every document is empty or blank)') from None
    raise UserError(f'sentencepiece could not train a {vocab_size}-token vocabulary: {e}') from None
  log.info('tokenizer: %d-token vocabulary learned from %s of %d lines%s', vocab_size,
           f'a sample of {SAMPLED_LINES}' if counts['lines'] > SAMPLED_LINES else 'all',
           counts['lines'], f' ({counts["cut"]} lines over {MAX_SENTENCE_BYTES} bytes cut into pieces)'
           if counts['cut'] else '')
  partial = model_path.with_name(model_path.name + '.partial')
  partial.write_bytes(writer.getvalue())
  os.replace(partial, model_path)


def _sentences(documents: Iterator[str], counts: collections.Counter) -> Iterator[str]:
  """The non-blank lines of the documents, each within MAX_SENTENCE_BYTES."""
  for doc in documents:
    for line in doc.split('\n'):
      if not line.strip():
        continue
      if len(line.encode('utf-8')) <= MAX_SENTENCE_BYTES:
        counts['lines'] += 1
        yield line
        continue
      counts['cut'] += 1
      # A character is at most 4 bytes: pieces of MAX_SENTENCE_BYTES // 4 characters fit,
      # cut after the last space of a piece's second half where there is one.
      width = MAX_SENTENCE_BYTES // 4
      while line:
        cut = len(line) if len(line) <= width else (line.rfind(' ', width // 2, width) + 1 or width)
        counts['lines'] += 1
        yield line[:cut]
        line = line[cut:]


def file_sha256(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    while chunk := f.read(1 << 22):
      digest.update(chunk)
  return digest.hexdigest()


_worker_tokenizer: tokenizer_lib.Tokenizer | None = None


def _start_worker(path: str, parent_pid: int) -> None:
  """A worker's set-up: it ends with `salt prepare` rather than write on for a killed run."""
  die_with_parent(parent_pid)
  global _worker_tokenizer
  _worker_tokenizer = tokenizer_lib.load(path)


def _tokenize_file(task: dict) -> dict:
  """Tokenizes one input file into one shard; returns (and writes) its summary."""
  tok, output, stem = _worker_tokenizer, Path(task['output']), task['stem']
  dtype, limit = np.dtype(task['dtype']), task['max_record_tokens']
  skips = Skips()
  documents, starts, lengths = [], [], []
  counts = np.zeros(tok.vocab_size, np.int64)
  shard = output / f'{stem}.arrayrecord'
  writer = ArrayRecordWriter(str(shard) + '.partial', 'group_size:1')
  docs = read_documents(Path(task['source']), txt_split=task['txt_split'], text_field=task['text_field'],
                        text_column=task['text_column'], skips=skips)

  def write(record: np.ndarray, doc_index: int, start: int) -> None:
    nonlocal counts
    writer.write(record.tobytes())
    counts += np.bincount(record, minlength=counts.size)
    documents.append(doc_index)
    starts.append(start)
    lengths.append(record.size)

  end = np.array([tok.eos_id], dtype)
  for doc_index, pieces in enumerate(_encode(tok, docs)):
    # Records are cut as the document's ids arrive, so a long one is never held whole.
    held, start = np.zeros(0, dtype), 0
    for ids in itertools.chain(pieces, [end]):
      held = np.concatenate([held, ids.astype(dtype)])
      whole = held.size - held.size % limit
      for at in range(0, whole, limit):
        write(held[at:at + limit], doc_index, start + at)
      held, start = held[whole:], start + whole
    if held.size:
      write(held, doc_index, start)
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


def _encode(tok: tokenizer_lib.Tokenizer, docs: Iterator[str], size: int = 256) -> Iterator[Iterator[np.ndarray]]:
  """Each document's token ids, in pieces. Documents are encoded `size` at a time (the
  tokenizer spreads a batch over threads); one longer than PART_CHARS is encoded in
  parts, each cut after a newline, where the tokenizer's `newline_ids` says that gives
  the ids of the whole: a 1 GB .txt file is then never encoded whole."""
  def encoded(batch: list[str]) -> Iterator[list[np.ndarray]]:
    return ([ids] for ids in tok.encode(batch))

  newline = tok.newline_ids()
  batch = []
  for doc in docs:
    if newline is None or len(doc) <= PART_CHARS:
      batch.append(doc)
      if len(batch) == size:
        yield from encoded(batch)
        batch = []
      continue
    yield from encoded(batch)
    batch = []
    yield _encode_parts(tok, doc, newline)
  yield from encoded(batch)


def _encode_parts(tok: tokenizer_lib.Tokenizer, doc: str, newline: list[int]) -> Iterator[np.ndarray]:
  parts = _parts(doc)
  yield from tok.encode([next(parts)])
  # Encoded behind a newline, a part is tokenized as it is inside the document.
  while group := ['\n' + part for part in itertools.islice(parts, PARTS_AT_ONCE)]:
    for ids in tok.encode(group):
      yield ids[len(newline):]


def _parts(text: str) -> Iterator[str]:
  """`text` in parts of at least PART_CHARS characters, each cut after a newline."""
  start = 0
  while start < len(text):
    cut = text.find('\n', start + PART_CHARS)
    end = len(text) if cut < 0 else cut + 1
    yield text[start:end]
    start = end


def prepare(train: list[str], output: Path, *, validation: list[str] = (), vocab_size: int = 32000,
            tokenizer: str | Path | None = None, txt_split: str = 'file', text_field: str = 'text',
            text_column: str = 'text', max_record_tokens: int = 2048, workers: int | None = None,
            progress: bool = False, overwrite: bool = False) -> dict:
  """Tokenizes `train` (and `validation`) inputs into `output`; returns the manifest.

  Resumes a directory that an interrupted run with the same inputs and settings left:
  the tokenizer and every finished task are kept; a finished one is returned as it is.
  `tokenizer`: a sentencepiece model, a Hugging Face tokenizer.json, or a model
  directory holding one (see trainer.tokenizer.load); None trains a sentencepiece model
  of `vocab_size` tokens. Raises UserError for missing inputs, an unsupported file type,
  a tokenizer that cannot be loaded, or a directory made from other inputs or settings
  (`overwrite` prepares it again instead).
  """
  output = Path(output)
  if max_record_tokens < 1:
    raise UserError(f'--max-record-tokens {max_record_tokens} must be positive')
  splits = {'train': expand(train)}
  if validation:
    splits['validation'] = expand(validation)
  _check_inputs(splits, output)
  given = tokenizer_lib.load(tokenizer) if tokenizer else None
  settings = {
      'format': FORMAT,
      'inputs': {split: [{'path': str(f.resolve()), 'bytes': f.stat().st_size, 'mtime_ns': f.stat().st_mtime_ns}
                         for f in files] for split, files in splits.items()},
      # An equal tokenizer, however its files are written, resumes the directory.
      'tokenizer': {'sha256': given.sha256, 'files': list(given.files)} if given else {'trained': vocab_size},
      'txt_split': txt_split, 'text_field': text_field, 'text_column': text_column,
      'max_record_tokens': max_record_tokens,
  }
  with RunLock.beside(output / SETTINGS):
    _claim(output, settings, overwrite)
    if (output / MANIFEST).exists():
      return read_manifest(output)
    return _fill(output, splits, settings, given, vocab_size, workers, progress)


def _fill(output: Path, splits: dict[str, list[Path]], settings: dict, given: tokenizer_lib.Tokenizer | None,
          vocab_size: int, workers: int | None, progress: bool) -> dict:
  """Writes the tokenizer, the shards the directory lacks and the manifest; returns it."""
  reading = {k: settings[k] for k in ('txt_split', 'text_field', 'text_column')}
  if given:
    given.copy_to(output)
    model_path = output / given.files[0]
  else:
    model_path = output / tokenizer_lib.SENTENCEPIECE
    if not model_path.exists():
      train_tokenizer((d for f in splits['train'] for d in read_documents(f, **reading, skips=Skips())), vocab_size,
                      model_path)

  tok = tokenizer_lib.load(model_path)
  dtype = '<u2' if tok.vocab_size <= 2**16 else '<u4'
  tasks = [dict(source=str(f), output=str(output), stem=stem, dtype=dtype,
                max_record_tokens=settings['max_record_tokens'], **reading)
           for stem, f in zip(_stems(splits), (f for files in splits.values() for f in files))]
  summaries = {t['stem']: json.loads((output / f'{t["stem"]}.json').read_text())
               for t in tasks if (output / f'{t["stem"]}.json').exists()}
  todo = [t for t in tasks if t['stem'] not in summaries]
  workers = max(1, min(workers or os.cpu_count() or 1, len(todo)))
  bar = progress_bar(len(tasks), len(tasks) - len(todo), enabled=progress, unit='file')
  if todo:
    # spawn, not fork: the caller may have started JAX's threads.
    with multiprocessing.get_context('spawn').Pool(workers, _start_worker, (str(model_path), os.getpid())) as pool:
      for task, summary in zip(todo, pool.imap(_tokenize_file, todo)):
        summaries[task['stem']] = summary
        bar.update(1)
  bar.close()
  by_split = {split: [summaries[t['stem']] for t in tasks if t['stem'].startswith(split + '-')] for split in splits}
  manifest = _manifest(by_split, output, tok, model_path.name, dtype, settings['max_record_tokens'])
  if not manifest['splits']['train']['tokens']:
    sources = [str(f) for f in splits['train']]
    raise UserError(f'no document of {sources} could be read; see the problems: {manifest["problems"][:3]}')
  partial = output / (MANIFEST + '.partial')
  partial.write_text(json.dumps(manifest, indent=2))
  os.replace(partial, output / MANIFEST)
  return manifest


def _manifest(by_split: dict[str, list[dict]], output: Path, tok: tokenizer_lib.Tokenizer, tokenizer_file: str,
              dtype: str, max_record_tokens: int) -> dict:
  """manifest.json's content, from the summaries of each split's shards."""
  skipped, problems, manifest_splits = collections.Counter(), [], {}
  counts = np.zeros(tok.vocab_size, np.int64)
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
      'tokenizer': tokenizer_file,
      'tokenizer_sha256': tok.sha256,
      'vocab_size': tok.vocab_size,
      'eos_id': tok.eos_id,
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
  `overwrite`) emptied of the files an earlier preparation's settings.json lists. Never
  deletes or overwrites a file salt did not write: raises UserError instead."""
  recorded = _recorded_settings(output)
  if recorded == settings:
    return
  if recorded is not None and not overwrite:
    changed = ', '.join(k for k in settings if recorded.get(k) != settings[k])
    raise UserError(f'{output} holds data prepared from other inputs or settings ({changed} differ); give another '
                    '--output, or --overwrite to prepare it again')
  ours = set(_written_names(recorded)) if recorded is not None else {SETTINGS + '.partial'}
  clashes = [n for n in _written_names(settings) if n not in ours and os.path.lexists(output / n)]
  if clashes:
    earlier = ' (an earlier salt, which did not record them, or another program)' if recorded is None else ''
    raise UserError(f'{output} holds {", ".join(clashes[:3])}{" ..." if len(clashes) > 3 else ""}, which salt '
                    f'would write but did not write here{earlier}; give another --output, or move them')
  for name in ours:
    path = output / name
    if path.is_file() or path.is_symlink():
      path.unlink()
  output.mkdir(parents=True, exist_ok=True)
  partial = output / (SETTINGS + '.partial')
  partial.write_text(json.dumps(settings, indent=2))
  os.replace(partial, output / SETTINGS)


def _recorded_settings(output: Path) -> dict | None:
  """The settings.json of a preparation of `output`; None where there is none."""
  path = output / SETTINGS
  if not path.is_file():
    return None
  try:
    recorded = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise UserError(f'{path} cannot be read ({e}); give another --output') from None
  if not isinstance(recorded, dict) or not isinstance(recorded.get('inputs'), dict):
    raise UserError(f'{path} is not the settings of a salt preparation; give another --output')
  return recorded


def _written_names(settings: dict) -> list[str]:
  """The names a preparation with `settings` writes in its directory."""
  # A trained tokenizer, and one given to a salt that did not record its files, is a sentencepiece model.
  names = [SETTINGS, MANIFEST, *settings['tokenizer'].get('files', [tokenizer_lib.SENTENCEPIECE])]
  for stem in _stems(settings['inputs']):
    names += [f'{stem}.arrayrecord', f'{stem}.index.npz', f'{stem}.json']
  return names + [name + '.partial' for name in names]


def _stems(inputs: dict[str, list]) -> list[str]:
  """The names of the shards of each split's inputs, in order: task i of a split writes {split}-{i:05d}.*"""
  return [f'{split}-{i:05d}' for split, files in inputs.items() for i in range(len(files))]


def read_manifest(directory: Path) -> dict:
  path = Path(directory) / MANIFEST
  if not path.is_file():
    raise UserError(f'{str(directory)!r} holds no {MANIFEST}; write one with `salt prepare INPUT... --output DIR`')
  manifest = json.loads(path.read_text())
  if manifest.get('format') != FORMAT:
    raise UserError(f'{directory} was prepared by another version of salt (format '
                    f'{manifest.get("format")}, this salt reads {FORMAT}); run `salt prepare` again')
  return manifest
