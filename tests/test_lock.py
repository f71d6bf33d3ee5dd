"""One job per run directory (issue 16, defect 5): a second `salt train` on a directory in
use stops with one line naming the holder; a lock whose job is gone is taken over."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from tests.helpers import tiny_config
from tests.runs import logged, write_config
from trainer import lock, train
from trainer.errors import UserError


def hold(workdir, pid: int, host: str = socket.gethostname()):
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / 'lock').write_text(json.dumps({'host': host, 'pid': pid, 'since': '2026-11-26 12:00:00'}))


def quick_config(data_dir):
  config = tiny_config(data_dir)
  config.total_steps = 2
  config.optim.warmup_steps = 1
  config.eval.every_steps = 100
  return config


@pytest.mark.slow
def test_a_directory_held_by_a_live_job_is_refused_and_freed_when_it_is_gone(tiny_data, tmp_path):
  sleeper = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
  try:
    hold(tmp_path, sleeper.pid)
    with pytest.raises(UserError, match=rf'{tmp_path} is in use by process {sleeper.pid} on '
                                        rf'{socket.gethostname()} \(since 2026-11-26 12:00:00\); stop that job'):
      train.train(quick_config(tiny_data), tmp_path)
  finally:
    sleeper.kill()
    sleeper.wait()
  train.train(quick_config(tiny_data), tmp_path)  # its process is gone: the lock is taken over
  assert not (tmp_path / 'lock').exists()  # and released at the end


@pytest.mark.slow
def test_another_host_s_lock_is_stale_only_when_nobody_refreshes_it(tiny_data, tmp_path):
  hold(tmp_path, 1, host='some-other-host')
  with pytest.raises(UserError, match='is in use by process 1 on some-other-host'):
    train.train(quick_config(tiny_data), tmp_path)
  old = time.time() - lock.STALE_SECONDS - 1
  os.utime(tmp_path / 'lock', (old, old))
  train.train(quick_config(tiny_data), tmp_path)


@pytest.mark.slow
def test_a_second_salt_train_on_a_running_job_s_directory_exits_2_and_the_first_finishes(tiny_data, tmp_path):
  config = write_config(tmp_path / 'config.py', tiny_data, 12, every_steps=4)
  workdir = tmp_path / 'run'
  command = [sys.executable, '-m', 'trainer.cli', 'train', '--config', config, '--workdir', str(workdir)]
  first = subprocess.Popen(command, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not logged(workdir) and time.time() < deadline and first.poll() is None:
    time.sleep(0.05)
  second = subprocess.run(command, capture_output=True, text=True)
  assert first.wait() == 0
  assert second.returncode == 2
  assert f'is in use by process {first.pid} on {socket.gethostname()}' in second.stderr
  assert [r['step'] for r in logged(workdir)] == list(range(1, 13))
  assert not (workdir / 'lock').exists()
