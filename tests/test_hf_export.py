"""`salt export`: a salt checkpoint as a Hugging Face model of its family that salt imports back bit for bit."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.helpers import tiny_config, write_corpus
from tests.test_hf_import import CASES, random_weights, write_model
from trainer import cli, train
from trainer.checkpoint_files import read_checkpoint
from trainer.errors import UserError
from trainer.hf_export import export, hf_config
from trainer.hf_import import import_teacher
from trainer.model import ModelConfig
from trainer.prepare import prepare


def params_of(checkpoint) -> dict:
  return read_checkpoint(Path(checkpoint))[1]


def assert_bitwise_equal(a: dict, b: dict) -> None:
  leaves_a, leaves_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in leaves_a] == [p for p, _ in leaves_b]
  for (path, x), (_, y) in zip(leaves_a, leaves_b):
    assert x.dtype == y.dtype and np.array_equal(x.view(np.uint8), y.view(np.uint8)), jax.tree_util.keystr(path)


@pytest.mark.parametrize('case', ['gqa-untied-float32', 'tied-sharded-bfloat16', 'rope-llama3', 'mistral-sliding-window',
                                  'qwen2-biases-tied', 'gemma3-windowed-and-global-layers'])
def test_export_then_import_gives_back_the_same_parameters_bit_for_bit(case, sp_model, tmp_path):
  hf, layout = CASES[case]
  first = import_teacher(write_model(tmp_path / 'hf', hf, random_weights(hf), tokenizer=sp_model, **layout),
                         tmp_path / 'salt')
  # Tiny shards, so that the export is sharded with an index too.
  summary = export(first['checkpoint'], tmp_path / 'exported', max_shard_gb=20_000 / 2**30)
  assert len(summary['files']) > 1 and (tmp_path / 'exported' / 'model.safetensors.index.json').is_file()
  again = import_teacher(tmp_path / 'exported', tmp_path / 'again')
  assert_bitwise_equal(params_of(first['checkpoint']), params_of(again['checkpoint']))
  exported = json.loads((tmp_path / 'exported' / 'config.json').read_text())
  assert {k: exported[k] for k in hf if k in exported and k != 'max_position_embeddings'} == {
      k: hf[k] for k in hf if k in exported and k != 'max_position_embeddings'} | (
      {'rope_scaling': exported['rope_scaling']} if hf.get('rope_scaling') else {})
  assert exported['architectures'] == hf['architectures']
  tokenizer_config = json.loads((tmp_path / 'exported' / 'tokenizer_config.json').read_text())
  assert tokenizer_config['add_bos_token'] is False  # salt's documents never begin with BOS


@pytest.mark.slow
def test_a_trained_run_exports_with_its_data_s_tokenizer_and_imports_back(tiny_data, tmp_path):
  config = tiny_config(tiny_data)
  config.total_steps = 6
  config.model.n_kv_heads = 2  # GQA: 4 query heads share 2
  train.train(config, tmp_path / 'run')
  checkpoint = tmp_path / 'run' / 'checkpoints' / '6'
  assert cli.main(['export', str(checkpoint), str(tmp_path / 'hf'), '--dtype', 'bfloat16']) == 0
  tensors = load_file(tmp_path / 'hf' / 'model.safetensors')
  assert {t.dtype.name for t in tensors.values()} == {'bfloat16'}
  assert cli.main(['export', str(checkpoint), str(tmp_path / 'hf32')]) == 0
  again = import_teacher(tmp_path / 'hf32', tmp_path / 'again')
  assert_bitwise_equal(params_of(checkpoint), params_of(again['checkpoint']))


def test_a_bad_checkpoint_a_used_output_or_a_wrong_tokenizer_is_one_line(tiny_data, sp_model, tmp_path, capsys):
  hf, layout = CASES['gqa-untied-float32']
  first = import_teacher(write_model(tmp_path / 'hf', hf, random_weights(hf), tokenizer=sp_model, **layout),
                         tmp_path / 'salt')
  assert cli.main(['export', str(tmp_path / 'salt'), str(tmp_path / 'out')]) == 2
  assert f'{tmp_path / "salt"} is not a salt checkpoint (RUN/checkpoints/STEP)' in capsys.readouterr().err
  (tmp_path / 'used').mkdir()
  (tmp_path / 'used' / 'x').write_text('')
  assert cli.main(['export', first['checkpoint'], str(tmp_path / 'used')]) == 2
  assert 'is not empty; export into a new directory' in capsys.readouterr().err
  with pytest.raises(UserError, match='config.json is neither a sentencepiece model nor a Hugging Face'):
    export(first['checkpoint'], tmp_path / 'out', tokenizer=tmp_path / 'hf' / 'config.json')
  (tmp_path / 'other').mkdir()
  prepare(write_corpus(tmp_path / 'other', 4, seed=5), tmp_path / 'other' / 'data', vocab_size=300, workers=1)
  with pytest.raises(UserError, match='is not the tokenizer the checkpoint was trained with'):
    export(first['checkpoint'], tmp_path / 'out', tokenizer=tmp_path / 'other' / 'data' / 'tokenizer.model')


def test_a_shard_size_that_is_not_a_positive_number_is_one_line(sp_model, tmp_path, capsys):
  """Issue 23: --max-shard-gb nan or inf was a traceback; 0 or less wrote a shard per tensor."""
  hf, layout = CASES['gqa-untied-float32']
  first = import_teacher(write_model(tmp_path / 'hf', hf, random_weights(hf), tokenizer=sp_model, **layout),
                         tmp_path / 'salt')
  for value in ('nan', 'inf', '0', '-1'):
    assert cli.main(['export', first['checkpoint'], str(tmp_path / 'out'), '--max-shard-gb', value]) == 2
    assert f'--max-shard-gb {float(value)} must be a positive number of GB' in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


def test_the_config_names_salt_s_architecture_for_hugging_face():
  cfg = ModelConfig(**tiny_config().model)

  class Pieces:
    bos_id, eos_id, pad_id = 1, 2, None

  config = hf_config(cfg, 32, Pieces(), 'float32')
  assert config['architectures'] == ['LlamaForCausalLM'] and 'pad_token_id' not in config
  assert config['num_key_value_heads'] == cfg.n_kv_heads and config['head_dim'] == cfg.head_dim
