"""The launchers: `salt launch tpu` against a gcloud stand-in, `salt launch local` with plain commands."""

import json
import os
import sys

import pytest

from trainer import cli

# A stand-in for gcloud: records each call's arguments as a JSON line in $GCLOUD_LOG and
# answers from the state in $GCLOUD_STATE. describe prints the queued resource's state
# (the next of `states` after a create) or fails when there is none; an ssh that runs
# salt train exits with the next code of `train_exits` and, with `lose_slice`, leaves the
# resource SUSPENDED when that code is not 0.
GCLOUD = '''#!{python}
import json, os, sys
args = sys.argv[1:]
with open(os.environ['GCLOUD_LOG'], 'a') as f:
  f.write(json.dumps(args) + '\\n')
path = os.environ['GCLOUD_STATE']
with open(path) as f:
  state = json.load(f)
code = 0
if args[2:4] == ['queued-resources', 'create']:
  state['exists'], state['states'] = True, list(state['after_create'])
elif args[2:4] == ['queued-resources', 'describe']:
  if state['exists']:
    print(state['states'].pop(0) if len(state['states']) > 1 else state['states'][0])
  else:
    print('NOT_FOUND', file=sys.stderr)
    code = 1
elif args[2:4] == ['queued-resources', 'delete']:
  state['exists'] = False
elif args[2:4] == ['tpu-vm', 'ssh'] and 'salt train' in args[-1]:
  print('step 1/10 ...')
  code = state['train_exits'].pop(0)
  if code and state['lose_slice']:
    state['states'] = ['SUSPENDED']
with open(path, 'w') as f:
  json.dump(state, f)
sys.exit(code)
'''


@pytest.fixture
def gcloud(tmp_path, monkeypatch):
  """Puts the stand-in first on PATH; returns a function that sets its script and one that reads its calls."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (bin_dir / 'gcloud').write_text(GCLOUD.format(python=sys.executable))
  (bin_dir / 'gcloud').chmod(0o755)
  log, state = tmp_path / 'gcloud.log', tmp_path / 'gcloud.json'
  monkeypatch.setenv('PATH', f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')
  monkeypatch.setenv('GCLOUD_LOG', str(log))
  monkeypatch.setenv('GCLOUD_STATE', str(state))

  def script(after_create=('ACTIVE',), train_exits=(0,), lose_slice=False):
    state.write_text(json.dumps({'exists': False, 'states': [], 'after_create': list(after_create),
                                 'train_exits': list(train_exits), 'lose_slice': lose_slice}))

  def calls():
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

  return script, calls


@pytest.fixture(scope='module')
def config_file(tmp_path_factory):
  path = tmp_path_factory.mktemp('config') / 'tiny.py'
  path.write_text('from tests.conftest import tiny_config\n'
                  'def get_config(arg=None):\n'
                  '  return tiny_config()\n')
  return str(path)


def launch_tpu(config_file, *extra):
  # v5p-16: 8 devices, over which the tiny config's batch of 8 divides.
  return cli.main(['launch', 'tpu', '--project', 'proj', '--zone', 'us-east5-a', '--accelerator-type', 'v5p-16',
                   '--bucket', 'gs://bucket', '--name', 'run1', '--config', config_file, '--poll', '0',
                   '--backoff', '0', '--package', 'salt[tpu] @ git+https://example.com/salt@abc', *extra])


def steps(calls) -> list[str]:
  """Each gcloud call by what it does."""
  names = []
  for args in calls:
    if args[2] == 'queued-resources':
      names.append(args[3])
    elif args[3] == 'scp':
      names.append('copy')
    else:
      names.append('train' if 'salt train' in args[-1] else 'install')
  return names


def test_launch_creates_waits_installs_trains_on_all_workers_and_deletes(gcloud, config_file, capsys):
  script, calls = gcloud
  script(after_create=('WAITING_FOR_RESOURCES', 'PROVISIONING', 'ACTIVE'))
  assert launch_tpu(config_file, '--config.optim.lr=1e-3') == 0
  made = calls()
  assert steps(made) == ['describe', 'create', 'describe', 'describe', 'describe', 'copy', 'install', 'train',
                         'delete']
  where = ['--project=proj', '--zone=us-east5-a']
  assert made[1] == ['compute', 'tpus', 'queued-resources', 'create', 'run1', *where, '--accelerator-type=v5p-16',
                     '--runtime-version=v2-alpha-tpuv5', '--node-id=run1']
  assert made[2] == ['compute', 'tpus', 'queued-resources', 'describe', 'run1', *where, '--format=value(state.state)']
  assert made[5] == ['compute', 'tpus', 'tpu-vm', 'scp', config_file, 'run1:', *where, '--worker=all']
  install, train = made[6], made[7]
  assert install[:8] == ['compute', 'tpus', 'tpu-vm', 'ssh', 'run1', *where, '--worker=all']
  assert 'uv pip install' in install[-1] and '"salt[tpu] @ git+https://example.com/salt@abc" gcsfs' in install[-1]
  assert train[:8] == install[:8]
  assert train[-1] == ('--command=export SALT_DISTRIBUTED=auto; $HOME/salt-venv/bin/salt train --config '
                       '"$HOME/tiny.py" --workdir gs://bucket/run1 --config.optim.lr=1e-3')
  assert made[-1] == ['compute', 'tpus', 'queued-resources', 'delete', 'run1', *where, '--force', '--quiet']
  assert 'step 1/10 ...' in capsys.readouterr().out  # the workers' log, streamed


def test_preempted_training_starts_again_on_the_same_slice(gcloud, config_file):
  script, calls = gcloud
  script(train_exits=(75, 0))
  assert launch_tpu(config_file) == 0
  assert steps(calls()) == ['describe', 'create', 'describe', 'copy', 'install', 'train',
                            'describe', 'describe', 'train', 'delete']


def test_a_lost_slice_is_deleted_created_again_and_training_resumes(gcloud, config_file):
  script, calls = gcloud
  script(train_exits=(255, 0), lose_slice=True)
  assert launch_tpu(config_file) == 0
  made = calls()
  assert steps(made) == ['describe', 'create', 'describe', 'copy', 'install', 'train',
                         'describe', 'describe', 'delete', 'create', 'describe', 'copy', 'install', 'train',
                         'delete']
  trains = [args for args in made if 'salt train' in args[-1]]
  assert trains[0] == trains[1]  # the same command: salt train resumes from gs://bucket/run1 (--resume=auto)


def test_relaunches_stop_at_the_retry_limit_with_the_last_exit_code(gcloud, config_file):
  script, calls = gcloud
  script(train_exits=(75, 75, 75))
  assert launch_tpu(config_file, '--retries', '2') == 75
  made = steps(calls())
  assert made.count('train') == 3 and made[-1] == 'delete'


def test_bad_input_on_the_workers_is_not_relaunched(gcloud, config_file):
  script, calls = gcloud
  script(train_exits=(2,))
  assert launch_tpu(config_file) == 2
  assert steps(calls())[-2:] == ['train', 'delete']


def test_print_shows_every_command_and_runs_none(gcloud, config_file, capsys):
  script, calls = gcloud
  script()
  assert launch_tpu(config_file, '--slices', '2', '--config.data.global_batch_size=16', '--spot', '--print') == 0
  out = capsys.readouterr().out
  assert calls() == []
  commands = [line for line in out.splitlines() if line.startswith('gcloud ')]
  assert commands[0] == ('gcloud compute tpus queued-resources create run1 --project=proj --zone=us-east5-a '
                         '--accelerator-type=v5p-16 --runtime-version=v2-alpha-tpuv5 --node-count=2 '
                         '--node-prefix=run1 --spot')
  for node in ('run1-0', 'run1-1'):
    assert [c for c in commands if f'tpu-vm ssh {node} ' in c and 'salt train' in c]
  assert '--config.mesh.dcn_data=2' in out and 'queued-resources delete run1' in out


def test_a_config_that_does_not_fit_the_pod_fails_before_any_command(gcloud, config_file, capsys):
  script, calls = gcloud
  script()
  # v5p-128 has 64 devices; a batch of 8 does not divide over them.
  assert cli.main(['launch', 'tpu', '--project', 'p', '--zone', 'z', '--accelerator-type', 'v5p-128',
                   '--bucket', 'gs://b', '--name', 'n', '--config', config_file, '--package', 'salt']) == 2
  assert 'data.global_batch_size=8 does not divide' in capsys.readouterr().err
  assert calls() == []


def test_local_launch_prefixes_output_and_stops_all_when_one_fails(capsys):
  program = ('import os, sys, time\n'
             "i = int(os.environ['SALT_PROCESS_ID'])\n"
             "print(i, os.environ['SALT_NUM_PROCESSES'], os.environ['SALT_COORDINATOR'].startswith('localhost:'),"
             " os.environ['JAX_PLATFORMS'], os.environ['XLA_FLAGS'].split()[-1], flush=True)\n"
             'sys.exit(3) if i == 1 else time.sleep(60)\n')
  code = cli.main(['launch', 'local', '--processes', '2', '--devices-per-process', '4', '--',
                   sys.executable, '-c', program])
  captured = capsys.readouterr()
  assert code == 3
  assert '[p0] 0 2 True cpu --xla_force_host_platform_device_count=4' in captured.out
  assert '[p1] 1 2 True cpu --xla_force_host_platform_device_count=4' in captured.out
  assert 'process 1 exited with code 3; stopped the 1 still running' in captured.err
