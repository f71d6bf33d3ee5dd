"""`salt launch local`: N processes on this machine, joined by jax.distributed like the hosts of a pod.

    salt launch local --processes 2 --devices-per-process 4 -- salt train --config configs/demo.py --workdir runs/mh

Process i runs COMMAND on CPU with M simulated devices
(XLA_FLAGS=--xla_force_host_platform_device_count=M, JAX_PLATFORMS=cpu) and finds the
others through SALT_COORDINATOR (a free port on localhost), SALT_NUM_PROCESSES and
SALT_PROCESS_ID (trainer/distributed.py); their collectives go over gloo. Output comes
back line by line as `[pI] ...`. When one process fails, the others are stopped and the
launcher exits with the failed one's code; SIGINT or SIGTERM is passed on to all of them
(salt train saves and exits 75).
"""

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

from trainer import distributed
from trainer.errors import UserError

# How long the others get to stop after one failed, before they are killed.
STOP_GRACE_SECONDS = 10


def add_parser(subparsers) -> None:
  p = subparsers.add_parser(
      'local', help='N processes on this machine joined by jax.distributed (the multi-host code paths, no pod)',
      usage='salt launch local --processes N [--devices-per-process M] -- COMMAND ...')
  p.add_argument('--processes', type=int, required=True, help='how many processes (hosts) to start')
  p.add_argument('--devices-per-process', type=int, default=1, help='simulated CPU devices in each')
  p.add_argument('command', nargs=argparse.REMAINDER,
                 help='what each process runs, after --; `salt ...` runs this salt whatever PATH holds')
  p.set_defaults(run=_main)


def _main(args, overrides) -> int:
  command = args.command[1:] if args.command[:1] == ['--'] else args.command
  if overrides or not command:
    raise UserError('give the command each process runs after --, e.g. '
                    'salt launch local --processes 2 -- salt train --config FILE --workdir DIR')
  if args.processes < 1 or args.devices_per_process < 1:
    raise UserError('--processes and --devices-per-process must be at least 1')
  return launch(command, args.processes, args.devices_per_process)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def process_env(index: int, count: int, devices: int, port: int) -> dict[str, str]:
  env = dict(os.environ)
  flags = [f for f in env.get('XLA_FLAGS', '').split() if not f.startswith('--xla_force_host_platform_device_count')]
  env.update({
      distributed.COORDINATOR: f'localhost:{port}',
      distributed.NUM_PROCESSES: str(count),
      distributed.PROCESS_ID: str(index),
      'JAX_PLATFORMS': 'cpu',
      'PYTHONUNBUFFERED': '1',  # lines come back as they are written, not when a buffer fills
      'XLA_FLAGS': ' '.join(flags + [f'--xla_force_host_platform_device_count={devices}']),
  })
  return env


def _relay(prefix: str, stream, lock: threading.Lock) -> None:
  for line in stream:
    with lock:
      sys.stdout.write(f'{prefix} {line}')
      sys.stdout.flush()
  stream.close()


def _exit_code(returncode: int) -> int:
  """A shell's exit code: 128 + N for a process that signal N ended."""
  return 128 - returncode if returncode < 0 else returncode


def launch(command: list[str], processes: int, devices_per_process: int) -> int:
  """Runs `command` in `processes` joined processes; returns the first failure's exit code, or 0."""
  if command[0] == 'salt':
    command = [sys.executable, '-m', 'trainer.cli', *command[1:]]
  if not shutil.which(command[0]):
    raise UserError(f'{command[0]}: no such command')
  port, lock = free_port(), threading.Lock()
  children, relays = [], []

  def pass_on(signum, frame):
    for child in children:
      if child.poll() is None:
        child.send_signal(signal.SIGTERM)

  previous = {s: signal.signal(s, pass_on) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    for i in range(processes):
      # A session of its own: a Ctrl-C reaches the launcher alone, which passes on one SIGTERM.
      child = subprocess.Popen(command, env=process_env(i, processes, devices_per_process, port),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
      children.append(child)
      relays.append(threading.Thread(target=_relay, args=(f'[p{i}]', child.stdout, lock), daemon=True))
      relays[-1].start()
    failed = None
    while failed is None and any(c.poll() is None for c in children):
      failed = next((c for c in children if c.poll() not in (None, 0)), None)
      time.sleep(0.05)
    failed = failed or next((c for c in children if c.returncode), None)
    stopped = _stop(children) if failed is not None else 0
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  for relay in relays:
    relay.join()
  if failed is None:
    return 0
  print(f'salt launch local: process {children.index(failed)} exited with code {_exit_code(failed.returncode)}'
        + (f'; stopped the {stopped} still running' if stopped else ''), file=sys.stderr)
  return _exit_code(failed.returncode)


def _stop(children: list[subprocess.Popen]) -> int:
  """SIGTERM to those still running, SIGKILL to those still running STOP_GRACE_SECONDS later;
  returns how many there were."""
  running = [c for c in children if c.poll() is None]
  for child in running:
    child.terminate()
  deadline = time.monotonic() + STOP_GRACE_SECONDS
  for child in running:
    try:
      child.wait(timeout=max(deadline - time.monotonic(), 0))
    except subprocess.TimeoutExpired:
      child.kill()
      child.wait()
  return len(running)
