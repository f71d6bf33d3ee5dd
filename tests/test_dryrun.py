"""`salt dryrun` on CPU: the memory and FLOP figures, the checkpoint round trip, and configs
that cannot fit stopped before a step runs."""

import importlib.util
import re

import pytest

from tests.helpers import tiny_config
from trainer import cli, dryrun
from trainer import config as config_lib
from trainer.model import ModelConfig, flops_per_token

HUGE = ['--config.model.d_model=8192', '--config.model.n_layers=48', '--config.model.d_ff=32768',
        '--config.model.n_heads=64', '--config.model.n_kv_heads=64', '--config.model.head_dim=128']


@pytest.fixture(scope='module')
def config_file(tmp_path_factory):
  """The tiny model on 8 data-parallel devices; `:slm` is a smaller one to stand in as the teacher."""
  path = tmp_path_factory.mktemp('config') / 'tiny.py'
  path.write_text(
      'from tests.helpers import tiny_config\n'
      'def get_config(arg=None):\n'
      '  c = tiny_config()\n'
      '  c.mesh.update(data=8, fsdp=1, tensor=1)\n'
      "  if arg == 'slm':\n"
      '    c.model.update(d_model=32, n_layers=1)\n'
      '  return c\n')
  return str(path)


@pytest.mark.slow
def test_salt_dry_run_compiles_both_stages_reports_figures_and_round_trips_a_checkpoint(
    config_file, tmp_path, capsys):
  code = cli.main(['dryrun', '--config', config_file, f'--config.salt.teacher={tmp_path}/slm/checkpoints/9',
                   '--config.salt.n_kd=20', '--teacher-config', f'{config_file}:slm', '--steps', '1'])
  out = capsys.readouterr().out
  assert code == 0, out
  model_flops = flops_per_token(ModelConfig(**tiny_config().model), 32) * 8 * 32
  for stage in ('stage 1 (distillation)', 'stage 2'):
    assert re.search(rf'{re.escape(stage)}: [\d.]+ [KMG]?i?B per device = arguments .+ \+ temporaries .+ '
                     r'\+ outputs .+ - donated .+ \+ generated code', out), out
    assert f'{stage}: FLOPs per step: model {model_flops:.3g}' in out and 'per device, ' in out
    assert re.search(rf'{re.escape(stage)}: 2 steps, loss [\d.]+; step [\d.]+ ms, [\d,]+ tokens/s, MFU n/a', out)
  assert 'teacher: ' in out and 'random (its checkpoint is not here)' in out
  assert "memory per device: " in out and "the host's available memory" in out
  # 2 steps of each stage, then the checkpoint.
  assert re.search(r'checkpoint: saved step 4 to .+, restored it: bitwise equal \(\d+ arrays\)', out), out


def test_a_state_that_cannot_fit_stops_before_compiling(config_file, capsys):
  code = cli.main(['dryrun', '--config', config_file, *HUGE])
  captured = capsys.readouterr()
  assert code == 2
  assert re.search(r'the train state \(parameters, optimizer moments\) needs [\d.]+ GiB per device, more than '
                   r"the [\d.]+ [MG]iB of the host's available memory .+: it will not fit", captured.err)
  assert 'FLOPs per step' not in captured.out and 'steps, loss' not in captured.out


def test_a_program_that_cannot_fit_stops_before_any_step(config_file, monkeypatch, capsys):
  # The state (about 1.3 MiB a device) fits in 2 MiB; the compiled step (about 2.5 MiB) does not.
  monkeypatch.setattr(dryrun, 'device_memory', lambda target: (2 * 2 ** 20, 'a 2 MiB test device'))
  code = cli.main(['dryrun', '--config', config_file])
  captured = capsys.readouterr()
  assert code == 2
  assert re.search(r'train step needs [\d.]+ MiB per device, more than the 2.00 MiB of a 2 MiB test device: it will '
                   r'not fit; shard over more devices', captured.err), captured.err
  assert 'train step: FLOPs per step' in captured.out and 'steps, loss' not in captured.out


@pytest.mark.skipif(importlib.util.find_spec('libtpu') is not None, reason='libtpu is installed here')
def test_a_topology_without_libtpu_is_a_clear_error(config_file, capsys):
  assert cli.main(['dryrun', '--config', config_file, '--topology', 'v5p-128']) == 2
  assert ('--topology v5p-128: this jax cannot compile for a TPU it does not have'
          in capsys.readouterr().err)


@pytest.mark.parametrize('chips, dims, shape', [(4, 3, (2, 2, 1)), (8, 3, (2, 2, 2)), (64, 3, (4, 4, 4)),
                                                (128, 3, (4, 4, 8)), (8, 2, (2, 4)), (256, 2, (16, 16)),
                                                (48, 3, None)])
def test_slice_shapes(chips, dims, shape):
  assert dryrun._torus(chips, dims) == shape


@pytest.mark.slow
def test_the_prediction_counts_recomputation_the_teacher_and_every_stage_s_steps(config_file, tmp_path,
                                                                                monkeypatch, capsys):
  """At a peak of 1 TFLOP/s a device: stage 1 adds the teacher's forward pass (a third of its
  training FLOPs), recomputing everything (save_nothing) costs more than keeping the
  matmuls and the attention, and the run's hours are stage 1's steps plus stage 2's."""
  monkeypatch.setattr(dryrun, 'peak_flops', lambda device: 1e12)  # a CPU has no known peak
  teacher = f'{config_file}:slm'
  stages = {}
  for remat in ('save_matmuls_and_attention', 'save_nothing'):
    config = config_lib.load(config_file, [f'--config.model.remat={remat}', f'--config.salt.teacher={tmp_path}/t',
                                           '--config.salt.n_kd=10'])
    stages[remat] = dryrun.run(config, steps=1, teacher_spec=teacher)['stages']
  cfg, slm = ModelConfig(**tiny_config().model), ModelConfig(**config_lib.load(teacher).model)
  tokens = 8 * 32
  kept = stages['save_matmuls_and_attention']
  assert kept['stage 2']['min_step_seconds'] * 8e12 == pytest.approx(flops_per_token(cfg, 32) * tokens)
  assert kept['stage 1 (distillation)']['min_step_seconds'] * 8e12 == pytest.approx(
      (flops_per_token(cfg, 32) + flops_per_token(slm, 32) / 3) * tokens)
  assert kept['stage 2']['max_mfu'] == 1.0
  redone = stages['save_nothing']['stage 2']
  assert redone['min_step_seconds'] > kept['stage 2']['min_step_seconds'] and redone['max_mfu'] < 1.0
  assert kept['stage 2']['min_hours'] == pytest.approx(kept['stage 2']['min_step_seconds'] * 30 / 3600)
  assert kept['stage 1 (distillation)']['min_hours'] == pytest.approx(
      kept['stage 1 (distillation)']['min_step_seconds'] * 10 / 3600)
  assert re.search(r'the run \(40 steps\) takes at least [\d.]+ hours on 8 x cpu, [\d,]+ device-hours',
                   capsys.readouterr().out)
