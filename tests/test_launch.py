"""The launchers: `salt launch tpu` against a gcloud stand-in, `salt launch local` with plain commands."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from launch import tpu, worker
from trainer import cli
from trainer.errors import UserError

STANDIN = Path(__file__).with_name('gcloud_standin.py')


@pytest.fixture
def tmp_dir(tmp_path, monkeypatch):
  """The temporary directory the launcher stages its files in, this test's own."""
  path = tmp_path / 'tmp'
  path.mkdir()
  monkeypatch.setattr(tempfile, 'tempdir', str(path))
  return path


@pytest.fixture
def gcloud(tmp_path, tmp_dir, monkeypatch):
  """Puts the stand-in (tests/gcloud_standin.py) first on PATH; returns a function that
  scripts it and one that reads its calls."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (bin_dir / 'gcloud').write_text(f'#!/bin/sh\nexec {sys.executable} {STANDIN} "$@"\n')
  (bin_dir / 'gcloud').chmod(0o755)
  log, state = tmp_path / 'gcloud.log', tmp_path / 'gcloud.json'
  monkeypatch.setenv('PATH', f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')
  monkeypatch.setenv('GCLOUD_LOG', str(log))
  monkeypatch.setenv('GCLOUD_STATE', str(state))
  monkeypatch.setenv('GCLOUD_WORKERS', str(tmp_path / 'workers'))

  def script(runs=({'steps': 3},), after_create=('ACTIVE',), **more):
    state.write_text(json.dumps({'exists': False, 'states': [], 'after_create': list(after_create),
                                 'runs': list(runs), **more}))

  def calls():
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

  yield script, calls
  # Whatever a test left running on its workers.
  for script_file in (tmp_path / 'workers').glob('*/salt-*.sh'):
    subprocess.run(['bash', str(script_file), 'stop'], env={**os.environ, 'HOME': str(script_file.parent)},
                   capture_output=True)


@pytest.fixture(scope='module')
def config_file(tmp_path_factory):
  path = tmp_path_factory.mktemp('config') / 'tiny.py'
  path.write_text('from tests.helpers import tiny_config\n'
                  'def get_config(arg=None):\n'
                  '  return tiny_config()\n')
  return str(path)


def tpu_args(config_file, *extra):
  # v5p-16: 8 devices, over which the tiny config's batch of 8 divides.
  return ['launch', 'tpu', '--project', 'proj', '--zone', 'us-east5-a', '--accelerator-type', 'v5p-16',
          '--bucket', 'gs://bucket', '--name', 'run1', '--config', config_file, '--poll', '0',
          '--backoff', '0', '--package', 'salt-lm[tpu] @ git+https://example.com/salt@abc', *extra]


def launch_tpu(config_file, *extra):
  return cli.main(tpu_args(config_file, *extra))


def steps(calls) -> list[str]:
  """Each gcloud call by what it does."""
  names = []
  for args in calls:
    args = args[1:] if args[0] == 'alpha' else args
    if args[2] == 'queued-resources':
      names.append(args[3])
    elif args[3] in ('scp', 'describe'):
      names.append({'scp': 'copy', 'describe': 'health'}[args[3]])
    else:
      command = args[-1]
      names.append('install' if 'uv pip install' in command else 'devices' if 'device_count' in command else
                   command.split()[-2] if command.split()[-1].isdigit() else command.split()[-1])
  return names


def worker_log(tmp_path, node='run1'):
  return (tmp_path / 'workers' / node / 'salt-logs' / 'run1.log').read_text()


SET_UP = ['copy', 'install', 'health', 'devices']


def test_launch_creates_waits_installs_checks_trains_detached_follows_and_deletes(gcloud, config_file, capsys,
                                                                                 tmp_path):
  script, calls = gcloud
  script(after_create=('WAITING_FOR_RESOURCES', 'PROVISIONING', 'ACTIVE'))
  assert launch_tpu(config_file, '--config.optim.lr=1e-3', '--env', 'SALT_TEST_ENV=a b') == 0
  made = calls()
  assert steps(made) == ['describe', 'create', 'describe', 'describe', 'describe', *SET_UP, 'start', 'follow',
                         'delete']
  where = ['--project=proj', '--zone=us-east5-a']
  assert made[1] == ['compute', 'tpus', 'queued-resources', 'create', 'run1', *where, '--accelerator-type=v5p-16',
                     '--runtime-version=v2-alpha-tpuv5', '--node-id=run1']
  assert made[2] == ['compute', 'tpus', 'queued-resources', 'describe', 'run1', *where, '--format=json']
  assert made[5][:4] == ['compute', 'tpus', 'tpu-vm', 'scp'] and made[5][4] == config_file
  install = made[6]
  assert install[:8] == ['compute', 'tpus', 'tpu-vm', 'ssh', 'run1', *where, '--worker=all']
  assert 'uv pip install' in install[-1] and "'salt-lm[tpu] @ git+https://example.com/salt@abc' gcsfs" in install[-1]
  assert made[-2][-1] == '--command=bash ~/salt-run1.sh follow 20'
  assert made[-1] == ['compute', 'tpus', 'queued-resources', 'delete', 'run1', *where, '--force', '--quiet']
  out = capsys.readouterr().out
  # The workers' logs, streamed with a worker tag (the hostname where the metadata server is missing).
  assert re.search(r'^\[w\S+\] step 3/10$', out, re.M)
  assert re.search(r'^\[w\S+\] env a b auto$', out, re.M)  # --env and SALT_DISTRIBUTED reach salt train
  log = worker_log(tmp_path)  # each worker keeps its own log
  assert 'step 3/10' in log and 'salt launch tpu: run1 starts' in log
  worker_script = (tmp_path / 'workers' / 'run1' / 'salt-run1.sh').read_text()
  assert ("exec salt-venv/bin/salt train --config tiny.py --workdir gs://bucket/run1 --config.optim.lr=1e-3"
          in worker_script)


def test_a_failed_install_is_tried_again_at_the_next_relaunch(gcloud, config_file):
  """Issue 17, 1: a failed install on an ACTIVE slice was never retried: later relaunches
  ran salt train on workers with no environment until the retries ran out."""
  script, calls = gcloud
  script(install_exits=[1])
  assert launch_tpu(config_file) == 0
  assert steps(calls()) == ['describe', 'create', 'describe', 'copy', 'install', 'describe',
                            'describe', *SET_UP, 'start', 'follow', 'delete']


def test_a_failed_queued_resource_says_why_stops_and_is_deleted(gcloud, config_file, capsys):
  """Issue 17, 3: FAILED was recreated for hours of back-off and its reason never shown."""
  script, calls = gcloud
  script(after_create=('PROVISIONING', 'FAILED'), failed_reason='Quota exceeded for TPUV5P cores in us-east5')
  assert launch_tpu(config_file) == 2
  assert steps(calls()) == ['describe', 'create', 'describe', 'describe', 'delete']
  assert ('the queued resource run1 FAILED: Quota exceeded for TPUV5P cores in us-east5'
          in capsys.readouterr().err)


def test_transient_describe_errors_are_asked_again_and_lasting_ones_stop_with_the_resource_deleted(
    gcloud, config_file, capsys):
  """Issue 17, 4: any describe error read as "does not exist"; create then failed with
  ALREADY_EXISTS, the exception escaped and the final delete was skipped."""
  script, calls = gcloud
  script(describe_errors=2)
  assert launch_tpu(config_file) == 0
  assert steps(calls()).count('create') == 1
  script(exists=True, states=['ACTIVE'], describe_errors=100)
  assert launch_tpu(config_file) == 2
  assert 'gcloud cannot describe the queued resource run1 (5 tries): ERROR: ' in capsys.readouterr().err
  assert steps(calls())[-1] == 'delete'


def test_already_exists_on_create_waits_for_the_existing_resource(gcloud, config_file):
  script, calls = gcloud
  script(hidden=1)
  json_state = json.loads(open(os.environ['GCLOUD_STATE']).read())
  json_state.update(exists=True, states=['ACTIVE'])
  open(os.environ['GCLOUD_STATE'], 'w').write(json.dumps(json_state))
  assert launch_tpu(config_file) == 0
  assert steps(calls()) == ['describe', 'create', 'describe', *SET_UP, 'start', 'follow', 'delete']


def test_preempted_training_starts_again_on_the_same_slice(gcloud, config_file):
  script, calls = gcloud
  script(runs=[{'steps': 2, 'exit': 75}, {'steps': 3}])
  assert launch_tpu(config_file) == 0
  assert steps(calls()) == ['describe', 'create', 'describe', *SET_UP, 'start', 'follow',
                            'describe', 'describe', 'health', 'devices', 'start', 'follow', 'delete']


def test_a_dropped_connection_stops_the_old_training_before_the_relaunch(gcloud, config_file, tmp_path):
  """Issue 17, 5: a relaunch left the old salt train running, so the new one met the libtpu lock."""
  script, calls = gcloud
  script(runs=[{'steps': 2, 'hang': True}, {'steps': 3}], follow_drops=1)
  assert launch_tpu(config_file) == 0
  assert steps(calls())[-4:] == ['devices', 'start', 'follow', 'delete']
  log = worker_log(tmp_path)
  stopped = log.index('SIGTERM: saved a checkpoint')
  assert log.index('stopping the salt train still running here') < stopped < log.rindex('run1 starts')


def test_a_lost_slice_is_created_again_and_the_count_of_relaunches_restarts_after_progress(gcloud, config_file):
  """Issue 17, 7: the failure count never reset, so a long spot run gave up after --retries
  preemptions. Here each of three preemptions follows progress, and --retries is 1."""
  script, calls = gcloud
  script(runs=[{'steps': 2, 'exit': 1, 'preempt': True}, {'steps': 4, 'exit': 1, 'preempt': True},
               {'steps': 6, 'exit': 1, 'preempt': True}, {'steps': 8}])
  assert launch_tpu(config_file, '--retries', '1') == 0
  made = steps(calls())
  assert made.count('create') == 4 and made.count('install') == 4 and made[-1] == 'delete'


def test_a_slice_that_fails_its_pre_flight_is_replaced_and_giving_up_is_a_failure(gcloud, config_file, capsys):
  script, calls = gcloud
  script(preflight_exit=3)
  assert launch_tpu(config_file, '--retries', '1') == 1
  made = steps(calls())
  assert made.count('devices') == 2 and made.count('start') == 0 and made.count('create') == 2
  assert 'a worker does not see the 8 devices of the pod (see above); deleting the slice to get another' in (
      capsys.readouterr().err)


def test_relaunches_without_progress_stop_at_the_retry_limit(gcloud, config_file):
  script, calls = gcloud
  script(runs=[{'steps': 2, 'exit': 75}, {'steps': 2, 'exit': 75}, {'steps': 2, 'exit': 75}])
  assert launch_tpu(config_file, '--retries', '2') == 75
  made = steps(calls())
  assert made.count('start') == 3 and made[-1] == 'delete'


def test_bad_input_on_the_workers_is_not_relaunched(gcloud, config_file):
  script, calls = gcloud
  script(runs=[{'steps': 0, 'exit': 2}])
  assert launch_tpu(config_file) == 2
  assert steps(calls())[-3:] == ['start', 'follow', 'delete']


def test_ctrl_c_stops_training_and_deletes_the_queued_resource(gcloud, config_file, tmp_path):
  """Issue 17, 4: Ctrl-C skipped the final delete, and the slice kept billing."""
  script, calls = gcloud
  script(runs=[{'steps': 2, 'hang': True}])
  out = tmp_path / 'launcher.out'
  # Ctrl-C's handler set explicitly: a test run started in the background inherits SIGINT ignored.
  start = ('import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); '
           f'sys.argv = {["salt", *tpu_args(config_file)]!r}; runpy.run_module("trainer.cli", run_name="__main__")')
  with open(out, 'w') as stdout:
    launcher = subprocess.Popen([sys.executable, '-c', start], stdout=stdout, stderr=subprocess.STDOUT)
  deadline = time.time() + 120
  while 'step 2/10' not in out.read_text():
    assert launcher.poll() is None and time.time() < deadline, out.read_text()
    time.sleep(0.05)
  launcher.send_signal(signal.SIGINT)
  assert launcher.wait(timeout=120) == 130, out.read_text()
  assert 'SIGTERM: saved a checkpoint' in worker_log(tmp_path)
  assert steps(calls())[-2:] == ['stop', 'delete']
  assert not json.loads(open(os.environ['GCLOUD_STATE']).read())['exists']


def test_detach_starts_training_and_logs_follows_it(gcloud, config_file, capsys):
  script, calls = gcloud
  script(runs=[{'steps': 3}])
  assert launch_tpu(config_file, '--detach') == 0
  assert steps(calls())[-2:] == ['devices', 'start']  # kept: nothing deletes it
  assert 'follow it with: salt launch tpu --project proj --zone us-east5-a --name run1 --logs' in (
      capsys.readouterr().err)
  assert cli.main(['launch', 'tpu', '--project', 'proj', '--zone', 'us-east5-a', '--name', 'run1', '--logs']) == 0
  assert re.search(r'^\[w\S+\] step 3/10$', capsys.readouterr().out, re.M)


def test_print_shows_every_command_and_runs_none(gcloud, config_file, capsys):
  script, calls = gcloud
  script()
  assert launch_tpu(config_file, '--slices', '2', '--config.data.global_batch_size=16', '--spot', '--print',
                    '--config.mesh.data=1', '--config.mesh.fsdp=-1', '--internal-ips', '--tunnel-through-iap', '--labels=team=lm', '--reserved') == 0
  out = capsys.readouterr().out
  assert calls() == []
  commands = [line for line in out.splitlines() if line.startswith('gcloud ')]
  assert commands[0] == ('gcloud compute tpus queued-resources create run1 --project=proj --zone=us-east5-a '
                         '--accelerator-type=v5p-16 --runtime-version=v2-alpha-tpuv5 --node-count=2 '
                         '--node-prefix=run1 --internal-ips --reserved --labels=team=lm --spot')
  for node in ('run1-0', 'run1-1'):
    assert [c for c in commands if c.startswith(f'gcloud alpha compute tpus tpu-vm ssh {node} ')
            and c.endswith('--worker=all --tunnel-through-iap \'--command=bash ~/salt-run1.sh start\'')]
  worker_script = Path(staged(out, 'salt-run1.sh')).read_text()
  assert '--config.mesh.dcn_data=2 --config.mesh.data=2' in worker_script
  assert 'queued-resources delete run1' in out


def staged(plan: str, name: str) -> str:
  """Where the printed plan copies the file `name` from."""
  scp = next(shlex.split(line) for line in plan.splitlines() if ' tpu-vm scp ' in line)
  return next(path for path in scp if Path(path).name == name)


def test_files_for_the_workers_are_staged_in_a_fresh_private_directory_and_removed(gcloud, config_file, capsys,
                                                                                  tmp_dir, tmp_path):
  """Issue 23, 10: the worker script was written into the predictable /tmp/salt-launch-NAME, made
  with exist_ok: a directory planted there with a symlink in it had salt overwrite another
  file, and another user could swap the script the workers run."""
  script, calls = gcloud
  script()
  victim = tmp_path / 'victim'
  victim.write_text('mine')
  planted = tmp_dir / 'salt-launch-run1'
  planted.mkdir()
  (planted / 'salt-run1.sh').symlink_to(victim)
  assert launch_tpu(config_file, '--print') == 0
  assert victim.read_text() == 'mine'
  staging = Path(staged(capsys.readouterr().out, 'salt-run1.sh')).parent
  assert staging.parent == tmp_dir and staging != planted
  assert staging.stat().st_mode & 0o777 == 0o700
  # The printed commands copy from it, so --print keeps it; a launch removes what it staged.
  shutil.rmtree(staging)
  assert launch_tpu(config_file) == 0
  assert sorted(tmp_dir.iterdir()) == [planted] and victim.read_text() == 'mine'


@pytest.mark.parametrize('name, slices', [('x$(touch${IFS}P)', '1'), ('Run1', '1'), ('run-', '1'),
                                          ('r' * 64, '1'), ('r' * 62, '2')])
def test_a_name_cloud_tpu_refuses_is_refused_before_anything_runs(gcloud, config_file, capsys, tmp_path,
                                                                  monkeypatch, name, slices):
  """Issue 23, 11: --name went unquoted into the worker script and the ssh commands, so
  `x$(touch${IFS}P)` ran touch on the workers."""
  script, calls = gcloud
  script()
  monkeypatch.chdir(tmp_path)
  args = tpu_args(config_file, '--slices', slices, '--config.data.global_batch_size=16', '--print')
  args[args.index('--name') + 1] = name
  assert cli.main(args) == 2
  assert 'lowercase letters, digits and hyphens' in capsys.readouterr().err
  assert cli.main(['launch', 'tpu', '--project', 'p', '--zone', 'z', '--name', name, '--slices', slices,
                   '--logs']) == 2
  assert calls() == [] and not (tmp_path / 'P').exists()


def test_the_worker_script_runs_no_part_of_the_job_name(tmp_path):
  """Issue 23, 11: the name's own defence, whatever passes it the name."""
  hostile = f'x$(touch {tmp_path}/P)`touch {tmp_path}/Q`'
  path = tmp_path / 'worker.sh'
  path.write_text(worker.script(hostile, ['true'], {}))
  for verb in ('stop', 'follow'):
    subprocess.run(['bash', str(path), verb], env={**os.environ, 'HOME': str(tmp_path)}, capture_output=True)
  assert not (tmp_path / 'P').exists() and not (tmp_path / 'Q').exists()


def test_a_package_and_env_values_reach_the_workers_verbatim(gcloud, config_file, capsys, tmp_path):
  """Issue 23, 11: --package was only double-quoted in the install command, so `$(...)` in it
  ran on the workers. The install and the worker script run here for real, by bash."""
  script, calls = gcloud
  script()
  hostile = f'a\'b"c $(touch {tmp_path}/P) `touch {tmp_path}/Q` $HOME'
  package = f'salt-lm @ git+https://example.com/salt@abc#{hostile}'
  assert launch_tpu(config_file, '--package', package, '--env', f'SALT_TEST_ENV={hostile}') == 0
  uv = [json.loads(line) for line in (tmp_path / 'workers' / 'run1' / 'uv.log').read_text().splitlines()]
  assert [call for call in uv if call[:2] == ['pip', 'install']][0][-3:] == [package, 'gcsfs', 'google-cloud-storage']
  assert re.search(rf'^\[w\S+\] env {re.escape(hostile)} auto$', capsys.readouterr().out, re.M)
  assert not (tmp_path / 'P').exists() and not (tmp_path / 'Q').exists()


def test_the_wheel_of_this_checkout_is_installed_from_the_worker_s_home(gcloud, config_file, tmp_dir, tmp_path,
                                                                        monkeypatch):
  script, calls = gcloud
  script()
  monkeypatch.setattr(tpu, '_wheel_build', lambda out: (['true'], out / 'salt_lm-1-py3-none-any.whl'))
  job = tpu.make_job(config_file, [], 'gs://b/run1', None, None, 'run1', {}, 8, tmp_dir)
  subprocess.run(['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'run1', '--worker=all', f'--command={job.install}'],
                 check=True)
  home = tmp_path / 'workers' / 'run1'
  uv = [json.loads(line) for line in (home / 'uv.log').read_text().splitlines()]
  assert f'{home}/salt_lm-1-py3-none-any.whl[tpu]' in [call for call in uv if call[:2] == ['pip', 'install']][0]


def test_a_node_describe_that_fails_once_in_the_pre_flight_is_asked_again(gcloud, config_file):
  """Issue 27: an empty describe of a node (a transient API error) ended the launch with a
  JSONDecodeError traceback, after deleting the queued resource."""
  script, calls = gcloud
  script(node_describe_errors=1, silent_errors=True)
  assert launch_tpu(config_file) == 0
  assert steps(calls()) == ['describe', 'create', 'describe', 'copy', 'install', 'health', 'health', 'devices',
                            'start', 'follow', 'delete']


@pytest.mark.parametrize('keep', [False, True])
def test_a_node_that_cannot_be_described_stops_with_one_line(gcloud, config_file, capsys, keep):
  script, calls = gcloud
  script(node_describe_errors=100)
  assert launch_tpu(config_file, *(['--keep'] if keep else [])) == 2
  assert 'salt: error: gcloud cannot describe node run1 (5 tries): ERROR: ' in capsys.readouterr().err
  made = steps(calls())
  assert made.count('health') == 5 and made.count('create') == 1 and (made[-1] == 'delete') != keep


def test_an_empty_describe_of_the_queued_resource_is_asked_again(gcloud, config_file, capsys):
  """Issue 27: the same JSONDecodeError where the queued resource's state is read."""
  script, calls = gcloud
  script(describe_errors=1, silent_errors=True)
  assert launch_tpu(config_file) == 0
  assert steps(calls()).count('create') == 1
  script(exists=True, states=['ACTIVE'], describe_errors=100, silent_errors=True)
  assert launch_tpu(config_file) == 2
  assert 'gcloud cannot describe the queued resource run1 (5 tries): its output is not JSON' in (
      capsys.readouterr().err)
  assert steps(calls())[-1] == 'delete'


README_LAUNCH = re.compile(r'^salt launch tpu .*?(?<!\\)$', re.M | re.S)


def test_the_readme_s_launch_examples_pass_config_validation(gcloud, capsys, monkeypatch):
  """Issue 17, 2: the README's --slices 2 example failed validation (dcn_data=2 did not
  divide a data axis of 1)."""
  script, calls = gcloud
  script()
  examples = [' '.join(e.replace('\\\n', ' ').split()) for e in README_LAUNCH.findall(
      (Path(__file__).parents[1] / 'README.md').read_text())]
  first = examples[0]
  assert len(examples) >= 3 and any('--slices 2' in e for e in examples)
  monkeypatch.chdir(Path(__file__).parents[1])
  for example in examples:
    example = example.split('#')[0].replace(' ... ', ' ' + first[len('salt launch tpu '):] + ' ')
    args = shlex.split(example)[1:]
    if '--print' not in args:
      args.append('--print')
    assert cli.main(args) == 0, (example, capsys.readouterr().err)
  assert calls() == []


def test_v5e_names_the_accelerator_type_gcloud_knows(config_file, capsys):
  assert cli.main(['launch', 'tpu', '--project', 'p', '--zone', 'z', '--accelerator-type', 'v5e-256',
                   '--bucket', 'gs://b', '--name', 'n', '--config', config_file, '--print']) == 2
  assert 'gcloud calls v5e "v5litepod": use v5litepod-256' in capsys.readouterr().err


def test_the_wheel_is_built_with_uv_where_pip_is_missing(monkeypatch, tmp_path):
  """Issue 17, 8: `python -m pip wheel` failed in a uv-made environment."""
  monkeypatch.setattr(tpu.shutil, 'which', lambda name: '/usr/bin/uv' if name == 'uv' else None)
  build, wheel = tpu._wheel_build(tmp_path)
  assert build[:3] == ['uv', 'build', '--wheel'] and wheel.parent == tmp_path
  monkeypatch.setattr(tpu.shutil, 'which', lambda name: None)
  monkeypatch.setattr(tpu.importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(UserError, match='building a wheel needs uv or pip'):
    tpu._wheel_build(tmp_path)


@pytest.mark.skipif(not shutil.which('gcloud', path=os.environ['PATH']), reason='gcloud is not installed')
def test_every_printed_command_passes_gcloud_s_own_argument_parser(config_file, capsys, tmp_path, tmp_dir,
                                                                   monkeypatch):
  """Real gcloud, no credentials: each command must fail at the login, not at its arguments."""
  gcloud = shutil.which('gcloud')
  assert cli.main(tpu_args(config_file, '--slices', '2', '--config.data.global_batch_size=16', '--spot',
                           '--internal-ips', '--tunnel-through-iap', '--network=net', '--subnetwork=sub',
                           '--service-account=sa@proj.iam.gserviceaccount.com', '--labels=team=lm',
                           '--valid-until-duration=2d', '--print')) == 0
  commands = {}
  for line in capsys.readouterr().out.splitlines():
    if line.startswith('gcloud '):
      args = shlex.split(line)
      commands.setdefault(tuple(a for a in args[:6] if not a.startswith('-')), args)  # one of each kind
  monkeypatch.setenv('CLOUDSDK_CONFIG', str(tmp_path / 'gcloud-config'))
  for args in commands.values():
    done = subprocess.run([gcloud, *args[1:]], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and 'gcloud auth login' in done.stderr, (args, done.stderr)


def test_xpk_prints_a_workload_of_salt_train_from_the_image(capsys, monkeypatch, config_file):
  monkeypatch.chdir(Path(__file__).parents[1])
  assert cli.main(['launch', 'xpk', '--cluster', 'tpus', '--project', 'proj', '--zone', 'us-east5-a',
                   '--tpu-type', 'v5p-256', '--slices', '2', '--image', 'us-docker.pkg.dev/proj/r/salt:1',
                   '--name', 'llm', '--bucket', 'gs://b', '--config', 'configs/paper.py:llm',
                   '--env', 'LIBTPU_INIT_ARGS=--xla_tpu_enable_async_all_gather=true', '--print']) == 0
  command = shlex.split(capsys.readouterr().out.strip())
  assert command[:3] == ['xpk', 'workload', 'create']
  assert {'--cluster=tpus', '--workload=llm', '--tpu-type=v5p-256', '--num-slices=2', '--project=proj',
          '--docker-image=us-docker.pkg.dev/proj/r/salt:1', '--max-restarts=10',
          '--env=LIBTPU_INIT_ARGS=--xla_tpu_enable_async_all_gather=true'} <= set(command)
  assert command[-1] == ('--command=salt train --config /salt/configs/paper.py:llm --workdir gs://b/llm '
                         '--config.mesh.dcn_data=2 --config.mesh.data=2')
  # A config the image does not hold is refused before anything runs.
  assert cli.main(['launch', 'xpk', '--cluster', 'tpus', '--project', 'p', '--zone', 'z', '--tpu-type', 'v5p-16',
                   '--image', 'i', '--name', 'n', '--bucket', 'gs://b', '--config', config_file, '--print']) == 2
  assert 'is not in this checkout, so not in the image' in capsys.readouterr().err


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
