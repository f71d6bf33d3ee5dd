"""The script `salt launch tpu` copies to every worker: it starts training detached, follows it, stops it.

    bash ~/salt-NAME.sh start    stop what an earlier launch left running, then start
                                 salt train in its own session (it outlives the ssh
                                 connection and the launcher's terminal)
    bash ~/salt-NAME.sh follow   stream this worker's log, tagged [wN], until training
                                 ends; exit with salt train's exit code
    bash ~/salt-NAME.sh stop     SIGTERM (salt train saves a checkpoint and exits 75),
                                 SIGKILL after STOP_SECONDS

Each worker keeps its log in ~/salt-logs/NAME.log (appended across relaunches), the
training process id in NAME.pid and its exit code in NAME.exit.
"""

import re
import shlex

STOP_SECONDS = 600
ENV_NAME = re.compile(r'[A-Za-z_][A-Za-z0-9_]*')

TEMPLATE = r'''#!/bin/bash
# Written by salt launch tpu; see launch/worker.py.
set -u
job={job}
logs=$HOME/salt-logs
log=$logs/$job.log exit_file=$logs/$job.exit pid_file=$logs/$job.pid

train() {{
  cd "$HOME"
{exports}
  exec {train}
}}

say() {{  # to the launcher and to this worker's log
  echo "$*"
  [ -d "$logs" ] && echo "$*" >> "$log"
}}

running() {{
  local pid
  pid=$(cat "$pid_file" 2>/dev/null) && kill -0 "$pid" 2>/dev/null && echo "$pid"
}}

stop() {{
  local pid
  pid=$(running) || return 0
  say "stopping the salt train still running here (pid $pid); it saves a checkpoint first"
  kill -TERM "$pid"
  for _ in $(seq {stop_seconds}); do kill -0 "$pid" 2>/dev/null || return 0; sleep 1; done
  say "salt train (pid $pid) did not stop within {stop_seconds} s; killing it"
  kill -KILL "$pid"
}}

case "${{1:-}}" in
  start)
    stop
    mkdir -p "$logs"
    rm -f "$exit_file" "$pid_file"
    setsid bash "$0" run >> "$log" 2>&1 < /dev/null &
    for _ in $(seq 100); do [ -s "$pid_file" ] && exit 0; sleep 0.1; done
    echo "salt train did not start; see $log"; exit 1 ;;
  run)
    echo "=== salt launch tpu: $job starts on $(hostname) at $(date -u +%FT%TZ)"
    train &
    pid=$!
    echo "$pid" > "$pid_file"
    wait "$pid"
    echo $? > "$exit_file" ;;
  follow)
    worker=$(curl -sf -m 5 -H Metadata-Flavor:Google \
      http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || hostname)
    pid=$(cat "$pid_file" 2>/dev/null) || {{ echo "[w$worker] no salt train of $job was started here"; exit 1; }}
    tail -n "${{2:-20}}" -F --pid="$pid" "$log" 2>/dev/null | sed -u "s/^/[w$worker] /"
    [ -s "$exit_file" ] || sleep 2
    [ -s "$exit_file" ] && exit "$(cat "$exit_file")"
    echo "[w$worker] salt train ended without an exit code (killed with its machine?)"; exit 1 ;;
  stop)
    stop ;;
  *)
    echo "usage: $0 start|follow [LINES]|stop"; exit 2 ;;
esac
'''


def script(name: str, train: list[str], env: dict[str, str]) -> str:
  """The worker script of job `name`: runs `train` (paths relative to the home directory)
  with `env` exported."""
  exports = '\n'.join(f'  export {key}={shlex.quote(value)}' for key, value in env.items())
  return TEMPLATE.format(job=shlex.quote(name), exports=exports or '  :', train=shlex.join(train),
                         stop_seconds=STOP_SECONDS)
