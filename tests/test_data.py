"""`salt prepare` and the loader: counts, bad input, resumable prepare, exact epochs,
disjoint hosts, a state that is just the step, packing that respects documents."""

import gc
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm

from tests.helpers import write_corpus
from trainer import data
from trainer.errors import UserError
from trainer.prepare import prepare, read_manifest


def stream_tokens(stream):
  """(document, position) of every token in the stream, read record by record."""
  pairs = []
  for record, length in zip(stream.records, np.diff(stream.offsets)):
    pairs += [(stream.document[record], stream.start[record] + i) for i in range(length)]
  return pairs


def read_rows(stream, rows):
  """(document, position) of every real token in the given rows."""
  pairs = []
  for r in rows:
    row = stream.row(r)
    lo = r * stream.row_len
    for i in np.flatnonzero(row['segment_ids']):
      k = np.searchsorted(stream.offsets, lo + i, side='right') - 1
      pairs.append((stream.document[stream.records[k]], row['positions'][i]))
  return pairs


# --- prepare ---------------------------------------------------------------------------


def test_manifest_counts_documents_records_and_tokens(tiny_data):
  manifest = read_manifest(tiny_data)
  train = manifest['splits']['train']
  assert train['documents'] == 60 and len(train['shards']) == 60  # one shard per input file
  assert sum(s['tokens'] for s in train['shards']) == train['tokens']
  assert train['records'] > train['documents']  # some documents exceed 64 tokens
  assert manifest['splits']['validation']['documents'] == 8
  assert manifest['vocab_size'] == 320 and manifest['dtype'] == 'uint16'
  assert 0 < manifest['unigram_entropy'] < np.log(320)


def test_long_documents_span_consecutive_records(tiny_data):
  stream = data.TokenStream(tiny_data, 'train', seq_len=16)
  lengths = np.diff(stream.offsets)
  assert lengths.max() == 64
  for k in np.flatnonzero(stream.start > 0):
    # A continuation record follows the previous part of the same document.
    assert stream.document[k] == stream.document[k - 1]
    assert stream.start[k] == stream.start[k - 1] + lengths[k - 1] == stream.start[k - 1] + 64


def test_every_kind_of_bad_input_is_skipped_counted_and_reported(tmp_path, tiny_data):
  good = tmp_path / 'good.jsonl'
  good.write_text('\n'.join(json.dumps({'text': f'the king speaks {i}.'}) for i in range(5)) + '\n')
  bad = tmp_path / 'bad.jsonl'
  bad.write_bytes(b'{"text": "fine"}\n{not json}\n{"body": "no text field"}\n'
                  b'{"text": "\xff\xfe"}\n{"text": "   "}\n[1, 2]\n')
  broken_txt = tmp_path / 'broken.txt'
  broken_txt.write_bytes(b'caf\xe9')
  empty_txt = tmp_path / 'empty.txt'
  empty_txt.write_text('\n\n')
  table = tmp_path / 'table.parquet'
  pq.write_table(pa.table({'text': ['the queen runs.', '', None]}), table)
  wrong_column = tmp_path / 'other.parquet'
  pq.write_table(pa.table({'body': ['x']}), wrong_column)
  not_parquet = tmp_path / 'junk.parquet'
  not_parquet.write_bytes(b'this is not parquet')

  manifest = prepare([str(p) for p in (good, bad, broken_txt, empty_txt, table, wrong_column, not_parquet)],
                     tmp_path / 'out', tokenizer=tiny_data / 'tokenizer.model', workers=2)
  assert manifest['splits']['train']['documents'] == 5 + 1 + 1
  assert manifest['skipped'] == {
      'not JSON': 1, "no text field 'text'": 2, 'invalid UTF-8': 2, 'empty document': 4,
      "no column 'text'": 1, 'unreadable parquet file': 1}
  problems = '\n'.join(manifest['problems'])
  for where in (f'{bad}:2: not JSON', f"{bad}:3: no text field 'text'", f'{bad}:4: byte 10: invalid UTF-8',
                f'{bad}:5: empty document', f'{broken_txt}: byte 3: invalid UTF-8', f'{table}: row 2: empty',
                f'{table}: row 3: empty', f'{wrong_column}: columns are', f'{not_parquet}:'):
    assert where in problems, where


def test_missing_input_and_unknown_type_are_clear_errors(tmp_path):
  with pytest.raises(UserError, match="input 'nowhere/\\*.txt' matches no file"):
    prepare(['nowhere/*.txt'], tmp_path / 'out')
  (tmp_path / 'notes.md').write_text('x')
  with pytest.raises(UserError, match="unsupported input type '.md'; use .txt, .jsonl or .parquet"):
    prepare([str(tmp_path / 'notes.md')], tmp_path / 'out')


def shard_bytes(directory):
  return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.suffix in ('.arrayrecord', '.npz')}


def test_prepare_killed_midway_and_rerun_gives_the_same_shards(tmp_path, tiny_data):
  (tmp_path / 'in').mkdir()
  inputs = write_corpus(tmp_path / 'in', 40, seed=7)
  tokenizer = str(tiny_data / 'tokenizer.model')
  prepare(inputs, tmp_path / 'whole', tokenizer=tokenizer, workers=1)

  code = ('import sys; from trainer.prepare import prepare; '
          f'prepare(sys.argv[1:], {str(tmp_path / "killed")!r}, tokenizer={tokenizer!r}, workers=1)')
  process = subprocess.Popen([sys.executable, '-c', code, *inputs])
  deadline = time.time() + 60
  while len(list((tmp_path / 'killed').glob('train-*.json'))) < 5 and time.time() < deadline:
    time.sleep(0.01)
  os.kill(process.pid, signal.SIGKILL)
  process.wait()
  finished = len(list((tmp_path / 'killed').glob('train-*.json')))
  assert 5 <= finished < 40 and not (tmp_path / 'killed' / 'manifest.json').exists()

  manifest = prepare(inputs, tmp_path / 'killed', tokenizer=tokenizer, workers=2)
  assert shard_bytes(tmp_path / 'killed') == shard_bytes(tmp_path / 'whole')
  assert manifest['splits'] == read_manifest(tmp_path / 'whole')['splits']
  assert not list((tmp_path / 'killed').glob('*.partial'))


def test_prepare_refuses_a_directory_made_from_other_inputs_or_settings(tmp_path):
  """Issue 16, defect 2: into a finished directory prepare returned the old manifest
  whatever the new inputs and vocabulary; into a partial one it kept the old shards."""
  (tmp_path / 'a').mkdir()
  (tmp_path / 'b').mkdir()
  first, second = write_corpus(tmp_path / 'a', 6, seed=1), write_corpus(tmp_path / 'b', 4, seed=2)
  out = tmp_path / 'out'
  made = prepare(first, out, vocab_size=320, workers=1)
  assert prepare(first, out, vocab_size=320, workers=1) == made  # the same preparation: kept as it is
  for inputs, vocab, what in ((second, 320, 'inputs differ'), (first, 352, 'tokenizer differ'),
                              (first + second, 320, 'inputs differ')):
    with pytest.raises(UserError, match=rf'{out} holds data prepared from other inputs or settings \({what}\); '
                                        'give another --output, or --overwrite to prepare it again'):
      prepare(inputs, out, vocab_size=vocab, workers=1)
  redone = prepare(second, out, vocab_size=352, workers=1, overwrite=True)
  assert [s['source'] for s in redone['splits']['train']['shards']] == second
  assert redone['vocab_size'] == 352 and len(list(out.glob('train-*.arrayrecord'))) == 4
  # A partial directory (no manifest yet) is refused the same way.
  (out / 'manifest.json').unlink()
  with pytest.raises(UserError, match='inputs differ'):
    prepare(first, out, vocab_size=352, workers=1)


def test_a_directory_prepared_by_an_earlier_salt_is_not_reused_blindly(tmp_path, tiny_data):
  (tmp_path / 'in').mkdir()
  inputs = write_corpus(tmp_path / 'in', 3, seed=3)
  out = tmp_path / 'old'
  prepare(inputs, out, tokenizer=str(tiny_data / 'tokenizer.model'), workers=1)
  (out / 'settings.json').unlink()
  with pytest.raises(UserError, match=r'which salt would write but did not write here \(an earlier salt, which did '
                                      'not record them'):
    prepare(inputs, out, tokenizer=str(tiny_data / 'tokenizer.model'), workers=1)


# --- loader ----------------------------------------------------------------------------


def test_one_epoch_reads_every_token_of_every_document_exactly_once(tiny_data):
  stream = data.TokenStream(tiny_data, 'train', seq_len=24)
  global_batch = 4
  steps = len(stream) // global_batch  # whole steps inside the first epoch
  rows = data.grain.MapDataset.range(len(stream)).shuffle(5).repeat()
  epoch = [rows[i] for i in range(len(stream))]
  assert sorted(epoch) == list(range(len(stream)))
  assert sorted(read_rows(stream, epoch)) == sorted(stream_tokens(stream))
  # The batches hand out exactly those rows, in that order.
  batches = list(data.train_batches(stream, global_batch=global_batch, seed=5, first_step=0, num_steps=steps))
  first_rows = [stream.row(r) for r in epoch[:steps * global_batch]]
  got = np.concatenate([b['inputs'] for b in batches])
  np.testing.assert_array_equal(got, np.stack([r['tokens'][:-1] for r in first_rows]))


def test_two_processes_read_disjoint_halves_of_each_global_batch(tiny_data):
  stream = data.TokenStream(tiny_data, 'train', seq_len=24)
  kwargs = dict(global_batch=8, seed=1, first_step=0, num_steps=6)
  whole = list(data.train_batches(stream, **kwargs))
  halves = [list(data.train_batches(stream, process_index=p, process_count=2, **kwargs)) for p in (0, 1)]
  for step in range(6):
    for key in whole[step]:
      np.testing.assert_array_equal(np.concatenate([halves[0][step][key], halves[1][step][key]]),
                                    whole[step][key])


@pytest.mark.parametrize('workers', [0, 2])
def test_a_restart_at_step_k_reads_what_the_uninterrupted_run_reads(tiny_data, workers):
  stream = data.TokenStream(tiny_data, 'train', seq_len=24)
  uninterrupted = list(data.train_batches(stream, global_batch=4, seed=2, first_step=0, num_steps=12))
  # Restart mid-epoch at step 7, with worker processes, then on 4 "hosts" instead of 1.
  resumed = list(data.train_batches(stream, global_batch=4, seed=2, first_step=7, num_steps=5, workers=workers))
  for got, want in zip(resumed, uninterrupted[7:], strict=True):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  on_four_hosts = [list(data.train_batches(stream, global_batch=4, seed=2, first_step=7, num_steps=5,
                                           process_index=p, process_count=4)) for p in range(4)]
  for step in range(5):
    np.testing.assert_array_equal(np.concatenate([h[step]['inputs'] for h in on_four_hosts]),
                                  uninterrupted[7 + step]['inputs'])


def test_packed_rows_follow_the_source_documents(tiny_data):
  stream = data.TokenStream(tiny_data, 'train', seq_len=64)
  sp = spm.SentencePieceProcessor(model_file=str(tiny_data / 'tokenizer.model'))
  batch = next(data.train_batches(stream, global_batch=8, seed=3, first_step=0, num_steps=1))
  assert all(v.shape == (8, 64) for v in batch.values())
  for row in range(8):
    inputs, targets, segments = batch['inputs'][row], batch['targets'][row], batch['segment_ids'][row]
    np.testing.assert_array_equal(inputs[1:], targets[:-1])
    for segment in np.unique(segments[segments > 0]):
      where = segments == segment
      # One contiguous piece of one document: positions count up by one, no EOS inside.
      assert np.all(np.diff(np.flatnonzero(where)) == 1)
      np.testing.assert_array_equal(np.diff(batch['positions'][row][where]), 1)
      assert sp.eos_id() not in inputs[where][:-1]
    # A target is trained on only if it follows in the same document.
    boundary = np.append(segments[1:] != segments[:-1], False)
    assert not batch['weights'][row][boundary].any()


def test_each_row_matches_the_documents_it_was_cut_from(tiny_data):
  stream = data.TokenStream(tiny_data, 'train', seq_len=40)
  every_token = sorted(stream_tokens(stream))
  assert sorted(read_rows(stream, range(len(stream)))) == every_token


def private_index_bytes(stream):
  """Bytes of the stream's index arrays in this process's own memory, not a mapped file's."""
  return sum(a.nbytes for a in vars(stream).values() if isinstance(a, np.ndarray) and not isinstance(a, np.memmap))


@pytest.mark.parametrize('selected', [False, True])
def test_workers_map_the_index_rather_than_receive_a_copy(tiny_data, selected):
  """Issue 23, defect 2: the index cost 32 bytes per record in each process, and a
  pickled copy in each worker process (4.7 GB each at 300B tokens)."""
  full = data.TokenStream(tiny_data, 'train', seq_len=24)
  records = np.arange(0, len(full.records), 3) if selected else None
  stream = data.TokenStream(tiny_data, 'train', seq_len=24, records=records)
  assert private_index_bytes(stream) == 0
  worker = pickle.loads(pickle.dumps(stream))
  assert private_index_bytes(worker) == 0
  for name in ('document', 'start', 'offsets'):
    assert getattr(worker, name).filename == getattr(stream, name).filename
  for r in range(len(stream)):
    for key, value in stream.row(r).items():
      np.testing.assert_array_equal(worker.row(r)[key], value)


def test_the_index_files_go_with_the_stream_that_wrote_them(tiny_data):
  stream = data.TokenStream(tiny_data, 'train', seq_len=24)
  directory = Path(stream.offsets.filename).parent
  worker = pickle.loads(pickle.dumps(stream))
  del worker
  gc.collect()
  assert directory.is_dir()  # a worker's copy leaves them to the process that wrote them
  del stream
  gc.collect()
  assert not directory.exists()


def test_the_index_files_of_a_killed_process_go_when_another_stream_opens(tiny_data):
  """A SIGKILLed process runs no finalizer: the next stream removes what it left."""
  code = ('import sys, time; from pathlib import Path; from trainer import data; '
          f'stream = data.TokenStream({str(tiny_data)!r}, "validation", 16); '
          'print(Path(stream.offsets.filename).parent, flush=True); time.sleep(300)')
  holder = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True)
  directory = Path(holder.stdout.readline().strip())
  data.TokenStream(tiny_data, 'validation', 16)
  assert directory.is_dir()  # its process lives
  holder.kill()
  holder.wait()
  holder.stdout.close()
  data.TokenStream(tiny_data, 'validation', 16)
  assert not directory.exists()


def test_validation_batches_cover_the_split_once_in_order(tiny_data):
  stream = data.TokenStream(tiny_data, 'validation', seq_len=16)
  batches = list(data.eval_batches(stream, global_batch=4, max_batches=10_000))
  assert len(batches) == -(-len(stream) // 4)
  tokens = np.concatenate([b['inputs'] for b in batches])
  np.testing.assert_array_equal(tokens[:len(stream)], np.stack([stream.row(r)['tokens'][:-1] for r in range(len(stream))]))
  assert not batches[-1]['segment_ids'][len(stream) % 4 or 4:].any()  # padding rows are empty


# --- selection -------------------------------------------------------------------------


def test_top_selection_keeps_the_highest_scores_and_never_the_unscored():
  scores = np.array([0.5, np.nan, 2.0, 1.0, 2.0, 0.1, np.nan, 3.0])
  np.testing.assert_array_equal(data.select_records(scores, rule='top', keep_fraction=0.5), [2, 4, 7])
  np.testing.assert_array_equal(data.select_records(scores, rule='top', keep_fraction=1.0), [0, 2, 3, 4, 5, 7])


def test_band_selection_keeps_a_percentile_band():
  scores = np.arange(10, dtype=float)[::-1]  # record i has score 9 - i
  # Ranks 2..4 from the lowest score are records 7, 6, 5.
  np.testing.assert_array_equal(data.select_records(scores, rule='band', band=(0.2, 0.5)), [5, 6, 7])


def test_the_loader_reads_only_the_selected_records(tiny_data):
  full = data.TokenStream(tiny_data, 'train', seq_len=24)
  keep = np.arange(0, len(full.records), 3)
  stream = data.TokenStream(tiny_data, 'train', seq_len=24, records=keep)
  read = sorted(read_rows(stream, range(len(stream))))
  assert read == sorted(stream_tokens(stream))
  assert {d for d, _ in read} <= set(full.document[keep])
  # A selection that skips a document's middle record starts a new segment after the gap.
  for r in range(len(stream)):
    row = stream.row(r)
    for i in range(1, stream.row_len):
      if row['segment_ids'][i] and row['segment_ids'][i] == row['segment_ids'][i - 1]:
        assert row['positions'][i] == row['positions'][i - 1] + 1


def test_token_bytes_count_utf8_bytes(tiny_data):
  sp = spm.SentencePieceProcessor(model_file=str(tiny_data / 'tokenizer.model'))
  sizes = data.token_bytes(tiny_data / 'tokenizer.model')
  assert sizes[sp.encode('the king speaks')].sum() == len(' the king speaks')  # with sentencepiece's leading space
  assert sizes[sp.eos_id()] == 0


def test_a_truncated_or_missing_shard_is_named_when_the_data_is_opened(tmp_path, tiny_data):
  """Issue 16, defect 6 and 7: a damaged shard surfaced only when its record was read (a
  traceback naming no file); a truncated validation shard killed the run at its final
  evaluation."""
  copy = tmp_path / 'copy'
  shutil.copytree(tiny_data, copy)
  shard = copy / read_manifest(copy)['splits']['validation']['shards'][0]['file']
  shard.write_bytes(shard.read_bytes()[:-100])
  with pytest.raises(UserError, match=rf'{shard} is \d+ bytes, but salt prepare wrote \d+: it was truncated'):
    data.TokenStream(copy, 'validation', 32)
  shard.unlink()
  with pytest.raises(UserError, match=rf'{shard} is missing; prepare the data again'):
    data.TokenStream(copy, 'validation', 32)


def flip_bytes_in_the_middle(path):
  damaged = bytearray(path.read_bytes())
  middle = len(damaged) // 2
  damaged[middle:middle + 16] = bytes(b ^ 0xFF for b in damaged[middle:middle + 16])
  path.write_bytes(bytes(damaged))  # the same size: only reading finds it


def test_flipped_bytes_in_a_shard_are_found_when_the_data_is_opened(tmp_path, tiny_data):
  """Issue 16, defect 6: flipped bytes in a shard were found only when that record was
  read, with a traceback naming no file. The manifest's hashes find them at the start."""
  copy = tmp_path / 'copy'
  shutil.copytree(tiny_data, copy)
  shards = read_manifest(copy)['splits']['train']['shards']
  shard = copy / shards[0]['file']
  flip_bytes_in_the_middle(shard)
  with pytest.raises(UserError, match=rf"{shard} does not hold what salt prepare wrote \(its sha256 differs"):
    data.TokenStream(copy, 'train', 32)
  # Without hashing (a corpus too large to read at every start) a record that cannot be
  # read still names its shard.
  stream = data.TokenStream(copy, 'train', 32, verify_hashes=False)
  with pytest.raises(UserError, match=rf'records 0\.\.\d+ cannot be read from {shard}.*; prepare the data again'):
    stream.record_tokens(list(range(shards[0]['records'])))


def test_flipped_bytes_in_a_shard_index_are_found_when_the_data_is_opened(tmp_path, tiny_data):
  copy = tmp_path / 'copy'
  shutil.copytree(tiny_data, copy)
  index = copy / read_manifest(copy)['splits']['validation']['shards'][0]['index']
  flip_bytes_in_the_middle(index)
  with pytest.raises(UserError, match=rf'{index} does not hold what salt prepare wrote'):
    data.TokenStream(copy, 'validation', 32)


def test_a_corpus_with_no_text_is_one_line(tmp_path):
  """Issue 16: a corpus with no sentences was sentencepiece's internal check failing."""
  (tmp_path / 'blank.txt').write_text('\n\n   \n')
  with pytest.raises(UserError, match=r'^the inputs hold no text to train a vocabulary on'):
    prepare([str(tmp_path / 'blank.txt')], tmp_path / 'out', vocab_size=300, workers=1)


# --- worker processes ------------------------------------------------------------------


def alive(pid: int) -> bool:
  """Whether the process runs (a zombie, dead but not yet reaped, does not)."""
  try:
    stat = Path(f'/proc/{pid}/stat').read_text()
  except FileNotFoundError:
    return False
  return stat.rsplit(')', 1)[1].split()[0] != 'Z'


def gone_within(pids, seconds: float) -> list[int]:
  """The pids still running after `seconds`."""
  deadline = time.time() + seconds
  while any(alive(p) for p in pids) and time.time() < deadline:
    time.sleep(0.1)
  return [p for p in pids if alive(p)]


@pytest.mark.skipif(not Path('/proc/self/stat').exists(), reason='reads process states from /proc')
def test_loader_workers_end_when_the_training_process_is_killed(tiny_data):
  """Issue 23, defect 1: Grain's workers (~230 MB each) lived on for minutes after
  `salt train` was SIGKILLed."""
  code = ('import multiprocessing, sys, time; from trainer import data; '
          f'stream = data.TokenStream({str(tiny_data)!r}, "train", 24); '
          'batches = data.train_batches(stream, global_batch=4, seed=0, first_step=0, num_steps=10**6, workers=2); '
          'next(batches); '
          'print(*[p.pid for p in multiprocessing.active_children()], flush=True); '
          'time.sleep(300)')
  parent = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True)
  workers = [int(pid) for pid in parent.stdout.readline().split()]
  assert len(workers) == 2 and all(alive(p) for p in workers)
  parent.kill()
  parent.wait()
  parent.stdout.close()
  left = gone_within(workers, 5)
  for pid in left:  # the test's own mess, before it fails
    os.kill(pid, signal.SIGKILL)
  assert not left


@pytest.mark.skipif(not Path('/proc/self/stat').exists(), reason='reads process states from /proc')
def test_without_prctl_a_child_polls_for_its_parent():
  """Where the kernel cannot signal a parent's death, a thread notices it."""
  child = ('import os, time; from trainer import processes; '
           'processes._kill_me_when_parent_dies = lambda: False; '
           'processes.die_with_parent(); print(os.getpid(), flush=True); time.sleep(300)')
  code = f'import subprocess, sys, time; subprocess.Popen([sys.executable, "-c", {child!r}]); time.sleep(300)'
  parent = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True)
  pid = int(parent.stdout.readline())
  parent.kill()
  parent.wait()
  parent.stdout.close()
  left = gone_within([pid], 5)
  for p in left:
    os.kill(p, signal.SIGKILL)
  assert not left


def test_a_child_whose_parent_already_died_ends_at_once():
  code = 'from trainer import processes; processes.die_with_parent(parent_pid=0); print("still here")'
  done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=60)
  assert (done.returncode, done.stdout) == (1, '')
