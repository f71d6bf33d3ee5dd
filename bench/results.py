"""One JSON line per benchmark figure, with what a reader needs to trust it.

Each line holds `what` (the figure's kind), `value`, the shape that was measured, and
`device`, `date` and `commit`. Lines are printed, and appended to
$SALT_RESULTS (a results.jsonl; bench/gpu.sh sets it) when that is set.
"""

import datetime
import json
import os
import subprocess

import jax


def commit() -> str:
  """The commit measured: $SALT_COMMIT (a copied tree may have no .git), else git's HEAD."""
  if os.environ.get('SALT_COMMIT'):
    return os.environ['SALT_COMMIT']
  try:
    return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def record(what: str, value: float | None, **shape) -> dict:
  """Prints the figure as one JSON line and appends it to $SALT_RESULTS if set."""
  line = {'what': what, 'value': value, **shape, 'device': jax.devices()[0].device_kind,
          'date': datetime.date.today().isoformat(), 'commit': commit()}
  text = json.dumps(line)
  print(text, flush=True)
  if os.environ.get('SALT_RESULTS'):
    with open(os.environ['SALT_RESULTS'], 'a') as f:
      f.write(text + '\n')
  return line
