"""`salt launch tpu`: train on a Cloud TPU pod through gcloud, and relaunch it after preemption.

    salt launch tpu --project P --zone Z --accelerator-type v5p-128 --bucket gs://B --name llm \\
        --config configs/paper.py:llm --config.data.path=/mnt/data [--slices 2] [--spot] [--print]

In order, each a command it prints first (--print prints them all and runs none):

1. a wheel of this checkout (`pip wheel`), unless --package names what to install;
2. `gcloud compute tpus queued-resources create` (one slice: --node-id NAME; several:
   --node-count and --node-prefix NAME, whose nodes are NAME-0, NAME-1, ...); a queued
   resource of that name that already exists is used as it is;
3. `queued-resources describe` every --poll seconds until it is ACTIVE;
4. `tpu-vm scp` of the wheel and the config file to the home of every worker;
5. `tpu-vm ssh --worker=all`: uv makes a Python 3.12 venv ~/salt-venv and installs salt
   with jax[tpu], gcsfs and google-cloud-storage (gs:// run directories); then --setup,
   if given (e.g. fetch the data);
6. `tpu-vm ssh --worker=all` on every slice at once: `salt train --config ~/FILE
   --workdir gs://BUCKET/NAME` (or --workdir) with SALT_DISTRIBUTED=auto; the logs
   stream here;
7. `queued-resources delete` once training is done (unless --keep).

When training stops early the queued resource's state says why. Not ACTIVE (SUSPENDED,
FAILED, ...): the slice is lost; delete it, create it again, set it up and start again.
Still ACTIVE: salt train was preempted (exit 75) or the connection failed; start it again
on the same slice. Exit code 2 is bad input: stop. Each restart waits --backoff x 2^(n-1)
seconds (an hour at most), at most --retries times, and resumes from the latest
checkpoint in the bucket (salt train's --resume=auto).
"""

import dataclasses
import importlib.metadata
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from trainer import config as config_lib
from trainer import distributed
from trainer.errors import PREEMPTED_EXIT_CODE, UserError

USER_ERROR_EXIT_CODE = 2
MAX_BACKOFF_SECONDS = 3600
# States of a queued resource whose slice is gone for good; others wait or are ACTIVE.
LOST = ('FAILED', 'SUSPENDING', 'SUSPENDED')
# The software image each TPU generation boots (gcloud's --runtime-version).
RUNTIME_VERSIONS = {'v4': 'tpu-ubuntu2204-base', 'v5p': 'v2-alpha-tpuv5', 'v5litepod': 'v2-alpha-tpuv5-lite',
                    'v6e': 'v2-alpha-tpuv6e'}
VENV = '$HOME/salt-venv'


def add_parser(subparsers) -> None:
  p = subparsers.add_parser(
      'tpu', help='train on a Cloud TPU pod (queued resource) and relaunch it after preemption',
      usage='salt launch tpu --project P --zone Z --accelerator-type TYPE (--bucket gs://B | --workdir DIR) '
            '--name NAME --config FILE[:ARG] [--config.KEY=VALUE ...] [--print]')
  p.add_argument('--project', required=True)
  p.add_argument('--zone', required=True)
  p.add_argument('--accelerator-type', required=True, help='one slice, e.g. v5p-128, v6e-256')
  p.add_argument('--slices', type=int, default=1, help='slices joined over DCN (sets mesh.dcn_data)')
  p.add_argument('--runtime-version', help='the TPU VM image (default: the one for the accelerator type)')
  p.add_argument('--bucket', help='gs://BUCKET; the run writes to gs://BUCKET/NAME')
  p.add_argument('--workdir', help='the run directory on the workers instead, e.g. a bucket mounted by --setup')
  p.add_argument('--name', required=True, help='the queued resource and the run directory in the bucket')
  p.add_argument('--config', required=True, help='a config file, optionally :ARG; it is copied to the workers')
  p.add_argument('--spot', action='store_true', help='Spot TPUs: cheaper, preemptible')
  p.add_argument('--package', help="what the workers install instead of a wheel of this checkout, as pip "
                 "takes it, e.g. 'salt[tpu] @ git+https://github.com/ORG/salt@COMMIT'")
  p.add_argument('--setup', help='a shell command run on every worker after the install (e.g. fetch the data)')
  p.add_argument('--retries', type=int, default=10, help='relaunches after preemption or failure (default 10)')
  p.add_argument('--backoff', type=float, default=60, help='seconds before the first relaunch, doubling after')
  p.add_argument('--poll', type=float, default=30, help='seconds between state checks while waiting')
  p.add_argument('--keep', action='store_true', help='keep the queued resource when training is done')
  p.add_argument('--print', action='store_true', help='print every command in order and run none')
  p.set_defaults(run=_main)


@dataclasses.dataclass(frozen=True)
class Pod:
  name: str
  project: str
  zone: str
  accelerator_type: str
  runtime_version: str
  slices: int
  spot: bool

  def nodes(self) -> list[str]:
    return [self.name] if self.slices == 1 else [f'{self.name}-{i}' for i in range(self.slices)]

  def _where(self) -> list[str]:
    return [f'--project={self.project}', f'--zone={self.zone}']

  def queued(self, verb: str, *flags: str) -> list[str]:
    return ['gcloud', 'compute', 'tpus', 'queued-resources', verb, self.name, *self._where(), *flags]

  def create(self) -> list[str]:
    nodes = [f'--node-id={self.name}'] if self.slices == 1 else [f'--node-count={self.slices}',
                                                                  f'--node-prefix={self.name}']
    return self.queued('create', f'--accelerator-type={self.accelerator_type}',
                       f'--runtime-version={self.runtime_version}', *nodes, *(['--spot'] if self.spot else []))

  def describe(self) -> list[str]:
    return self.queued('describe', '--format=value(state.state)')

  def delete(self) -> list[str]:
    return self.queued('delete', '--force', '--quiet')

  def scp(self, node: str, files: list[str]) -> list[str]:
    return ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', *files, f'{node}:', *self._where(), '--worker=all']

  def ssh(self, node: str, command: str) -> list[str]:
    return ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', node, *self._where(), '--worker=all',
            f'--command={command}']


@dataclasses.dataclass(frozen=True)
class Job:
  """What runs on the workers."""
  build: list[str] | None  # builds the wheel here; None with --package
  files: list[str]  # copied to every worker's home
  install: str
  train: str


def _main(args, overrides) -> int:
  generation = args.accelerator_type.partition('-')[0]
  runtime = args.runtime_version or RUNTIME_VERSIONS.get(generation)
  if not runtime:
    raise UserError(f'no default --runtime-version for {args.accelerator_type}; give one')
  if args.slices < 1 or args.retries < 0:
    raise UserError('--slices must be at least 1 and --retries at least 0')
  if not args.workdir and not (args.bucket or '').startswith('gs://'):
    raise UserError('give --bucket gs://BUCKET (the run writes to gs://BUCKET/NAME) or --workdir')
  workdir = args.workdir or f'{args.bucket.rstrip("/")}/{args.name}'
  overrides = slice_overrides(args.config, list(overrides), args.accelerator_type, args.slices)
  pod = Pod(args.name, args.project, args.zone, args.accelerator_type, runtime, args.slices, args.spot)
  job = make_job(args.config, overrides, workdir, args.package, args.setup, args.name)
  if args.print:
    print_plan(pod, job, args.poll)
    return 0
  return launch(pod, job, retries=args.retries, backoff=args.backoff, poll=args.poll, keep=args.keep)


def slice_overrides(config_spec: str, overrides: list[str], accelerator_type: str, slices: int) -> list[str]:
  """The overrides, with mesh.dcn_data for several slices; checks the config against the pod's devices."""
  config = config_lib.load(config_spec, overrides)
  if slices > 1 and config.mesh.dcn_data == 1:
    overrides.append(f'--config.mesh.dcn_data={slices}')
    config = config_lib.load(config_spec, overrides)
  if config.mesh.dcn_data != slices:
    raise UserError(f'mesh.dcn_data={config.mesh.dcn_data} but --slices {slices}: the data axis must span the slices')
  from trainer.dryrun import TPU_GENERATIONS

  generation, _, size = accelerator_type.partition('-')
  if generation in TPU_GENERATIONS and size.isdigit():
    devices = int(size) // TPU_GENERATIONS[generation][2] * slices
    config_lib.validate(config, devices)
  return overrides


def make_job(config_spec: str, overrides: list[str], workdir: str, package: str | None, setup: str | None,
             name: str) -> Job:
  config_file, colon, arg = config_spec.partition(':')
  remote_config = f'$HOME/{Path(config_file).name}{colon}{arg}'
  files, build = [config_file], None
  if package:
    requirement = package
  else:
    root = Path(__file__).resolve().parents[1]
    if not (root / 'pyproject.toml').is_file():
      raise UserError('salt is not installed from a source checkout here; give --package')
    wheel_dir = Path(tempfile.gettempdir()) / f'salt-launch-{name}'
    wheel = wheel_dir / f'salt-{importlib.metadata.version("salt")}-py3-none-any.whl'
    build = [sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--wheel-dir', str(wheel_dir), str(root)]
    files.append(str(wheel))
    requirement = f'$HOME/{wheel.name}[tpu]'
  # TPU VM images come with an older Python; uv brings 3.12 and installs quickly.
  install = ' && '.join([
      'set -e', 'export PATH=$HOME/.local/bin:$PATH',
      '(command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh)',
      f'uv venv --allow-existing --python 3.12 {VENV}',
      f'uv pip install --python {VENV}/bin/python --reinstall-package salt "{requirement}" gcsfs google-cloud-storage',
      *([setup] if setup else [])])
  train = ' '.join([f'export {distributed.MODE}=auto;', f'{VENV}/bin/salt', 'train', '--config',
                    f'"{remote_config}"', '--workdir', shlex.quote(workdir), *map(shlex.quote, overrides)])
  return Job(build=build, files=files, install=install, train=train)


def print_plan(pod: Pod, job: Job, poll: float) -> None:
  lines = []
  if job.build:
    lines += ['# build the wheel the workers install', shlex.join(job.build)]
  lines += ['# create the queued resource', shlex.join(pod.create()),
            f'# wait until it is ACTIVE (every {poll:g} s)', shlex.join(pod.describe()),
            '# copy, install and set up on every worker']
  for node in pod.nodes():
    lines += [shlex.join(pod.scp(node, job.files)), shlex.join(pod.ssh(node, job.install))]
  lines.append('# train on all workers of all slices at once')
  lines += [shlex.join(pod.ssh(node, job.train)) for node in pod.nodes()]
  lines += ['# after a failure: if the state is still ACTIVE, train again; otherwise delete, then create again',
            shlex.join(pod.describe()), shlex.join(pod.delete()),
            '# when training is done (unless --keep)', shlex.join(pod.delete())]
  print('\n'.join(lines))


def _say(message: str) -> None:
  print(f'salt launch tpu: {message}', file=sys.stderr, flush=True)


def _run(command: list[str]) -> int:
  _say(shlex.join(command))
  return subprocess.run(command).returncode


def _checked(command: list[str]) -> None:
  code = _run(command)
  if code:
    raise UserError(f'{command[0]} {" ".join(command[2:5])} failed with exit code {code}')


def state(pod: Pod) -> str | None:
  """The queued resource's state, or None when there is none."""
  done = subprocess.run(pod.describe(), capture_output=True, text=True)
  return (done.stdout.strip() or None) if done.returncode == 0 else None


def await_active(pod: Pod, poll: float) -> bool:
  """Creates the queued resource unless it exists (a lost one is deleted first) and waits until
  it is ACTIVE; False when it was lost while waiting."""
  now = state(pod)
  while now == 'DELETING':
    time.sleep(poll)
    now = state(pod)
  if now in LOST:
    _say(f'{pod.name} is {now}; deleting it')
    _run(pod.delete())
    now = None
  if now is None:
    _checked(pod.create())
  while now != 'ACTIVE':
    time.sleep(poll)
    now = state(pod)
    if now in LOST or now is None:
      _say(f'{pod.name} is {now or "gone"} while waiting for it')
      return False
  return True


def _stream(command: list[str], prefix: str, codes: list[int], index: int) -> None:
  _say(shlex.join(command))
  with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
    for line in process.stdout:
      sys.stdout.write(prefix + line)
      sys.stdout.flush()
  codes[index] = process.returncode


def run_everywhere(pod: Pod, command: str) -> int:
  """`command` on all workers of every slice at once, output streamed; the first failure's code, or 0."""
  nodes = pod.nodes()
  codes = [0] * len(nodes)
  threads = [threading.Thread(target=_stream, args=(pod.ssh(node, command), f'[{node}] ' if len(nodes) > 1 else '',
                                                    codes, i)) for i, node in enumerate(nodes)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  return next((code for code in codes if code), 0)


def set_up(pod: Pod, job: Job) -> int:
  for node in pod.nodes():
    code = _run(pod.scp(node, job.files))
    if code:
      return code
  return run_everywhere(pod, job.install)


def launch(pod: Pod, job: Job, *, retries: int, backoff: float, poll: float, keep: bool) -> int:
  """Creates, sets up, trains and relaunches until training is done; returns salt train's exit code."""
  if job.build:
    _checked(job.build)
  failures, fresh = 0, True
  while True:
    code = 1
    if await_active(pod, poll):
      code = set_up(pod, job) if fresh else 0
      if code == 0:
        code = run_everywhere(pod, job.train)
        if code in (0, USER_ERROR_EXIT_CODE):
          break
    now = state(pod)
    fresh = now != 'ACTIVE'
    why = (f'the slice is lost ({now or "gone"})' if fresh else
           'salt train was preempted' if code == PREEMPTED_EXIT_CODE else f'exit code {code}')
    failures += 1
    if failures > retries:
      _say(f'{why}; giving up after {retries} relaunches')
      break
    wait = min(backoff * 2 ** (failures - 1), MAX_BACKOFF_SECONDS)
    _say(f'{why}; relaunch {failures} of {retries} in {wait:g} s, resuming from the latest checkpoint')
    time.sleep(wait)
  if code == USER_ERROR_EXIT_CODE:
    _say('salt train exited 2 (bad input or a loss that is not finite; see above): not relaunching')
  if not keep:
    _run(pod.delete())
  return code
