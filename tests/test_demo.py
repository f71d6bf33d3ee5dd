"""`salt demo` end to end on the tiny corpus: every stage, the report, and skipping done work."""

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import tiny_config
from trainer import demo

pytestmark = pytest.mark.slow  # end to end: every test here runs whole jobs


def tiny_demo_config(data_dir, task=''):
  def get_config(arg):
    c = tiny_config(data_dir)
    c.total_steps = 12
    c.checkpoint.every_steps = 100
    c.eval.update(every_steps=4, batches=1, tasks=str(task))
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
  task = tmp_path / 'kings.jsonl'
  task.write_text(''.join(json.dumps({'context': f'the king {w}', 'choices': [' and the queen.', ' sword'], 'gold': 0})
                          + '\n' for w in ('speaks', 'runs', 'falls')))
  with caplog.at_level(logging.INFO, logger='salt'):
    report = demo.run(Path('demo'), tiny_demo_config(tiny_data, task), score_batch=8)
  run_dir = tmp_path / 'demo'
  text = report.read_text()
  assert 'SALT reaches' in text or 'SALT does **not** reach' in text
  assert '| SLM (teacher) |' in text
  # Accuracy beside the loss, at every evaluation, and what one seed cannot tell.
  assert '| run | final validation loss (nats/token) | kings acc | training seconds |' in text
  assert re.search(r'^\| 12 \| \d\.\d{4} \| \d\.\d{4} \| \d\.\d{3} \| \d\.\d{3} \|$', text, re.M)
  assert ('within seed noise' in text and '[-0.139, +0.120] nats/token' in text
          and 'standard error of about kings 0.' in text and '(3 examples)' in text)
  for plot in ('val_loss_vs_steps.png', 'val_loss_vs_time.png'):
    assert (run_dir / plot).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  scores = np.load(run_dir / 'scores.npy')
  assert np.isfinite(scores).sum() > 0

  caplog.clear()
  with caplog.at_level(logging.INFO, logger='salt'):
    demo.run(Path('demo'), tiny_demo_config(tiny_data, task), score_batch=8)
  done = [r.message for r in caplog.records if r.message.startswith('== ')]
  assert len(done) == 4 and all(': done (' in m for m in done)

  # Issue 18, 3: a second seed reuses the SLM, its scores and seed 0's students.
  caplog.clear()
  with caplog.at_level(logging.INFO, logger='salt'):
    demo.run(Path('demo'), tiny_demo_config(tiny_data, task), score_batch=8, seeds=2)
  trained = [r.message for r in caplog.records if r.message.startswith('== ') and ': done (' not in r.message]
  assert trained == ['== 3/4 the student, baseline (seed 1 of 2): demo/baseline-seed1',
                     '== 4/4 the student with SALT (seed 1 of 2): demo/salt-seed1']
  text = report.read_text()
  assert '## 2 seeds' in text and re.search(r'^\| 1 \| \d\.\d{4} \| \d\.\d{4} \| [+-]\d\.\d{4} \| ', text, re.M)
  assert re.search(r'Paired difference SALT - baseline: [+-]\d\.\d{4} nats/token, 95% interval '
                   r'\[[+-]\d\.\d{4}, [+-]\d\.\d{4}\]', text)
  assert re.search(r'baseline \d\.\d{4} ± \d\.\d{4}, SALT \d\.\d{4} ± \d\.\d{4}', text)


def test_the_paired_interval_is_student_s_t_on_the_differences():
  salt_final, baseline_final = np.array([4.60, 4.70, 4.65]), np.array([4.70, 4.72, 4.70])
  mean, low, high = demo.paired_difference(salt_final, baseline_final)
  d = salt_final - baseline_final
  assert mean == pytest.approx(d.mean())
  assert high - mean == pytest.approx(4.303 * d.std(ddof=1) / np.sqrt(3))  # t(0.975, 2 degrees of freedom)
  assert low == pytest.approx(2 * mean - high)


def test_first_reach_interpolates_between_evaluations():
  steps, loss = np.array([10.0, 20.0, 30.0]), np.array([5.0, 4.0, 3.0])
  assert demo.first_reach(steps, loss, 3.5) == 25.0
  assert demo.first_reach(steps, loss, 6.0) == 10.0
  assert demo.first_reach(steps, loss, 2.0) is None
