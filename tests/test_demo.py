"""`salt demo` end to end on the tiny corpus: every stage, the report, and skipping done work."""

import logging
from pathlib import Path

import numpy as np

from tests.conftest import tiny_config
from trainer import demo


def tiny_demo_config(data_dir):
  def get_config(arg):
    c = tiny_config(data_dir)
    c.total_steps = 12
    c.checkpoint.every_steps = 100
    c.eval.update(every_steps=4, batches=1)
    c.log.every_steps = 4
    if arg == 'slm':
      c.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=16, d_ff=64)
    if arg == 'salt':
      c.salt.n_kd = 4
    return c

  return get_config


def test_the_demo_runs_every_stage_writes_its_report_and_then_skips_done_work(tiny_data, tmp_path, caplog,
                                                                            monkeypatch):
  monkeypatch.chdir(tmp_path)  # a relative run directory, as `make demo` gives
  with caplog.at_level(logging.INFO, logger='salt'):
    report = demo.run(Path('demo'), tiny_demo_config(tiny_data), score_batch=8)
  run_dir = tmp_path / 'demo'
  text = report.read_text()
  assert 'SALT reaches' in text or 'SALT does **not** reach' in text
  assert '| SLM (teacher) |' in text and '| 12 |' in text
  for plot in ('val_loss_vs_steps.png', 'val_loss_vs_time.png'):
    assert (run_dir / plot).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  scores = np.load(run_dir / 'scores.npy')
  assert np.isfinite(scores).sum() > 0

  caplog.clear()
  with caplog.at_level(logging.INFO, logger='salt'):
    demo.run(Path('demo'), tiny_demo_config(tiny_data), score_batch=8)
  done = [r.message for r in caplog.records if r.message.startswith('== ')]
  assert len(done) == 4 and all(': done (' in m for m in done)


def test_first_reach_interpolates_between_evaluations():
  steps, loss = np.array([10.0, 20.0, 30.0]), np.array([5.0, 4.0, 3.0])
  assert demo.first_reach(steps, loss, 3.5) == 25.0
  assert demo.first_reach(steps, loss, 6.0) == 10.0
  assert demo.first_reach(steps, loss, 2.0) is None
