"""`salt train` end to end on a tiny corpus: the loss falls and the run directory has it all."""

import json

import pytest

from tests.conftest import tiny_config
from trainer import cli
from trainer.errors import UserError
from trainer.train import train


def test_loss_falls_and_the_run_directory_holds_metrics_and_events(tiny_data, tmp_path):
  config = tiny_config(tiny_data)
  config.mesh.update(data=2, fsdp=2, tensor=2)
  config.checkpoint.every_steps = 15
  final = train(config, tmp_path)

  records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records] == list(range(5, 41, 5))
  # 40 steps on made-up sentences over 28 words: the loss must fall well below its
  # start (about ln 320 = 5.8 for an untrained model).
  assert records[0]['loss'] > 5.0
  assert records[-1]['loss'] < records[0]['loss'] - 2.0
  assert {'eval_loss', 'eval_bits_per_byte'} <= records[-1].keys()
  assert final['eval_loss'] == records[-1]['eval_loss'] < 4.0
  assert list((tmp_path / 'tensorboard').glob('events.out.tfevents.*'))
  written = json.loads((tmp_path / 'config.json').read_text())
  assert written['config']['total_steps'] == 40 and 'jax' in written['versions']
  # Every 15 steps, and the last step whatever the interval.
  assert sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir()) == [15, 30, 40]
  assert records[-1]['train_seconds'] > records[0]['train_seconds'] > 0


def test_a_tokenizer_of_another_size_is_a_clear_error(tiny_data, tmp_path):
  config = tiny_config(tiny_data)
  config.model.vocab_size = 512
  with pytest.raises(UserError, match='model.vocab_size=512 but the tokenizer of .* has 320 tokens; '
                                      'set --config.model.vocab_size=320'):
    train(config, tmp_path)


def test_data_directory_without_manifest_is_a_clear_error(tmp_path, capsys):
  code = cli.main(['train', '--config', 'configs/demo.py', '--workdir', str(tmp_path),
                   f'--config.data.path={tmp_path}'])
  assert code == 2
  assert 'holds no manifest.json; write one with `salt prepare' in capsys.readouterr().err
