"""Checkpoints and preemption: killed runs resume bit for bit, on any mesh, never from a
half-written or unreadable checkpoint unless the user allows the fallback."""

import random
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.helpers import tiny_config
from tests.runs import differences, logged, salt_train, saved_state, write_config
from trainer import checkpoint, data, sharding, train
from trainer.config import mesh_shape
from trainer.errors import PREEMPTED_EXIT_CODE, Diverged, UserError

STEPS = 24


@pytest.fixture(scope='module')
def config_file(tiny_data, tmp_path_factory):
  """A config file for `salt train` subprocesses: the tiny model, a checkpoint every 3 steps."""
  return write_config(tmp_path_factory.mktemp('config') / 'tiny.py', tiny_data, STEPS, every_steps=3, max_to_keep=3)


@pytest.fixture(scope='module')
def uninterrupted(config_file, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('uninterrupted')
  assert salt_train(config_file, workdir) == 0
  return {r['step']: r['loss'] for r in logged(workdir)}, saved_state(workdir, STEPS)


def assert_same_run(workdir, uninterrupted):
  assert differences(workdir, *uninterrupted, STEPS) == []


@pytest.mark.slow
def test_runs_killed_at_random_steps_resume_bitwise_equal(config_file, tmp_path, uninterrupted):
  kills = sorted(random.Random(0).sample(range(2, STEPS - 1), 3))
  for step in kills:
    assert salt_train(config_file, tmp_path, stop_at=step) == -signal.SIGKILL
  assert salt_train(config_file, tmp_path) == 0
  assert_same_run(tmp_path, uninterrupted)


@pytest.mark.slow
def test_sigterm_saves_the_step_it_reached_and_exits_preempted(config_file, tmp_path, uninterrupted):
  assert salt_train(config_file, tmp_path, stop_at=7, sig=signal.SIGTERM) == PREEMPTED_EXIT_CODE
  saved = max(int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit())
  assert saved == max(r['step'] for r in logged(tmp_path)) >= 7  # no finished step was lost
  assert salt_train(config_file, tmp_path) == 0
  assert_same_run(tmp_path, uninterrupted)


# --- in-process: meshes, broken checkpoints, divergence -------------------------------------


def program_on(config, data_dir, devices):
  mesh = sharding.make_mesh(mesh_shape(config.mesh, len(devices)), devices)
  return train.build(config, mesh, data.token_bytes(data_dir / 'tokenizer.model'))


@pytest.fixture(scope='module')
def saved_on_8_devices(tiny_data, tmp_path_factory):
  """Checkpoints at steps 1 and 2 of the tiny model on mesh (8, 1, 1)."""
  config = tiny_config(tiny_data)
  config.mesh.update(data=8, fsdp=1, tensor=1)
  program = program_on(config, tiny_data, jax.devices())
  stream = data.TokenStream(tiny_data, 'train', config.data.seq_len)
  batches = data.train_batches(stream, global_batch=8, seed=0, first_step=0, num_steps=2)
  directory = tmp_path_factory.mktemp('run') / 'checkpoints'
  ckpts = checkpoint.Checkpoints(directory, every_steps=1, max_to_keep=5)
  state = program.init(0)
  for step in (1, 2):
    state, _ = program.train_step(state, sharding.host_batch_to_global(next(batches), program.batch_sharding))
    ckpts.save(step, state, {'data': {'step': step}})
  ckpts.wait()
  ckpts.close()
  return directory, jax.device_get(state)


@pytest.mark.slow
@pytest.mark.parametrize('mesh, n_devices', [((2, 2, 2), 8), ((1, 2, 2), 4)])
def test_a_checkpoint_restores_onto_another_mesh(tiny_data, saved_on_8_devices, mesh, n_devices):
  directory, saved = saved_on_8_devices
  config = tiny_config(tiny_data)
  config.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  program = program_on(config, tiny_data, jax.devices()[:n_devices])
  ckpts = checkpoint.Checkpoints(directory, every_steps=1, max_to_keep=5)
  state, meta = ckpts.restore(program.abstract_state, 'auto')
  ckpts.close()
  assert int(state.step) == 2 and meta['data']['step'] == 2
  for got, want, target in zip(jax.tree.leaves(state), jax.tree.leaves(saved), jax.tree.leaves(program.abstract_state)):
    np.testing.assert_array_equal(np.asarray(got), want)
    assert got.sharding == target.sharding  # restored straight into this mesh's shards


def copy_of(directory, tmp_path):
  target = tmp_path / 'checkpoints'
  shutil.copytree(directory, target)
  return target


def test_a_half_written_checkpoint_is_never_restored(tiny_data, saved_on_8_devices, tmp_path):
  directory = copy_of(saved_on_8_devices[0], tmp_path)
  # What Orbax leaves when a save dies midway: the step under its temporary name.
  shutil.copytree(directory / '2', directory / '3.orbax-checkpoint-tmp-1234')
  program = program_on(tiny_config(tiny_data), tiny_data, jax.devices())
  state, _ = checkpoint.Checkpoints(directory, every_steps=1, max_to_keep=5).restore(program.abstract_state, 'auto')
  assert int(state.step) == 2


def truncate_largest_file(step_dir):
  largest = max((p for p in step_dir.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)
  largest.write_bytes(largest.read_bytes()[:largest.stat().st_size // 2])


def test_a_truncated_checkpoint_falls_back_only_under_auto(tiny_data, saved_on_8_devices, tmp_path, caplog):
  directory = copy_of(saved_on_8_devices[0], tmp_path)
  truncate_largest_file(directory / '2')
  program = program_on(tiny_config(tiny_data), tiny_data, jax.devices())
  ckpts = checkpoint.Checkpoints(directory, every_steps=1, max_to_keep=5)
  with pytest.raises(UserError, match=r'checkpoint at step 2 \(.*/2\) cannot be read'):
    ckpts.restore(program.abstract_state, str(directory / '2'))
  state, _ = ckpts.restore(program.abstract_state, str(directory / '1'))
  assert int(state.step) == 1
  state, _ = ckpts.restore(program.abstract_state, 'auto')
  assert int(state.step) == 1
  assert 'checkpoint at step 2 in' in caplog.text and 'cannot be read' in caplog.text
  # Set aside, not deleted, so that the run can save step 2 again.
  assert not (directory / '2').exists() and (tmp_path / 'checkpoints-unreadable' / '2').is_dir()
  assert ckpts.manager.all_steps() == [1]


@pytest.mark.slow
def test_a_run_whose_latest_checkpoint_is_bad_resumes_and_saves_that_step_again(tiny_data, tmp_path):
  """Issue 16, defect 1: with checkpoint 6 gone and checkpoint 4 missing its metadata, the
  same command resumed from 2 and then failed at step 4 on every relaunch (Orbax's
  StepAlreadyExistsError, exit 1)."""
  config = write_config(tmp_path / 'config.py', tiny_data, 6, every_steps=2, max_to_keep=5)
  workdir = tmp_path / 'run'
  assert salt_train(config, workdir) == 0
  shutil.rmtree(workdir / 'checkpoints' / '6')
  (workdir / 'checkpoints' / '4' / 'state' / '_METADATA').unlink()
  assert salt_train(config, workdir) == 0
  assert sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit()) == [2, 4, 6]
  assert (workdir / 'checkpoints-unreadable' / '4' / 'state').is_dir()
  assert salt_train(config, workdir) == 0  # and the next relaunch finds a finished run


def flip_bytes_in_the_largest_file(step_dir, offset_fraction: float):
  largest = max((p for p in step_dir.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)
  data = bytearray(largest.read_bytes())
  at = int(len(data) * offset_fraction)
  data[at:at + 8] = bytes(b ^ 0x5A for b in data[at:at + 8])
  largest.write_bytes(bytes(data))


@pytest.mark.parametrize('where', [0.3, 0.5, 0.7])
def test_flipped_bytes_in_a_checkpoint_are_never_restored(tiny_data, saved_on_8_devices, tmp_path, where):
  """Issue 16, defect 6: flipped bytes could restore silently and train into NaN."""
  directory = copy_of(saved_on_8_devices[0], tmp_path)
  flip_bytes_in_the_largest_file(directory / '2' / 'state', where)
  program = program_on(tiny_config(tiny_data), tiny_data, jax.devices())
  ckpts = checkpoint.Checkpoints(directory, every_steps=1, max_to_keep=5)
  with pytest.raises(UserError, match=r'checkpoint at step 2 \(.*/2\) cannot be read'):
    ckpts.restore(program.abstract_state, str(directory / '2'))
  state, _ = ckpts.restore(program.abstract_state, 'auto')
  assert int(state.step) == 1


def test_resume_never_refuses_a_directory_with_checkpoints(tiny_data, saved_on_8_devices):
  program = program_on(tiny_config(tiny_data), tiny_data, jax.devices())
  ckpts = checkpoint.Checkpoints(saved_on_8_devices[0], every_steps=1, max_to_keep=5)
  with pytest.raises(UserError, match='holds checkpoints up to step 2; --resume=never needs'):
    ckpts.restore(program.abstract_state, 'never')


@pytest.mark.slow
def test_a_loss_that_is_not_finite_stops_the_run_naming_the_step(tiny_data, tmp_path):
  config = tiny_config(tiny_data)
  config.optim.lr = 1e38  # finite, but the first update overflows the activations
  config.optim.warmup_steps = 0
  config.checkpoint.every_steps = 1
  with pytest.raises(Diverged, match='not finite at step 2; the last good checkpoint is step 1'):
    train.train(config, tmp_path)
  assert sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit()) == [1]


@pytest.mark.slow
def test_skip_leaves_the_state_unchanged_on_a_bad_batch(tiny_data):
  config = tiny_config(tiny_data)
  config.nonfinite = 'skip'
  program = program_on(config, tiny_data, jax.devices())
  stream = data.TokenStream(tiny_data, 'train', config.data.seq_len)
  batch = next(data.train_batches(stream, global_batch=8, seed=0, first_step=0, num_steps=1))
  state = program.init(0)
  before = jax.device_get(state.params)
  bad = dict(batch, weights=np.full_like(batch['weights'], np.nan))
  state, metrics = program.train_step(state, sharding.host_batch_to_global(bad, program.batch_sharding))
  assert float(metrics['skipped']) == 1.0 and int(state.step) == 1
  for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(before)):
    np.testing.assert_array_equal(np.asarray(got), want)
  state, metrics = program.train_step(state, sharding.host_batch_to_global(batch, program.batch_sharding))
  assert float(metrics['skipped']) == 0.0


@pytest.mark.slow
def test_a_changed_model_on_resume_names_what_differs_and_keeps_the_checkpoints(tiny_data, tmp_path):
  """Issue 16: a model change made every checkpoint 'unreadable' and the advice was to move
  them away, which throws good work out; it must say what differs instead."""
  config = tiny_config(tiny_data)
  config.update(total_steps=2)
  config.optim.warmup_steps = 1
  config.checkpoint.every_steps = 2
  config.eval.every_steps = 100
  train.train(config, tmp_path / 'run')
  config.model.update(d_model=96, d_ff=192)
  for resume in ('auto', str(tmp_path / 'run' / 'checkpoints' / '2')):
    with pytest.raises(UserError) as error:
      train.train(config, tmp_path / 'run', resume=resume)
    assert str(error.value).startswith('the checkpoint at step 2 in ')
    assert ('is of another model: model.d_model=64 there, 96 here, model.d_ff=128 there, 192 here; set them back '
            '(--config.model.d_model=64 --config.model.d_ff=128) or train this model in another --workdir'
            in str(error.value))
  assert (tmp_path / 'run' / 'checkpoints' / '2').is_dir()
  assert not (tmp_path / 'run' / 'checkpoints-unreadable').exists()


@pytest.mark.slow
def test_a_full_disk_during_an_asynchronous_save_is_one_line_and_the_run_resumes(tiny_data, tmp_path):
  """Issue 16: storage that refuses a save surfaced from Orbax's thread as a traceback
  with exit 1, which the launcher retries. A file-size limit makes the disk refuse the
  checkpoint's arrays (EFBIG) while the run's small files still fit."""
  config_file = write_config(tmp_path / 'tiny.py', tiny_data, 6, every_steps=2)
  workdir = tmp_path / 'run'

  # Files of at most 39 KiB, the signal for a larger write ignored so that it fails with EFBIG.
  command = shlex.join([sys.executable, '-m', 'trainer.cli', 'train', '--config', config_file, '--workdir', str(workdir)])
  failed = subprocess.run(['bash', '-c', f"ulimit -f 39; trap '' XFSZ; exec {command}"], capture_output=True, text=True)
  assert failed.returncode == 2
  assert failed.stderr.strip().splitlines()[-1] == (
      f'salt: error: a checkpoint could not be written in {workdir / "checkpoints"}: File too large; make room '
      'there (or set --config.checkpoint.max_to_keep lower) and run again to resume from the last checkpoint')
  assert salt_train(config_file, workdir) == 0
  assert [int(p.name) for p in sorted((workdir / 'checkpoints').iterdir())] == [2, 4, 6]


class SlowChecksum:
  """A checksum that takes a while to come back from the device; notes the thread that waited."""

  def __init__(self, value, waited_in: list):
    self.value, self.waited_in = value, waited_in

  def __int__(self) -> int:
    time.sleep(1)
    self.waited_in.append(threading.current_thread())
    return int(self.value)


def small_state():
  return {'w': jnp.arange(1000, dtype=jnp.float32), 'b': jnp.ones(7, jnp.bfloat16), 'step': jnp.int32(3)}


def test_save_does_not_wait_for_the_checksums(tmp_path, monkeypatch):
  """Issue 23: `save` computed and fetched the checksums before returning, which blocked the
  loop 4.67 s per save of the 290M-parameter state on CPU."""
  state = small_state()
  sums, waited_in = checkpoint._sums, []
  monkeypatch.setattr(checkpoint, '_sums', lambda tree: [SlowChecksum(x, waited_in) for x in sums(tree)])
  ckpts = checkpoint.Checkpoints(tmp_path, every_steps=1, max_to_keep=1)
  start = time.perf_counter()
  ckpts.save(1, state, {'data': {'step': 1}})
  assert time.perf_counter() - start < 1
  ckpts.wait()
  assert len(waited_in) == 3 and threading.main_thread() not in waited_in
  monkeypatch.undo()
  restored, meta = ckpts.restore(jax.tree.map(ocp.utils.to_shape_dtype_struct, state), 'auto')
  ckpts.close()
  assert meta == {'data': {'step': 1}, 'checksums': checkpoint.checksums(state)}
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_a_checkpoint_from_before_the_background_checksums_is_verified_on_restore(tmp_path):
  """Checkpoints that salt wrote before issue 23 hold the same checksums, written by Orbax's
  own JSON handler: they restore, and a damaged one is refused."""
  state = small_state()
  manager = ocp.CheckpointManager(tmp_path.absolute(), item_names=('state', 'meta'))
  for step in (1, 2):
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(
        {'data': {'step': step}, 'checksums': checkpoint.checksums(state)})))
  manager.wait_until_finished()
  manager.close()
  flip_bytes_in_the_largest_file(tmp_path / '2' / 'state', 0.5)
  ckpts = checkpoint.Checkpoints(tmp_path, every_steps=1, max_to_keep=5)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  with pytest.raises(UserError, match=r'checkpoint at step 2 \(.*/2\) cannot be read'):
    ckpts.restore(abstract, str(tmp_path / '2'))
  restored, meta = ckpts.restore(abstract, str(tmp_path / '1'))
  assert meta['data'] == {'step': 1}
  np.testing.assert_array_equal(np.asarray(restored['w']), np.asarray(state['w']))
