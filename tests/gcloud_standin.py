"""A stand-in for gcloud with simulated TPU workers, for the launcher's tests.

Each call's arguments are appended to $GCLOUD_LOG as a JSON line; the cloud's state lives
in $GCLOUD_STATE (JSON), which a test scripts:

  exists, states, after_create  the queued resource; describe pops `states` (keeping the last)
  failed_reason                 failedData.error.message of a FAILED resource
  describe_errors               how many queued-resources describes fail first, as an expired
                                login or 5xx would
  node_describe_errors          how many tpu-vm describes fail first
  silent_errors                 those failures exit 0 with no output (an API error gcloud
                                does not report)
  hidden                        how many describes say NOT_FOUND while it exists
  install_exits                 exit codes of the install command, in turn (then it runs)
  preflight_exit                the pre-flight device check's exit code
  follow_drops                  how many `follow` calls drop at once with 255 (a lost connection)
  runs                          one per salt train started: {"steps": N, "exit": CODE,
                                "hang": bool (run until SIGTERM, which saves and exits 75),
                                "preempt": bool (the slice is SUSPENDED when it ends)}

Each node is a worker whose home is $GCLOUD_WORKERS/NODE: scp copies there, and the
launcher's commands run there for real (bash, setsid, tail): the install with a fake
`uv` that appends its arguments to ~/uv.log as a JSON line, then the worker script,
which starts a fake `salt-venv/bin/salt` that prints `step i/N` lines as salt train does.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

FAKE_SALT = '''#!{python}
import json, os, signal, sys, time
path = os.environ['GCLOUD_STATE']
with open(path) as f:
  state = json.load(f)
run = state['runs'].pop(0)
with open(path, 'w') as f:
  json.dump(state, f)
print('env', os.environ.get('SALT_TEST_ENV', ''), os.environ.get('SALT_DISTRIBUTED', ''), flush=True)

def saved(signum, frame):
  print('SIGTERM: saved a checkpoint', flush=True)
  sys.exit(75)

signal.signal(signal.SIGTERM, saved)
for step in range(1, run.get('steps', 0) + 1):
  print(f'step {{step}}/{{run.get("total", 10)}}', flush=True)
  time.sleep(0.05)
while run.get('hang'):
  time.sleep(0.1)
if run.get('preempt'):
  with open(path) as f:
    state = json.load(f)
  state['states'] = ['SUSPENDED']
  with open(path, 'w') as f:
    json.dump(state, f)
sys.exit(run.get('exit', 0))
'''

FAKE_UV = '''#!{python}
import json, os, sys
with open(os.path.join(os.environ['HOME'], 'uv.log'), 'a') as f:
  f.write(json.dumps(sys.argv[1:]) + '\\n')
'''

NOT_FOUND = 'ERROR: (gcloud.compute.tpus.{group}.describe) NOT_FOUND: Resource not found\n'


def _failed_describe(state: dict, key: str, group: str) -> bool:
  """Whether this describe fails (the `key` count of them not yet spent), saying so as gcloud would."""
  if not state.get(key, 0):
    return False
  state[key] -= 1
  if not state.get('silent_errors'):
    sys.stderr.write(f'ERROR: (gcloud.compute.tpus.{group}.describe) UNAVAILABLE: try again\n')
  return True


def _shell(home: Path, command: str) -> int:
  """`command` run by bash as a worker would, in its home, with fake curl (the metadata server
  fails) and uv."""
  tools = home / '.tools'
  tools.mkdir(parents=True, exist_ok=True)
  for name, text in (('curl', '#!/bin/sh\nexit 7\n'), ('uv', FAKE_UV.format(python=sys.executable))):
    (tools / name).write_text(text)
    (tools / name).chmod(0o755)
  env = {**os.environ, 'HOME': str(home), 'PATH': f'{tools}{os.pathsep}{os.environ["PATH"]}'}
  return subprocess.run(['bash', '-c', command], env=env, cwd=home).returncode


def main(args: list[str]) -> int:
  with open(os.environ['GCLOUD_LOG'], 'a') as f:
    f.write(json.dumps(args) + '\n')
  path = Path(os.environ['GCLOUD_STATE'])
  state = json.loads(path.read_text())

  def save():
    path.write_text(json.dumps(state))

  if args[0] == 'alpha':
    args = args[1:]
  group, verb = args[2], args[3]
  if group == 'queued-resources':
    if verb == 'create':
      if state['exists']:
        sys.stderr.write('ERROR: (gcloud.compute.tpus.queued-resources.create) ALREADY_EXISTS: already exists\n')
        return 1
      state.update(exists=True, states=list(state['after_create']))
    elif verb == 'describe':
      if _failed_describe(state, 'describe_errors', group):
        save()
        return 0 if state.get('silent_errors') else 1
      if not state['exists'] or state.get('hidden', 0):
        state['hidden'] = max(state.get('hidden', 0) - 1, 0)
        save()
        sys.stderr.write(NOT_FOUND.format(group=group))
        return 1
      now = state['states'].pop(0) if len(state['states']) > 1 else state['states'][0]
      described = {'state': now}
      if now == 'FAILED':
        described['failedData'] = {'error': {'code': 8, 'message': state.get('failed_reason', '')}}
      print(json.dumps({'name': args[4], 'state': described}))
    elif verb == 'delete':
      state['exists'] = False
    save()
    return 0
  node = next(a[:-1] for a in args if a.endswith(':')) if verb == 'scp' else args[4]
  home = Path(os.environ['GCLOUD_WORKERS']) / node
  if verb == 'describe':
    if _failed_describe(state, 'node_describe_errors', group):
      save()
      return 0 if state.get('silent_errors') else 1
    if not state['exists']:
      sys.stderr.write(NOT_FOUND.format(group=group))
      return 1
    print(json.dumps({'state': 'READY', 'health': 'HEALTHY'}))
    return 0
  if verb == 'scp':
    home.mkdir(parents=True, exist_ok=True)
    for file in args[4:args.index(f'{node}:')]:
      shutil.copy(file, home)
    return 0
  command = next(a for a in args if a.startswith('--command='))[len('--command='):]
  if 'uv pip install' in command:
    code = state['install_exits'].pop(0) if state.get('install_exits') else 0
    save()
    code = code or _shell(home, command)
    if code == 0:
      salt = home / 'salt-venv' / 'bin' / 'salt'
      salt.parent.mkdir(parents=True, exist_ok=True)
      salt.write_text(FAKE_SALT.format(python=sys.executable))
      salt.chmod(0o755)
    return code
  if 'jax.device_count()' in command:
    return state.get('preflight_exit', 0)
  if ' follow' in command and state.get('follow_drops', 0):
    state['follow_drops'] -= 1
    save()
    return 255
  return _shell(home, command)


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
