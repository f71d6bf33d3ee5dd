"""`salt launch xpk`: the same training as `salt launch tpu`, as an xpk workload on a GKE cluster.

    salt launch xpk --cluster C --project P --zone Z --tpu-type v5p-128 --image IMAGE --name llm \\
        --bucket gs://B --config configs/paper.py:llm [--slices 2] [--print]

IMAGE is built from this checkout by the Dockerfile at its root, so the config file must
be part of it (under this checkout). xpk creates a JobSet whose pods run
`salt train --config /salt/CONFIG --workdir gs://B/NAME` on every host of every slice
(SALT_DISTRIBUTED=auto, set in the image); after a failure or a preemption JobSet
restarts it, up to --max-restarts times, and it resumes from the latest checkpoint
in the bucket.
"""

import shlex
import shutil
import subprocess
from pathlib import Path

from launch import tpu
from trainer.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
IMAGE_ROOT = '/salt'  # the Dockerfile's WORKDIR
# A preempted host gets SIGTERM, then this long to save its checkpoint before SIGKILL.
GRACE_SECONDS = 600


def add_parser(subparsers) -> None:
  p = subparsers.add_parser(
      'xpk', help='train on TPUs under GKE: an xpk workload of salt train',
      usage='salt launch xpk --cluster C --project P --zone Z --tpu-type TYPE --image IMAGE --name NAME '
            '(--bucket gs://B | --workdir DIR) --config FILE[:ARG] [--config.KEY=VALUE ...] [--print]')
  p.add_argument('--cluster', required=True, help='the GKE cluster (made by xpk cluster create)')
  p.add_argument('--project', required=True)
  p.add_argument('--zone', required=True)
  p.add_argument('--tpu-type', required=True, help='one slice, e.g. v5p-128, v6e-256, v5litepod-256')
  p.add_argument('--slices', type=int, default=1, help='slices joined over DCN (sets mesh.dcn_data and mesh.data)')
  p.add_argument('--image', required=True, help='the image built from this checkout by its Dockerfile')
  p.add_argument('--name', required=True, help='the workload and the run directory in the bucket')
  p.add_argument('--bucket', help='gs://BUCKET; the run writes to gs://BUCKET/NAME')
  p.add_argument('--workdir', help='the run directory instead')
  p.add_argument('--config', required=True, help='a config file of this checkout, optionally :ARG')
  p.add_argument('--env', action='append', default=[], metavar='KEY=VALUE', help='set in the pods')
  p.add_argument('--max-restarts', type=int, default=10, help='restarts after failures and preemptions')
  p.add_argument('--print', action='store_true', help='print the xpk command and run none')
  p.set_defaults(run=_main)


def _main(args, overrides) -> int:
  tpu.check_accelerator_type(args.tpu_type)
  if not args.workdir and not (args.bucket or '').startswith('gs://'):
    raise UserError('give --bucket gs://BUCKET (the run writes to gs://BUCKET/NAME) or --workdir')
  config_file, colon, arg = args.config.partition(':')
  path = Path(config_file).resolve()
  if not path.is_file():
    raise UserError(f'config file {config_file!r} does not exist')
  if not path.is_relative_to(ROOT):
    raise UserError(f'{config_file} is not in this checkout, so not in the image; put it under {ROOT / "configs"} '
                    'and build the image again')
  overrides, _ = tpu.slice_overrides(args.config, list(overrides), args.tpu_type, args.slices)
  env = [f'--env={key}={value}' for key, value in map(tpu.key_value, args.env)]
  workdir = args.workdir or f'{args.bucket.rstrip("/")}/{args.name}'
  train = ['salt', 'train', '--config', f'{IMAGE_ROOT}/{path.relative_to(ROOT)}{colon}{arg}', '--workdir', workdir,
           *overrides]
  command = ['xpk', 'workload', 'create', f'--cluster={args.cluster}', f'--workload={args.name}',
             f'--tpu-type={args.tpu_type}', f'--num-slices={args.slices}', f'--docker-image={args.image}',
             f'--project={args.project}', f'--zone={args.zone}', f'--max-restarts={args.max_restarts}',
             f'--termination-grace-period-seconds={GRACE_SECONDS}', *env, f'--command={shlex.join(train)}']
  print(shlex.join(command))
  if args.print:
    return 0
  if not shutil.which('xpk'):
    raise UserError('xpk is not installed here (pip install xpk); --print shows the command')
  return subprocess.run(command).returncode
