"""`salt dryrun --topology`: both stages of SALT (a student and its teacher) compiled for real
TPU slices, with each loss implementation and the TPU attention (splash); a config too big
for its slice answered in one line.

The paper's pair (configs/paper.py: the 2.8B student, the 1.5B teacher) takes about two
minutes a slice to compile on two cores, so it compiles where a misfit is likeliest (the
16 GiB v5e) and where the Pallas kernels once overflowed VMEM (v5p), one loss each; it
fits v6e-256 with 5.3 GiB of 32 (BENCHMARKS.md). The demo pair gets every slice with
both losses.
"""

import importlib.util

import pytest

from trainer import cli, dryrun
from trainer import config as config_lib
from trainer.errors import UserError

pytestmark = pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                                reason='the TPU compile tier needs libtpu (make test-tpu)')
STAGES = ('stage 1 (distillation)', 'stage 2')


def salt_config(spec: str, loss: str, *overrides: str):
  """`spec` as the student of a SALT run whose teacher (not here) is random, stage 1 for half the run."""
  config = config_lib.load(spec, [f'--config.loss.impl={loss}', '--config.salt.teacher=/no/teacher/here',
                                  '--config.salt.n_kd=100', *overrides])
  return config


@pytest.mark.parametrize('topology, loss', [('v5p-128', 'pallas'), ('v5litepod-256', 'xla')])
def test_the_paper_pair_compiles_and_fits(topology, loss, capsys):
  figures = dryrun.run(salt_config('configs/paper.py:llm', loss), topology=topology,
                       teacher_spec='configs/paper.py:slm')
  out = capsys.readouterr().out
  assert set(figures['stages']) == set(STAGES)
  for name in STAGES:
    stage = figures['stages'][name]
    assert stage['need_bytes'] <= figures['device_bytes'], (name, out)
    assert 0 < stage['max_mfu'] <= 1 and stage['min_hours'] > 0
  assert 'takes at least' in out


@pytest.mark.parametrize('topology, devices', [('v5p-8', 4), ('v5p-128', 64), ('v6e-256', 256),
                                               ('v5litepod-256', 256)])
@pytest.mark.parametrize('loss', ['xla', 'pallas'])
def test_the_demo_pair_compiles_for_every_slice(topology, devices, loss):
  """One row of the demo's sequences per device."""
  config = salt_config('configs/demo.py', loss, f'--config.data.global_batch_size={devices}',
                       '--config.model.dtype=bfloat16')
  figures = dryrun.run(config, topology=topology, teacher_spec='configs/demo.py:slm')
  assert set(figures['stages']) == set(STAGES)


def test_a_config_too_big_for_its_slice_is_answered_in_one_line(capsys):
  with pytest.raises(UserError) as error:
    dryrun.run(config_lib.load('configs/paper.py:llm'), topology='v5p-8')
  message = str(error.value)
  assert '\n' not in message
  assert message.startswith('train step does not fit on 1 x v5p-8 (4 devices): its temporaries')
  assert 'GiB per device besides the' in message and 'a device has 95.73 GiB' in message
  assert message.endswith(dryrun.REMEDY)


def test_the_command_exits_2_with_the_one_line_answer(capsys):
  assert cli.main(['dryrun', '--config', 'configs/paper.py:llm', '--topology', 'v5p-8']) == 2
  err = capsys.readouterr().err
  assert 'train step does not fit on 1 x v5p-8' in err and 'Traceback' not in err


def test_a_gemma_3_style_model_compiles_with_windowed_splash_layers():
  """Issue 24: the families' switches on the demo model, compiled for a TPU: sliding
  windows on all but every 2nd layer (a cond between two splash kernels per layer),
  q/k norms, norms after each sublayer, q/k/v biases, a GELU MLP, a scaled embedding."""
  config = config_lib.load('configs/demo.py', [
      '--config.model.dtype=bfloat16', '--config.data.global_batch_size=4', '--config.model.sliding_window=128',
      '--config.model.global_layer_every=2', '--config.model.rope_local_theta=10000', '--config.model.qk_norm=True',
      '--config.model.post_norms=True', '--config.model.qkv_bias=True', '--config.model.mlp_activation=gelu_tanh',
      '--config.model.embed_scale=True'])
  figures = dryrun.run(config, topology='v5p-8')
  assert figures['stages']['train step']['need_bytes'] <= figures['device_bytes']
