"""`salt prepare`: raw text -> a sentencepiece model and tokenized ArrayRecord shards.

Output directory:
  tokenizer.model                 the sentencepiece model (trained here or copied)
  {split}-{i:05d}.arrayrecord     one record per document: its token ids, little-endian
  manifest.json                   splits, shards, counts, tokenizer hash, sources, skips

Every document ends with the EOS token, so a model learns where documents stop. Files
are written under a temporary name and renamed when complete, and the manifest comes
last: a directory with a manifest is a complete one.
"""

import collections
import glob
import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import sentencepiece as spm
from array_record.python.array_record_module import ArrayRecordWriter

from trainer.errors import UserError

MANIFEST = 'manifest.json'
TOKENIZER = 'tokenizer.model'


def expand(patterns: list[str]) -> list[Path]:
  """Paths and globs -> sorted existing files; a pattern that matches nothing is an error."""
  files = []
  for pattern in patterns:
    matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
    matches = [Path(m) for m in matches if Path(m).is_file()]
    if not matches:
      raise UserError(f'input {pattern!r} matches no file')
    files += matches
  return files


def read_documents(files: list[Path], *, txt_split: str, text_field: str,
                   skipped: collections.Counter, problems: list[str]) -> Iterator[str]:
  """Yields the documents of each file; skips and records what cannot be read."""
  for path in files:
    if path.suffix == '.jsonl':
      with open(path, 'rb') as f:
        for line_no, raw in enumerate(f, 1):
          if not raw.strip():
            continue
          try:
            text = json.loads(raw.decode('utf-8'))[text_field]
          except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            skipped[type(e).__name__] += 1
            problems.append(f'{path}:{line_no}: {type(e).__name__}: {e}')
            continue
          if isinstance(text, str) and text.strip():
            yield text
          else:
            skipped['empty'] += 1
    elif path.suffix == '.txt':
      try:
        text = path.read_bytes().decode('utf-8')
      except UnicodeDecodeError as e:
        skipped['UnicodeDecodeError'] += 1
        problems.append(f'{path}: invalid UTF-8 at byte {e.start}')
        continue
      docs = [text] if txt_split == 'file' else text.split('\n\n')
      for doc in docs:
        if doc.strip():
          yield doc.strip('\n')
        else:
          skipped['empty'] += 1
    else:
      raise UserError(f'{path}: unsupported input type {path.suffix!r}; use .txt or .jsonl')


def train_tokenizer(documents: Iterator[str], vocab_size: int, model_path: Path) -> None:
  """A BPE sentencepiece model that keeps newlines and indentation and falls back to bytes."""
  lines = (line for doc in documents for line in doc.split('\n') if line.strip())
  with tempfile.TemporaryDirectory() as tmp:
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines,
        model_prefix=f'{tmp}/sp',
        vocab_size=vocab_size,
        model_type='bpe',
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name='identity',
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=['\n'],
        input_sentence_size=2_000_000,
        shuffle_input_sentence=True,
        minloglevel=2,
    )
    shutil.copy(f'{tmp}/sp.model', model_path)


def file_sha256(path: Path) -> str:
  return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _write_split(name: str, documents: Iterator[str], sp: spm.SentencePieceProcessor, output: Path,
                 dtype: np.dtype, docs_per_shard: int, counts: np.ndarray | None) -> dict:
  shards, batch = [], []

  def flush():
    path = output / f'{name}-{len(shards):05d}.arrayrecord'
    partial = path.with_suffix('.partial')
    writer = ArrayRecordWriter(str(partial), 'group_size:1')
    tokens = 0
    for ids in sp.encode(batch):
      ids = np.asarray(ids + [sp.eos_id()], dtype=dtype)
      writer.write(ids.tobytes())
      tokens += ids.size
      if counts is not None:
        counts[:] += np.bincount(ids, minlength=counts.size)
    writer.close()
    partial.rename(path)
    shards.append({'file': path.name, 'records': len(batch), 'tokens': tokens})
    batch.clear()

  for doc in documents:
    batch.append(doc)
    if len(batch) == docs_per_shard:
      flush()
  if batch:
    flush()
  return {'shards': shards, 'documents': sum(s['records'] for s in shards),
          'tokens': sum(s['tokens'] for s in shards)}


def prepare(train: list[str], output: Path, *, validation: list[str] = (), vocab_size: int = 32000,
            tokenizer: Path | None = None, txt_split: str = 'file', text_field: str = 'text',
            docs_per_shard: int = 4096) -> dict:
  """Tokenizes `train` (and `validation`) inputs into `output`; returns the manifest."""
  output = Path(output)
  if (output / MANIFEST).exists():
    return read_manifest(output)
  train_files, validation_files = expand(train), expand(validation) if validation else []
  output.mkdir(parents=True, exist_ok=True)
  skipped, problems = collections.Counter(), []

  def docs(files):
    return read_documents(files, txt_split=txt_split, text_field=text_field,
                          skipped=skipped, problems=problems)

  model_path = output / TOKENIZER
  if tokenizer:
    if not Path(tokenizer).is_file():
      raise UserError(f'tokenizer {str(tokenizer)!r} does not exist')
    shutil.copy(tokenizer, model_path)
  else:
    train_tokenizer(docs(train_files), vocab_size, model_path)
    skipped.clear()
    problems.clear()
  sp = spm.SentencePieceProcessor(model_file=str(model_path))
  dtype = np.dtype('<u2') if sp.vocab_size() <= 2**16 else np.dtype('<u4')
  counts = np.zeros(sp.vocab_size(), np.int64)
  splits = {'train': _write_split('train', docs(train_files), sp, output, dtype, docs_per_shard, counts)}
  if validation_files:
    splits['validation'] = _write_split('validation', docs(validation_files), sp, output, dtype,
                                        docs_per_shard, None)
  p = counts[counts > 0] / counts.sum()
  manifest = {
      'tokenizer': TOKENIZER,
      'tokenizer_sha256': file_sha256(model_path),
      'vocab_size': sp.vocab_size(),
      'dtype': dtype.name,
      'splits': splits,
      'sources': {'train': [str(f) for f in train_files], 'validation': [str(f) for f in validation_files]},
      'skipped': dict(skipped),
      'problems': problems[:1000],
      # Entropy of the training unigram distribution, in nats/token: the loss of a model
      # that ignores context, a yardstick for what training has learned.
      'unigram_entropy': float(-(p * np.log(p)).sum()),
  }
  partial = output / (MANIFEST + '.partial')
  partial.write_text(json.dumps(manifest, indent=2))
  partial.rename(output / MANIFEST)
  return manifest


def read_manifest(directory: Path) -> dict:
  path = Path(directory) / MANIFEST
  if not path.is_file():
    raise UserError(f'{str(directory)!r} holds no {MANIFEST}; write one with `salt prepare INPUT... --output DIR`')
  return json.loads(path.read_text())
