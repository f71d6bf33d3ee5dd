"""`salt launch tpu`: train on a Cloud TPU pod through gcloud, and relaunch it after preemption.

    salt launch tpu --project P --zone Z --accelerator-type v5p-128 --bucket gs://B --name llm \\
        --config configs/paper.py:llm --config.data.path=/mnt/data [--slices 2] [--spot] [--print]
    salt launch tpu --project P --zone Z --name llm --logs        # follow a detached job

In order, each a command it prints first (--print prints them all and runs none):

1. a wheel of this checkout (`uv build`, or `pip wheel` where uv is missing), unless
   --package names what to install;
2. `gcloud compute tpus queued-resources create` (one slice: --node-id NAME; several:
   --node-count and --node-prefix NAME, whose nodes are NAME-0, NAME-1, ...); one that
   already exists is used as it is;
3. `queued-resources describe` every --poll seconds until it is ACTIVE;
4. `tpu-vm scp` of the wheel, the config file and the worker script (launch/worker.py)
   to the home of every worker, then `tpu-vm ssh --worker=all`: uv makes a Python 3.12
   venv ~/salt-venv and installs salt with jax[tpu] and gcsfs; then --setup, if given.
   The script and the wheel are staged in a fresh private temporary directory, removed
   at the end (--print keeps it: its commands copy from it);
5. the pre-flight check: every node READY and not unhealthy (`tpu-vm describe`), and
   every worker of every slice sees the pod's devices (`jax.device_count()`);
6. on every slice at once, the worker script's `start` (training in its own session, so
   it outlives this terminal) and `follow` (each worker's log, tagged, streamed here);
7. `queued-resources delete` once training is done, on Ctrl-C and on any error (unless
   --keep or --detach).

When training stops early, the queued resource's state says what to do. FAILED: the
reason is printed and the launcher stops. SUSPENDED or gone: the slice was preempted;
it is created again, set up again and training resumes. Still ACTIVE: salt train was
preempted (exit 75), died, or the connection dropped; it is started again (the worker
script first stops what still runs, letting it save). A failed set-up is tried again
at the next relaunch. Exit code 2 is bad input: stop. Relaunch n waits
--backoff x 2^(n-1) seconds (an hour at most), at most --retries in a row: the count
starts again once a relaunch trains past the furthest step seen before. Training
resumes from the latest checkpoint (salt train's --resume=auto). A describe (of the
queued resource or of a node) that fails or prints no JSON is asked again, five times
in all, then stops the launcher (exit 2).
"""

import dataclasses
import importlib.metadata
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from launch import worker
from trainer import DISTRIBUTION, hardware
from trainer import config as config_lib
from trainer import distributed
from trainer.errors import PREEMPTED_EXIT_CODE, UserError

USER_ERROR_EXIT_CODE = 2
INTERRUPTED_EXIT_CODE = 130
SSH_FAILED_EXIT_CODE = 255
MAX_BACKOFF_SECONDS = 3600
DESCRIBE_TRIES = 5
# A queued resource in one of these states has lost its slice (Spot preemption,
# maintenance); it can be created again. FAILED cannot: its request was refused.
LOST = ('SUSPENDING', 'SUSPENDED')
VENV = 'salt-venv'
# Cloud TPU names nodes as Compute Engine names instances (RFC 1035). The name also goes
# into file names and commands on the workers, so nothing else is let through.
NAME = re.compile(r'[a-z]([-a-z0-9]{0,61}[a-z0-9])?')
STEP = re.compile(r'\bstep (\d+)/\d+')
# `queued-resources create` options passed through as they are: flags, then valued.
CREATE_FLAGS = ('internal_ips', 'reserved')
CREATE_VALUES = ('network', 'subnetwork', 'service_account', 'labels', 'valid_until_duration')


def add_parser(subparsers) -> None:
  p = subparsers.add_parser(
      'tpu', help='train on a Cloud TPU pod (queued resource) and relaunch it after preemption',
      usage='salt launch tpu --project P --zone Z --accelerator-type TYPE (--bucket gs://B | --workdir DIR) '
            '--name NAME --config FILE[:ARG] [--config.KEY=VALUE ...] [--print | --detach]\n'
            '       salt launch tpu --project P --zone Z --name NAME [--slices N] --logs')
  p.add_argument('--project', required=True)
  p.add_argument('--zone', required=True)
  p.add_argument('--name', required=True, help='the queued resource and the run directory in the bucket')
  p.add_argument('--accelerator-type', help='one slice, e.g. v5p-128, v6e-256, v5litepod-256')
  p.add_argument('--slices', type=int, default=1, help='slices joined over DCN (sets mesh.dcn_data and mesh.data)')
  p.add_argument('--runtime-version', help='the TPU VM image (default: the one for the accelerator type)')
  p.add_argument('--bucket', help='gs://BUCKET; the run writes to gs://BUCKET/NAME')
  p.add_argument('--workdir', help='the run directory on the workers instead, e.g. a bucket mounted by --setup')
  p.add_argument('--config', help='a config file, optionally :ARG; it is copied to the workers')
  p.add_argument('--env', action='append', default=[], metavar='KEY=VALUE',
                 help='set in salt train\'s environment on every worker (LIBTPU_INIT_ARGS, XLA_FLAGS, tokens)')
  p.add_argument('--spot', action='store_true', help='Spot TPUs: cheaper, preemptible')
  p.add_argument('--package', help="what the workers install instead of a wheel of this checkout, as pip "
                 "takes it, e.g. 'salt-lm[tpu] @ git+https://github.com/ORG/salt@COMMIT'")
  p.add_argument('--setup', help='a shell command run on every worker after the install (e.g. fetch the data)')
  p.add_argument('--retries', type=int, default=10, help='relaunches in a row without progress (default 10)')
  p.add_argument('--backoff', type=float, default=60, help='seconds before the first relaunch, doubling after')
  p.add_argument('--poll', type=float, default=30, help='seconds between state checks while waiting')
  p.add_argument('--keep', action='store_true', help='keep the queued resource when training is done')
  p.add_argument('--detach', action='store_true', help='start training and return; follow it with --logs, '
                 'delete the queued resource yourself (no relaunch after preemption)')
  p.add_argument('--logs', action='store_true', help='follow the workers\' logs of the job --name until it ends')
  p.add_argument('--print', action='store_true', help='print every command in order and run none')
  g = p.add_argument_group('passed to gcloud (queued-resources create; --internal-ips and --tunnel-through-iap '
                           'also to ssh and scp)')
  g.add_argument('--internal-ips', action='store_true', help='nodes without external IPs; ssh over internal IPs')
  g.add_argument('--tunnel-through-iap', action='store_true', help='ssh and scp through IAP (gcloud alpha)')
  g.add_argument('--reserved', action='store_true', help='use reserved capacity')
  for value in CREATE_VALUES:
    g.add_argument('--' + value.replace('_', '-'))
  p.set_defaults(run=_main)


@dataclasses.dataclass(frozen=True)
class Pod:
  name: str
  project: str
  zone: str
  slices: int
  accelerator_type: str = ''
  runtime_version: str = ''
  create_options: tuple[str, ...] = ()
  internal_ip: bool = False
  iap: bool = False

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
                       f'--runtime-version={self.runtime_version}', *nodes, *self.create_options)

  def describe(self) -> list[str]:
    return self.queued('describe', '--format=json')

  def delete(self) -> list[str]:
    return self.queued('delete', '--force', '--quiet')

  def describe_node(self, node: str) -> list[str]:
    return ['gcloud', 'compute', 'tpus', 'tpu-vm', 'describe', node, *self._where(), '--format=json']

  def _vm(self, verb: str) -> list[str]:
    # IAP tunnelling is an alpha flag of tpu-vm ssh and scp in gcloud 528.
    return ['gcloud', *(['alpha'] if self.iap else []), 'compute', 'tpus', 'tpu-vm', verb]

  def _connect(self) -> list[str]:
    # gcloud takes one of the two: through IAP, or to the internal address from inside the network.
    return [*self._where(), '--worker=all',
            *(['--tunnel-through-iap'] if self.iap else ['--internal-ip'] if self.internal_ip else [])]

  def scp(self, node: str, files: list[str]) -> list[str]:
    return [*self._vm('scp'), *files, f'{node}:', *self._connect()]

  def ssh(self, node: str, command: str) -> list[str]:
    return [*self._vm('ssh'), node, *self._connect(), f'--command={command}']


@dataclasses.dataclass(frozen=True)
class Job:
  """What runs on the workers."""
  build: list[str] | None  # builds the wheel here; None with --package
  files: list[str]  # copied to every worker's home
  install: str
  script: str  # the worker script's file name in the home directory
  devices: int  # jax.device_count() every worker must see; 0: unknown

  def worker(self, verb: str) -> str:
    return f'bash ~/{shlex.quote(self.script)} {verb}'

  def preflight(self) -> str:
    check = ('import sys, jax; from trainer import distributed; distributed.initialize(); n = jax.device_count(); '
             f'sys.exit(0 if n == {self.devices} else f"worker {{jax.process_index()}} sees {{n}} devices of '
             f'{self.devices}")')
    return f'{distributed.MODE}=auto ~/{VENV}/bin/python -c {shlex.quote(check)}'


def _main(args, overrides) -> int:
  if args.slices < 1 or args.retries < 0:
    raise UserError('--slices must be at least 1 and --retries at least 0')
  check_name(args.name, args.slices)
  pod_options = dict(internal_ip=args.internal_ips, iap=args.tunnel_through_iap)
  if args.logs:
    pod = Pod(args.name, args.project, args.zone, args.slices, **pod_options)
    job = Job(build=None, files=[], install='', script=f'salt-{args.name}.sh', devices=0)
    if args.print:
      print('\n'.join(shlex.join(pod.ssh(node, job.worker('follow 100'))) for node in pod.nodes()))
      return 0
    try:
      return follow(pod, job, lines=100)
    except KeyboardInterrupt:
      _say('stopped following; training goes on')
      return INTERRUPTED_EXIT_CODE
  for required in ('accelerator_type', 'config'):
    if not getattr(args, required):
      raise UserError(f'--{required.replace("_", "-")} is required (except with --logs)')
  generation = check_accelerator_type(args.accelerator_type)
  known = hardware.TPU_GENERATIONS.get(generation)
  runtime = args.runtime_version or (known.runtime_version if known else None)
  if not runtime:
    raise UserError(f'no default --runtime-version for {args.accelerator_type} (known: '
                    f'{", ".join(hardware.TPU_GENERATIONS)}); give one')
  if not args.workdir and not (args.bucket or '').startswith('gs://'):
    raise UserError('give --bucket gs://BUCKET (the run writes to gs://BUCKET/NAME) or --workdir')
  env = dict(key_value(e) for e in args.env)
  workdir = args.workdir or f'{args.bucket.rstrip("/")}/{args.name}'
  overrides, devices = slice_overrides(args.config, list(overrides), args.accelerator_type, args.slices)
  create_options = [f'--{o.replace("_", "-")}' for o in CREATE_FLAGS if getattr(args, o)]
  create_options += [f'--{o.replace("_", "-")}={getattr(args, o)}' for o in CREATE_VALUES if getattr(args, o)]
  pod = Pod(args.name, args.project, args.zone, args.slices, args.accelerator_type, runtime,
            tuple(create_options + (['--spot'] if args.spot else [])), **pod_options)
  # Fresh and private (0700): a directory of a known name could be planted, or its files swapped.
  staging = Path(tempfile.mkdtemp(prefix=f'salt-launch-{args.name}-'))
  kept = False
  try:
    job = make_job(args.config, overrides, workdir, args.package, args.setup, args.name, env, devices, staging)
    if args.print:
      print_plan(pod, job, args.poll, staging)
      kept = True  # the printed commands copy the files staged there
      return 0
    return launch(pod, job, retries=args.retries, backoff=args.backoff, poll=args.poll,
                  keep=args.keep or args.detach, detach=args.detach)
  finally:
    if not kept:
      shutil.rmtree(staging)


def check_accelerator_type(accelerator_type: str) -> str:
  """The generation of a type gcloud knows; names it does not are an error saying what to write."""
  generation, _, size = accelerator_type.partition('-')
  if generation in hardware.GCLOUD_NAMES:
    name = hardware.GCLOUD_NAMES[generation]
    raise UserError(f'gcloud calls {generation} "{name}": use {name}-{size}')
  return generation


def check_name(name: str, slices: int) -> None:
  """Refuses a name Cloud TPU would refuse, for the queued resource or any of its nodes."""
  longest = name if slices == 1 else f'{name}-{slices - 1}'
  if not NAME.fullmatch(name) or not NAME.fullmatch(longest):
    raise UserError(f'--name {name!r}: Cloud TPU takes lowercase letters, digits and hyphens, starting with a '
                    f'letter, not ending with a hyphen, at most 63 characters'
                    + (f' with the slice suffix (as in {longest})' if slices > 1 else ''))


def key_value(text: str) -> tuple[str, str]:
  key, equals, value = text.partition('=')
  if not equals or not worker.ENV_NAME.fullmatch(key):
    raise UserError(f'--env {text!r}: write KEY=VALUE, KEY a shell variable name')
  return key, value


def slice_overrides(config_spec: str, overrides: list[str], accelerator_type: str,
                    slices: int) -> tuple[list[str], int]:
  """The overrides, with mesh.dcn_data and a data axis spanning the slices; checks the config
  against the pod's devices. Returns the overrides and the pod's device count (0: unknown)."""
  config = config_lib.load(config_spec, overrides)
  if slices > 1:
    if config.mesh.dcn_data == 1:
      overrides.append(f'--config.mesh.dcn_data={slices}')
    # Each slice holds a part of the data axis: a config with data=1 (all FSDP) gets one per slice.
    if config.mesh.data == 1:
      overrides.append(f'--config.mesh.data={slices}')
    config = config_lib.load(config_spec, overrides)
  if config.mesh.dcn_data != slices:
    raise UserError(f'mesh.dcn_data={config.mesh.dcn_data} but --slices {slices}: the data axis must span the slices')
  per_slice = hardware.tpu_devices(accelerator_type)
  if per_slice is None:
    return overrides, 0
  devices = per_slice * slices
  config_lib.validate(config, devices)
  return overrides, devices


def make_job(config_spec: str, overrides: list[str], workdir: str, package: str | None, setup: str | None,
             name: str, env: dict[str, str], devices: int, staging: Path) -> Job:
  """The job; the files the workers get are written into `staging`."""
  config_file, colon, arg = config_spec.partition(':')
  if not Path(config_file).is_file():
    raise UserError(f'config file {config_file!r} does not exist')
  script = f'salt-{name}.sh'
  train = [f'{VENV}/bin/salt', 'train', '--config', f'{Path(config_file).name}{colon}{arg}', '--workdir', workdir,
           *overrides]
  (staging / script).write_text(worker.script(name, train, {distributed.MODE: 'auto', **env}))
  files, build = [config_file, str(staging / script)], None
  if package:
    requirement = shlex.quote(package)
  else:
    build, wheel = _wheel_build(staging / 'wheel')
    files.append(str(wheel))
    requirement = '"$HOME"/' + shlex.quote(f'{wheel.name}[tpu]')
  # TPU VM images come with an older Python; uv brings 3.12 and installs quickly.
  install = ' && '.join([
      'set -e', 'export PATH=$HOME/.local/bin:$PATH',
      '(command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh)',
      f'uv venv --allow-existing --python 3.12 $HOME/{VENV}',
      f'uv pip install --python $HOME/{VENV}/bin/python --reinstall-package {DISTRIBUTION} {requirement} gcsfs '
      'google-cloud-storage',
      *([setup] if setup else [])])
  return Job(build=build, files=files, install=install, script=script, devices=devices)


def _wheel_build(out: Path) -> tuple[list[str], Path]:
  """The command that builds a wheel of this checkout into `out`, and the wheel's path."""
  root = Path(__file__).resolve().parents[1]
  if not (root / 'pyproject.toml').is_file():
    raise UserError('salt is not installed from a source checkout here; give --package')
  # A wheel's file name spells the distribution with underscores.
  wheel = out / f'{DISTRIBUTION.replace("-", "_")}-{importlib.metadata.version(DISTRIBUTION)}-py3-none-any.whl'
  if shutil.which('uv'):
    return ['uv', 'build', '--wheel', '--out-dir', str(out), str(root)], wheel
  if importlib.util.find_spec('pip'):
    return [sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--wheel-dir', str(out), str(root)], wheel
  raise UserError('building a wheel needs uv or pip, and this environment has neither; install uv, or give --package')


def print_plan(pod: Pod, job: Job, poll: float, staging: Path) -> None:
  lines = [f'# the files the workers get are staged in {staging}; delete it when done']
  if job.build:
    lines += ['# build the wheel the workers install', shlex.join(job.build)]
  lines += ['# create the queued resource', shlex.join(pod.create()),
            f'# wait until it is ACTIVE (every {poll:g} s)', shlex.join(pod.describe()),
            '# copy, install and set up on every worker']
  for node in pod.nodes():
    lines += [shlex.join(pod.scp(node, job.files)), shlex.join(pod.ssh(node, job.install))]
  lines.append('# pre-flight: every node healthy, every worker sees the pod\'s devices')
  lines += [shlex.join(pod.describe_node(node)) for node in pod.nodes()]
  lines += [shlex.join(pod.ssh(node, job.preflight())) for node in pod.nodes()]
  lines.append('# start training on all workers of all slices, then follow their logs')
  lines += [shlex.join(pod.ssh(node, job.worker(verb))) for verb in ('start', 'follow') for node in pod.nodes()]
  lines += ['# after a failure: FAILED stops; ACTIVE starts again; otherwise delete, then create again',
            shlex.join(pod.describe()), shlex.join(pod.delete()),
            '# when training is done, on Ctrl-C or on an error: stop training, delete (unless --keep)',
            *[shlex.join(pod.ssh(node, job.worker('stop'))) for node in pod.nodes()], shlex.join(pod.delete())]
  print('\n'.join(lines))


def _say(message: str) -> None:
  print(f'salt launch tpu: {message}', file=sys.stderr, flush=True)


def _run(command: list[str]) -> subprocess.CompletedProcess:
  """Runs a gcloud command, its output captured and its errors shown."""
  _say(shlex.join(command))
  done = subprocess.run(command, capture_output=True, text=True)
  if done.returncode:
    sys.stderr.write(done.stderr)
  return done


def _checked(command: list[str]) -> None:
  done = _run(command)
  if done.returncode:
    raise UserError(f'{shlex.join(command[:5])} failed with exit code {done.returncode}')


@dataclasses.dataclass(frozen=True)
class State:
  state: str | None  # None: there is no such queued resource
  reason: str = ''  # why it FAILED


def _json_object(text: str) -> dict | None:
  try:
    parsed = json.loads(text)
  except json.JSONDecodeError:
    return None
  return parsed if isinstance(parsed, dict) else None


def read_description(command: list[str], what: str, poll: float) -> dict | None:
  """What a gcloud describe command prints; None where it says NOT_FOUND. Any other error (an
  expired login, the network, a server error, output that is not JSON) is asked again, then raised."""
  for attempt in range(DESCRIBE_TRIES):
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode == 0 and (described := _json_object(done.stdout)) is not None:
      return described
    if done.returncode and 'NOT_FOUND' in done.stderr:
      return None
    if attempt < DESCRIBE_TRIES - 1:
      time.sleep(poll)
  last = ('its output is not JSON' if done.returncode == 0 else
          done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f'exit code {done.returncode}')
  raise UserError(f'gcloud cannot describe {what} ({DESCRIBE_TRIES} tries): {last}')


def state(pod: Pod, poll: float) -> State:
  """The queued resource's state."""
  described = read_description(pod.describe(), f'the queued resource {pod.name}', poll)
  if described is None:
    return State(None)
  now = described.get('state', {})
  error = now.get('failedData', {}).get('error', {})
  return State(now.get('state'), error.get('message', ''))


def _failed(pod: Pod, now: State) -> UserError:
  return UserError(f'the queued resource {pod.name} FAILED: {now.reason or "gcloud gives no reason"}')


def await_active(pod: Pod, poll: float) -> bool:
  """Creates the queued resource unless it exists (a suspended one is deleted first) and
  waits until it is ACTIVE; False when the slice was lost while waiting."""
  now = state(pod, poll)
  while now.state == 'DELETING':
    time.sleep(poll)
    now = state(pod, poll)
  if now.state == 'FAILED':
    raise _failed(pod, now)
  if now.state in LOST:
    _say(f'{pod.name} is {now.state}; deleting it')
    _run(pod.delete())
    now = State(None)
  if now.state is None:
    done = _run(pod.create())
    if done.returncode and 'ALREADY_EXISTS' not in done.stderr:
      raise UserError(f'gcloud cannot create the queued resource {pod.name} (exit code {done.returncode})')
  while now.state != 'ACTIVE':
    time.sleep(poll)
    now = state(pod, poll)
    if now.state == 'FAILED':
      raise _failed(pod, now)
    if now.state in LOST or now.state is None:
      _say(f'{pod.name} is {now.state or "gone"} while waiting for it')
      return False
  return True


def _stream(command: list[str], prefix: str, codes: list[int], index: int, steps: list[int]) -> None:
  _say(shlex.join(command))
  with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
    for line in process.stdout:
      sys.stdout.write(prefix + line)
      sys.stdout.flush()
      if reached := STEP.search(line):
        steps[0] = max(steps[0], int(reached.group(1)))
  codes[index] = process.returncode


def run_everywhere(pod: Pod, command: str, steps: list[int] | None = None) -> int:
  """`command` on all workers of every slice at once, output streamed; the first failure's
  code, or 0. `steps[0]` becomes the furthest training step the output reports."""
  nodes, steps = pod.nodes(), steps or [0]
  codes = [0] * len(nodes)
  # Daemons: after Ctrl-C the launcher stops training and exits without waiting for them.
  threads = [threading.Thread(target=_stream, args=(pod.ssh(node, command), f'[{node}] ' if len(nodes) > 1 else '',
                                                    codes, i, steps), daemon=True) for i, node in enumerate(nodes)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  return next((code for code in codes if code), 0)


def unhealthy(pod: Pod, job: Job, poll: float) -> str:
  """Why the slice cannot train ('' when it can): a node gone, not READY or marked unhealthy,
  or a worker that does not see the pod's devices."""
  for node in pod.nodes():
    _say(shlex.join(pod.describe_node(node)))
    described = read_description(pod.describe_node(node), f'node {node}', poll)
    if described is None:
      return f'node {node} is gone'
    if described.get('state') != 'READY' or described.get('health', 'HEALTHY') != 'HEALTHY':
      return f'node {node} is {described.get("state")}, health {described.get("health", "unknown")}'
  if job.devices and run_everywhere(pod, job.preflight()):
    return f'a worker does not see the {job.devices} devices of the pod (see above)'
  return ''


def set_up(pod: Pod, job: Job) -> int:
  for node in pod.nodes():
    done = _run(pod.scp(node, job.files))
    if done.returncode:
      return done.returncode
  return run_everywhere(pod, job.install)


def follow(pod: Pod, job: Job, lines: int = 20, steps: list[int] | None = None) -> int:
  """Streams every worker's log until training ends; salt train's exit code."""
  return run_everywhere(pod, job.worker(f'follow {lines}'), steps)


def launch(pod: Pod, job: Job, *, retries: int, backoff: float, poll: float, keep: bool, detach: bool = False) -> int:
  """Creates, sets up, trains and relaunches until training is done; returns salt train's exit code."""
  if job.build:
    _checked(job.build)
  failures, installed, furthest, code = 0, False, 0, 1
  try:
    while True:
      steps, why = [0], 'the slice was lost while starting'
      if await_active(pod, poll):
        code = 0 if installed else set_up(pod, job)
        installed = code == 0
        why = unhealthy(pod, job, poll) if installed else 'the set-up failed'
        code = code or (1 if why else 0)  # giving up on an unhealthy slice is a failure too
        if not why:
          code = run_everywhere(pod, job.worker('start'))
          if code == 0 and detach:
            logs = ['salt', 'launch', 'tpu', '--project', pod.project, '--zone', pod.zone, '--name', pod.name,
                    *(['--slices', str(pod.slices)] if pod.slices > 1 else []), '--logs']
            _say(f'training started; follow it with: {shlex.join(logs)}')
            return 0
          if code == 0:
            code = follow(pod, job, steps=steps)
          if code in (0, USER_ERROR_EXIT_CODE):
            break
      now = state(pod, poll)
      if now.state == 'FAILED':
        raise _failed(pod, now)
      if now.state != 'ACTIVE':
        installed = False
        why = f'the slice is lost ({now.state or "gone"})'
      elif not why:
        why = ('salt train was preempted' if code == PREEMPTED_EXIT_CODE else
               'the connection to a worker dropped' if code == SSH_FAILED_EXIT_CODE else f'exit code {code}')
      elif installed:
        _say(f'{why}; deleting the slice to get another')
        _run(pod.delete())
        installed = False
      if steps[0] > furthest:  # progress: the count of relaunches in a row starts again
        furthest, failures = steps[0], 0
      failures += 1
      if failures > retries:
        _say(f'{why}; giving up after {retries} relaunches in a row without progress')
        break
      wait = min(backoff * 2 ** (failures - 1), MAX_BACKOFF_SECONDS)
      _say(f'{why}; relaunch {failures} of {retries} in {wait:g} s, resuming from the latest checkpoint')
      time.sleep(wait)
    if code == USER_ERROR_EXIT_CODE:
      _say('salt train exited 2 (bad input or a loss that is not finite; see above): not relaunching')
    return code
  except KeyboardInterrupt:
    _say('interrupted: stopping training (it saves a checkpoint first)')
    if installed:
      run_everywhere(pod, job.worker('stop'))
    return INTERRUPTED_EXIT_CODE
  finally:
    if not keep:
      if _run(pod.delete()).returncode:
        _say(f'could not delete the queued resource {pod.name}; delete it yourself: {shlex.join(pod.delete())}')
