"""`salt prepare` and the loader: counts, skipped input, packing that respects documents."""

import json

import numpy as np
import pytest
import sentencepiece as spm

from trainer import data
from trainer.errors import UserError
from trainer.prepare import prepare, read_manifest


def test_manifest_counts_documents_and_tokens(tiny_data):
  manifest = read_manifest(tiny_data)
  train = manifest['splits']['train']
  assert train['documents'] == 60 and len(train['shards']) == 4  # 16 documents per shard
  assert sum(s['tokens'] for s in train['shards']) == train['tokens']
  assert manifest['splits']['validation']['documents'] == 8
  assert manifest['vocab_size'] == 320 and manifest['dtype'] == 'uint16'
  assert 0 < manifest['unigram_entropy'] < np.log(320)


def test_bad_input_is_skipped_counted_and_reported(tmp_path, tiny_data):
  good = tmp_path / 'good.jsonl'
  good.write_text('\n'.join(json.dumps({'text': f'the king speaks {i}.'}) for i in range(5)) + '\n')
  bad = tmp_path / 'bad.jsonl'
  bad.write_bytes(b'{"text": "fine"}\n{not json}\n{"body": "no text field"}\n'
                  b'{"text": "\xff\xfe"}\n{"text": "   "}\n')
  broken_txt = tmp_path / 'broken.txt'
  broken_txt.write_bytes(b'caf\xe9')
  manifest = prepare([str(good), str(bad), str(broken_txt)], tmp_path / 'out',
                     tokenizer=tiny_data / 'tokenizer.model')
  assert manifest['splits']['train']['documents'] == 6
  assert manifest['skipped'] == {'JSONDecodeError': 1, 'KeyError': 1, 'UnicodeDecodeError': 2, 'empty': 1}
  assert any(p.startswith(f'{bad}:2: JSONDecodeError') for p in manifest['problems'])
  assert any(p.startswith(f'{broken_txt}: invalid UTF-8 at byte 3') for p in manifest['problems'])


def test_missing_input_is_a_clear_error(tmp_path):
  with pytest.raises(UserError, match="input 'nowhere/\\*.txt' matches no file"):
    prepare(['nowhere/*.txt'], tmp_path / 'out')


def test_packed_rows_follow_the_source_documents(tiny_data):
  sp = spm.SentencePieceProcessor(model_file=str(tiny_data / 'tokenizer.model'))
  batch = next(data.train_batches(tiny_data, seq_len=64, batch_size=8, seed=3))
  assert all(v.shape == (8, 64) for v in batch.values())
  for row in range(8):
    inputs, targets, segments = batch['inputs'][row], batch['targets'][row], batch['segment_ids'][row]
    np.testing.assert_array_equal(inputs[1:], targets[:-1])
    for segment in np.unique(segments):
      where = segments == segment
      # Each segment is one contiguous piece of one document: positions count up by one
      # and no EOS appears before the piece's end.
      np.testing.assert_array_equal(np.diff(batch['positions'][row][where]), 1)
      assert sp.eos_id() not in inputs[where][:-1]
    # A target is trained on only if it follows in the same document.
    boundary = np.append(segments[1:] != segments[:-1], False)
    assert not batch['weights'][row][boundary].any()


def test_token_bytes_count_utf8_bytes(tiny_data):
  sp = spm.SentencePieceProcessor(model_file=str(tiny_data / 'tokenizer.model'))
  sizes = data.token_bytes(tiny_data / 'tokenizer.model')
  ids = sp.encode('the king speaks')
  assert sizes[ids].sum() == len(' the king speaks')  # sentencepiece's leading space counts
  assert sizes[sp.eos_id()] == 0
