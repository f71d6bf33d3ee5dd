"""`salt train` end to end on a tiny corpus: the loss falls and the run directory has it all."""

import json
import re

import pytest

from etils import epath

from tests.helpers import tiny_config, write_corpus
from trainer import cli, progress
from trainer.errors import UserError
from trainer.metrics import MetricWriter
from trainer.prepare import prepare
from trainer.train import train


@pytest.mark.slow
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


def test_a_vocabulary_smaller_than_the_tokenizer_is_a_clear_error(tiny_data, tmp_path):
  config = tiny_config(tiny_data)
  config.model.vocab_size = 256
  with pytest.raises(UserError, match='model.vocab_size=256 but the tokenizer of .* has 320 tokens; '
                                      'set --config.model.vocab_size=320'):
    train(config, tmp_path)


def test_data_directory_without_manifest_is_a_clear_error(tmp_path, capsys):
  code = cli.main(['train', '--config', 'configs/demo.py', '--workdir', str(tmp_path),
                   f'--config.data.path={tmp_path}'])
  assert code == 2
  assert 'holds no manifest.json; write one with `salt prepare' in capsys.readouterr().err


def short_run(data_dir, steps):
  config = tiny_config(data_dir)
  config.update(total_steps=steps)
  config.optim.warmup_steps = 1
  config.checkpoint.every_steps = 2
  config.eval.every_steps = 100
  return config


@pytest.mark.slow
def test_a_resume_that_would_read_other_batches_is_refused_unless_allowed_and_then_recorded(tiny_data, tmp_path):
  """Issue 16, defect 4: a changed shuffle seed (or batch size, sequence length) only
  warned, and config.json was overwritten without a trace."""
  train(short_run(tiny_data, 2), tmp_path)
  changed = short_run(tiny_data, 4)
  changed.data.shuffle_seed = 1
  with pytest.raises(UserError, match=r'resuming at step 2 would read other batches than the interrupted run '
                                      r'\(shuffle_seed 0 -> 1\); restore those settings and data, or resume with '
                                      r'--allow-data-change'):
    train(changed, tmp_path)
  train(changed, tmp_path, allow_data_change=True)
  written = json.loads((tmp_path / 'config.json').read_text())
  assert written['data_changes'] == [{'step': 2, 'changes': ['shuffle_seed 0 -> 1']}]
  assert written['config']['data']['shuffle_seed'] == 1


@pytest.mark.parametrize('content', ['', '{"config": {"total_st', '[]'])
def test_a_damaged_run_config_is_one_line(content, tiny_data, tmp_path):
  """Issue 23: an empty or truncated RUN/config.json was a traceback when a run started."""
  (tmp_path / 'config.json').write_text(content)
  with pytest.raises(UserError, match=rf'^{tmp_path / "config.json"} is damaged \(.+\): restore it, or delete it'):
    train(short_run(tiny_data, 2), tmp_path)


def test_a_run_config_write_cut_short_leaves_the_previous_one_whole(tiny_data, tmp_path, monkeypatch):
  """Issue 23: RUN/config.json was written in place, so a write cut short left it truncated."""
  previous = json.dumps({'data_changes': [{'step': 2, 'changes': ['shuffle_seed 0 -> 1']}]})
  (tmp_path / 'config.json').write_text(previous)
  gpath = type(epath.Path(tmp_path))
  write_text = gpath.write_text

  def cut_short(path, text, *args, **kwargs):
    if not path.name.startswith('config.json'):
      return write_text(path, text, *args, **kwargs)
    write_text(path, text[:len(text) // 2])
    raise OSError('No space left on device')

  monkeypatch.setattr(gpath, 'write_text', cut_short)
  with pytest.raises(OSError, match='No space left on device'):
    train(short_run(tiny_data, 2), tmp_path)
  assert (tmp_path / 'config.json').read_text() == previous


def test_the_same_documents_prepared_in_another_order_are_other_data(tiny_data, tmp_path):
  """Issue 16, defect 4: resume compared counts, not content."""
  (tmp_path / 'in').mkdir()
  files = write_corpus(tmp_path / 'in', 12, seed=5)
  tokenizer = str(tiny_data / 'tokenizer.model')
  prepare(files, tmp_path / 'a', tokenizer=tokenizer, workers=1)
  prepare(files[::-1], tmp_path / 'b', tokenizer=tokenizer, workers=1)
  train(short_run(tmp_path / 'a', 2), tmp_path / 'run')
  with pytest.raises(UserError, match=r'would read other batches than the interrupted run \(train_sha256 '):
    train(short_run(tmp_path / 'b', 4), tmp_path / 'run')


def test_a_state_too_big_for_the_devices_is_one_line_before_anything_is_allocated(tiny_data, tmp_path):
  """Issue 16: `salt train` with a model too big was killed for memory with no message."""
  config = tiny_config(tiny_data)
  config.model.update(d_model=8192, n_layers=48, d_ff=32768, n_heads=64, n_kv_heads=64, head_dim=128)
  with pytest.raises(UserError, match=r'the train state \(parameters, optimizer moments\) needs [\d.]+ GiB per '
                                      r"device, more than the [\d.]+ [MG]iB of the host's available memory .+: it "
                                      r'will not fit; shard it over more devices'):
    train(config, tmp_path)
  assert not (tmp_path / 'checkpoints').exists()


def test_progress_where_output_is_not_a_terminal_is_plain_lines(capsys, monkeypatch):
  """Issue 17: in a pod worker's log, CI or `| tee`, the bar's carriage returns made one
  unreadable line; there progress is a plain line every few seconds."""
  monkeypatch.setattr(progress, 'PLAIN_EVERY_SECONDS', 0.0)
  bar = progress.bar(3, 1)  # resumed at step 1; capsys's streams are not terminals
  bar.update(1)
  bar.set_postfix_str('loss 3.214, 5,904 tok/s, MFU n/a')
  bar.update(1)
  bar.close()
  lines = capsys.readouterr().err.splitlines()
  assert re.fullmatch(r'step 2/3 \(67%\), 0:00:00 elapsed, 0:00:00 left', lines[0])
  assert lines[1] == 'step 3/3 (100%), 0:00:00 elapsed, 0:00:00 left: loss 3.214, 5,904 tok/s, MFU n/a'
  assert len(lines) == 2 and '\r' not in capsys.readouterr().err


def test_metrics_jsonl_stays_standard_json_when_a_value_is_not_finite(tmp_path):
  """Issue 23, 5: a NaN was written as a bare NaN, which strict JSON readers refuse."""
  writer = MetricWriter(tmp_path, enabled=True)
  writer.write(3, {'loss': float('nan'), 'lr': float('inf'), 'grad_norm': 1.5})
  writer.close()

  def refuse(constant):
    raise ValueError(f'{constant} is not JSON')

  line = json.loads((tmp_path / 'metrics.jsonl').read_text(), parse_constant=refuse)
  assert line == {'step': 3, 'loss': None, 'lr': None, 'grad_norm': 1.5}
