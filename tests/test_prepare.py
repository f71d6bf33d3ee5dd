"""`salt prepare` never deletes or overwrites what it did not write, reads each input once,
trains the same tokenizer from the same text, and leaves no worker behind."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from tests.helpers import WORDS, lock_held_elsewhere, write_corpus
from trainer import prepare as prepare_module
from trainer import tokenizer
from trainer.errors import UserError
from trainer.prepare import prepare
from trainer.tokenizer import sentencepiece_sha256 as tokenizer_sha256


def corpus(directory: Path, n_docs: int, seed: int) -> list[str]:
  directory.mkdir(parents=True, exist_ok=True)
  return write_corpus(directory, n_docs, seed=seed)


def snapshot(directory: Path) -> dict[str, bytes | None]:
  return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None
          for p in sorted(directory.rglob('*'))}


def test_an_output_that_holds_an_input_is_refused_and_nothing_is_deleted(tmp_path):
  """Issue 23, 1: --overwrite deleted the input, an unrelated folder and a README, then
  failed on the deleted input."""
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'train-00000.txt').write_text('the king speaks.\nthe fool runs.\n')
  (out / 'train-extra').mkdir()
  (out / 'train-extra' / 'notes.txt').write_text('mine')
  (out / 'validation-README.txt').write_text('mine too')
  before = snapshot(out)
  for overwrite in (False, True):
    with pytest.raises(UserError, match=rf'--output {out} holds the input {out}/train-00000.txt'):
      prepare([str(out / 'train-00000.txt')], out, vocab_size=300, workers=1, overwrite=overwrite)
  assert snapshot(out) == before


def test_overwrite_deletes_only_what_the_earlier_preparation_wrote(tmp_path, sp_model):
  first, second = corpus(tmp_path / 'a', 3, seed=1), corpus(tmp_path / 'b', 2, seed=2)
  out = tmp_path / 'out'
  prepare(first, out, tokenizer=str(sp_model), workers=1)
  (out / 'train-extra').mkdir()
  (out / 'train-extra' / 'keep.txt').write_text('mine')
  (out / 'validation-README.txt').write_text('mine too')
  (out / 'train-00009.arrayrecord.bak').write_text('a backup of mine')
  mine = {k: v for k, v in snapshot(out).items() if 'extra' in k or 'README' in k or '.bak' in k}
  manifest = prepare(second, out, tokenizer=str(sp_model), workers=1, overwrite=True)
  assert [s['source'] for s in manifest['splits']['train']['shards']] == second
  assert {k: v for k, v in snapshot(out).items() if k in mine} == mine
  assert not (out / 'train-00002.arrayrecord').exists()  # the earlier run's third shard is gone


def test_a_directory_salt_never_prepared_is_not_offered_overwrite(tmp_path, sp_model):
  inputs = corpus(tmp_path / 'in', 2, seed=3)
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'tokenizer.model').write_bytes(b'somebody else\'s model')
  (out / 'notes.md').write_text('mine')
  before = snapshot(out)
  for overwrite in (False, True):
    with pytest.raises(UserError) as error:
      prepare(inputs, out, tokenizer=str(sp_model), workers=1, overwrite=overwrite)
    assert 'tokenizer.model, which salt would write but did not write here' in str(error.value)
    assert '--overwrite' not in str(error.value)
  assert snapshot(out) == before
  # Files that salt would not write are no obstacle.
  (out / 'tokenizer.model').unlink()
  prepare(inputs, out, tokenizer=str(sp_model), workers=1)
  assert (out / 'notes.md').read_text() == 'mine'


def test_overlapping_globs_read_each_file_once_and_a_file_in_both_splits_is_refused(tmp_path, sp_model):
  """Issue 23, 6: 60 files became 120 training documents, validation a subset of training."""
  inputs = corpus(tmp_path / 'in', 4, seed=4)
  manifest = prepare([str(tmp_path / 'in' / '*.txt'), str(tmp_path / 'in' / 'doc00*.txt'), inputs[0]],
                     tmp_path / 'out', tokenizer=str(sp_model), workers=1)
  assert manifest['splits']['train']['documents'] == 4
  with pytest.raises(UserError, match=r'doc000.txt is both a training and a validation input'):
    prepare([str(tmp_path / 'in' / '*.txt')], tmp_path / 'out2', validation=[inputs[0]], tokenizer=str(sp_model))


@pytest.mark.parametrize('limit', [0, -5])
def test_a_record_limit_below_one_is_one_line(tmp_path, limit):
  inputs = corpus(tmp_path / 'in', 1, seed=5)
  with pytest.raises(UserError, match=rf'^--max-record-tokens {limit} must be positive$'):
    prepare(inputs, tmp_path / 'out', max_record_tokens=limit)


def long_lines(directory: Path, n: int, word: str, repeats: int = 300) -> list[str]:
  """n one-line documents of repeats x about 17 bytes (300: 5 KB, past sentencepiece's default limit)."""
  directory.mkdir(parents=True, exist_ok=True)
  paths = []
  for i in range(n):
    path = directory / f'long{i:03d}.txt'
    path.write_text(' '.join(f'{word} castle{i % 7}' for _ in range(repeats)))
    paths.append(str(path))
  return paths


def test_the_tokenizer_learns_from_lines_longer_than_sentencepiece_takes(tmp_path, caplog):
  """Issue 23, 2: 300 one-line 5 KB documents gave "no text to train a vocabulary on"; with
  short lines added, the vocabulary was learned from those alone."""
  only_long = long_lines(tmp_path / 'long', 300, 'zebraquux')
  short = corpus(tmp_path / 'short', 50, seed=6)
  for name, inputs, vocab in (('a', only_long, 300), ('b', only_long + short, 400)):
    prepare(inputs, tmp_path / name, vocab_size=vocab, workers=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / name / 'tokenizer.model'))
    assert sp.encode('zebraquux', out_type=str) == ['▁zebraquux']
  # Lines past even salt's limit are cut into pieces, counted and said.
  with caplog.at_level('INFO', logger='salt'):
    prepare(long_lines(tmp_path / 'longer', 20, 'yakwombat', repeats=2000), tmp_path / 'c', vocab_size=300,
            workers=1)
  assert '(20 lines over 16384 bytes cut into pieces)' in caplog.text
  sp = spm.SentencePieceProcessor(model_file=str(tmp_path / 'c' / 'tokenizer.model'))
  assert sp.encode('yakwombat', out_type=str) == ['▁yakwombat']


def test_the_same_text_gives_the_same_tokenizer_bytes(tmp_path):
  """Issue 23, 3: the temporary model_prefix made every trained tokenizer differ, so the
  same data prepared twice was refused as "trained with another tokenizer"."""
  inputs = corpus(tmp_path / 'in', 10, seed=8)
  one = prepare(inputs, tmp_path / 'one', vocab_size=300, workers=1)
  two = prepare(inputs, tmp_path / 'two', vocab_size=300, workers=1)
  assert (tmp_path / 'one' / 'tokenizer.model').read_bytes() == (tmp_path / 'two' / 'tokenizer.model').read_bytes()
  assert one['tokenizer_sha256'] == two['tokenizer_sha256']


def test_the_tokenizer_identity_is_what_decides_tokenization(tmp_path, sp_model):
  model = sp_pb2.ModelProto()
  model.ParseFromString(sp_model.read_bytes())
  model.trainer_spec.model_prefix = '/tmp/tmpab12cd/sp'  # what an earlier salt recorded
  model.trainer_spec.num_threads = 3
  (tmp_path / 'incidental.model').write_bytes(model.SerializeToString())
  assert tokenizer_sha256(tmp_path / 'incidental.model') == tokenizer_sha256(sp_model)
  model.pieces[300].score += 1.0
  (tmp_path / 'other.model').write_bytes(model.SerializeToString())
  assert tokenizer_sha256(tmp_path / 'other.model') != tokenizer_sha256(sp_model)


def children(pid: int) -> list[int]:
  found = []
  for stat in Path('/proc').glob('[0-9]*/stat'):
    try:
      fields = stat.read_text().rsplit(')', 1)[1].split()
    except OSError:
      continue
    if int(fields[1]) == pid:
      found.append(int(stat.parent.name))
  return found


def alive(pid: int) -> bool:
  try:
    state = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0]
  except OSError:
    return False
  return state != 'Z'


@pytest.mark.skipif(not Path('/proc').is_dir(), reason='reads /proc')
def test_tokenizing_workers_end_with_a_killed_prepare_and_a_rerun_finishes(tmp_path, sp_model):
  """Issue 23, 7: the spawn pool wrote on into OUT after its parent was SIGKILLed."""
  rng = random.Random(0)
  big = tmp_path / 'big.jsonl'  # seconds of tokenizing: the worker is in it when its parent dies
  big.write_text(''.join(json.dumps({'text': ' '.join(rng.choices(WORDS, k=50))}) + '\n' for _ in range(40_000)))
  inputs = [str(big), *corpus(tmp_path / 'in', 3, seed=9)]
  out = tmp_path / 'out'
  code = ('import sys; from trainer.prepare import prepare; '
          f'prepare(sys.argv[1:], {str(out)!r}, tokenizer={str(sp_model)!r}, workers=2)')
  process = subprocess.Popen([sys.executable, '-c', code, *inputs])
  deadline = time.time() + 60
  while not (out / 'train-00000.arrayrecord.partial').exists() and time.time() < deadline:
    time.sleep(0.01)
  workers = children(process.pid)
  os.kill(process.pid, signal.SIGKILL)
  process.wait()
  assert workers and not (out / 'train-00000.json').exists()
  deadline = time.time() + 1
  while any(alive(w) for w in workers) and time.time() < deadline:
    time.sleep(0.02)
  assert not any(alive(w) for w in workers)
  manifest = prepare(inputs, out, tokenizer=str(sp_model), workers=2)
  assert manifest['splits']['train']['documents'] == 40_003
  assert not list(out.glob('*.partial'))


def test_a_second_prepare_of_one_output_is_refused(tmp_path, sp_model):
  """Issue 23, 9: two prepares on one output were not refused."""
  inputs = corpus(tmp_path / 'in', 2, seed=10)
  out = tmp_path / 'out'
  with lock_held_elsewhere(out / 'settings.json') as pid:
    with pytest.raises(UserError, match=rf'settings.json is in use by process {pid} on .*; stop that job first, '
                                        'or give this one another --output'):
      prepare(inputs, out, tokenizer=str(sp_model), workers=1)
  assert prepare(inputs, out, tokenizer=str(sp_model), workers=1)['splits']['train']['documents'] == 2


def test_a_long_document_encoded_in_parts_gives_the_ids_of_the_whole(sp_model, monkeypatch):
  """Issue 23: a .txt file was encoded whole, at ~48 bytes of memory per byte of text."""
  sp = spm.SentencePieceProcessor(model_file=str(sp_model))
  rng = random.Random(11)
  lines = [' '.join(rng.choices(WORDS, k=rng.randint(0, 9))) + rng.choice(['.', '', '  ', '\t']) for _ in range(400)]
  document = '\n'.join(lines) + '\n\n  the end'
  tok = tokenizer.load(sp_model)
  assert tok.newline_ids() is not None
  monkeypatch.setattr(prepare_module, 'PART_CHARS', 50)
  assert len(list(prepare_module._parts(document))) > 100
  [pieces] = prepare_module._encode(tok, iter([document]), size=7)
  assert np.concatenate(list(pieces)).tolist() == sp.encode(document)


def test_a_tokenizer_whose_pieces_span_a_newline_encodes_documents_whole(sp_model, tmp_path):
  model = sp_pb2.ModelProto()
  model.ParseFromString(sp_model.read_bytes())
  model.pieces[300].piece = 'king\n'
  (tmp_path / 'tokenizer.model').write_bytes(model.SerializeToString())
  assert tokenizer.load(tmp_path / 'tokenizer.model').newline_ids() is None
