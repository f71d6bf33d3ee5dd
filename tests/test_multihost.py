"""Several processes train as one: 2 processes x 4 devices (`salt launch local`, gloo) against
1 process x 8 devices, and checkpoints that move between the two.

The two compute the same program; only the order in which the collectives sum differs,
so losses agree to float32 rounding (measured: at most 5e-7 apart, LOSS_RTOL allows
1e-5 relative) and parameters after 6 Adam steps to ATOL (measured: 1.2e-7).
"""

import jax
import numpy as np
import pytest

from tests.runs import logged, write_config
from trainer import checkpoint, cli, data, train
from trainer import config as config_lib

pytestmark = pytest.mark.slow  # end to end: every test here runs whole jobs

STEPS = 6
LOSS_RTOL = 1e-5
ATOL = 1e-5


@pytest.fixture(scope='module')
def config_file(tiny_data, tmp_path_factory):
  return write_config(tmp_path_factory.mktemp('config') / 'tiny.py', tiny_data, STEPS, every_steps=3)


def restored(config_file, tiny_data, workdir, step) -> dict[str, np.ndarray]:
  """The checkpoint at `step` of a run, restored into this process's 8-device mesh."""
  config = config_lib.load(config_file)
  program = train.build(config, train.make_mesh(config), data.token_bytes(tiny_data / 'tokenizer.model'))
  checkpoints = checkpoint.Checkpoints(workdir / 'checkpoints', every_steps=1, max_to_keep=10)
  try:
    state, _ = checkpoints.restore(program.abstract_state, str(workdir / 'checkpoints' / str(step)))
  finally:
    checkpoints.close()
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(state)}


@pytest.fixture(scope='module')
def one_process(config_file, tiny_data, tmp_path_factory):
  """The reference: 1 process x 8 devices. Its run directory, losses and checkpoints at 3 and 6."""
  workdir = tmp_path_factory.mktemp('one')
  train.train(config_lib.load(config_file), workdir)
  losses = {r['step']: r['loss'] for r in logged(workdir)}
  return workdir, losses, {s: restored(config_file, tiny_data, workdir, s) for s in (3, STEPS)}


def launch_two(config_file, workdir, *extra) -> int:
  return cli.main(['launch', 'local', '--processes', '2', '--devices-per-process', '4', '--',
                   'salt', 'train', '--config', config_file, '--workdir', str(workdir), *extra])


def assert_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
  assert got.keys() == want.keys()
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=0, atol=ATOL, err_msg=key)


def test_two_processes_train_as_one_and_their_checkpoint_restores_in_one(
    config_file, tiny_data, one_process, tmp_path, capsys):
  _, losses, states = one_process
  # dcn_data=2: the data axis spans the two processes as it would two slices.
  assert launch_two(config_file, tmp_path, '--config.mesh.dcn_data=2') == 0
  out = capsys.readouterr().out
  records = logged(tmp_path)
  assert [r['step'] for r in records] == list(range(1, STEPS + 1))  # written once, by process 0
  np.testing.assert_allclose([r['loss'] for r in records], [losses[s] for s in range(1, STEPS + 1)],
                             rtol=LOSS_RTOL)
  assert '[p0] model: ' in out and '[p1] model: ' not in out  # only process 0 logs at INFO
  for step in (3, STEPS):
    assert_close(restored(config_file, tiny_data, tmp_path, step), states[step])


def test_a_checkpoint_of_one_process_resumes_on_two(config_file, tiny_data, one_process, tmp_path):
  reference, losses, states = one_process
  assert launch_two(config_file, tmp_path, f'--resume={reference}/checkpoints/3') == 0
  records = logged(tmp_path)
  assert [r['step'] for r in records] == [4, 5, 6]
  np.testing.assert_allclose([r['loss'] for r in records], [losses[s] for s in (4, 5, 6)], rtol=LOSS_RTOL)
  assert_close(restored(config_file, tiny_data, tmp_path, STEPS), states[STEPS])
