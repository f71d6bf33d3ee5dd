"""configs/paper.py: every preset validates and compiles, and its arms differ only where the paper's do."""

import re

import pytest

from configs import paper
from trainer import cli
from trainer import config as config_lib

PRESETS = ['slm', 'llm', 'llm8b'] + [f'{size}_{arm}' for size in ('llm', 'llm8b') for arm in paper.ARMS]
# The paper's models at a size a CPU compiles in seconds; everything else as the preset has it.
REDUCED = ['--config.model.vocab_size=320', '--config.model.d_model=64', '--config.model.n_layers=2',
           '--config.model.n_heads=4', '--config.model.n_kv_heads=4', '--config.model.head_dim=16',
           '--config.model.d_ff=128', '--config.data.seq_len=32', '--config.data.global_batch_size=8']


def flat(config) -> dict:
  out = {}

  def walk(prefix, tree):
    for key, value in tree.items():
      walk(f'{prefix}{key}.', value) if isinstance(value, dict) else out.__setitem__(prefix + key, value)

  walk('', config.to_dict())
  return out


def differences(a: str, b: str) -> dict:
  x, y = flat(paper.get_config(a)), flat(paper.get_config(b))
  return {k: y[k] for k in x if x[k] != y[k]}


def test_the_arms_differ_only_in_what_the_paper_s_arms_differ_in():
  for size in ('llm', 'llm8b'):
    assert differences(size, f'{size}_baseline') == {}
    assert differences(f'{size}_baseline', f'{size}_rkd') == {'salt.n_kd': paper.TOTAL_STEPS}
    assert differences(f'{size}_baseline', f'{size}_salt') == {'salt.n_kd': paper.N_KD}
    assert differences(f'{size}_salt', f'{size}_salt_ds') == {'data.selection.scores': 'scores.npy'}
  assert set(differences('llm_salt', 'llm8b_salt')) == {f'model.{k}' for k in ('d_model', 'n_layers', 'n_heads',
                                                                               'n_kv_heads', 'd_ff')}


def test_the_models_have_the_paper_s_parameter_counts():
  from trainer.model import ModelConfig, param_count

  counts = {size: param_count(ModelConfig(**paper.get_config(size).model)) / 1e9 for size in paper.SIZES}
  assert counts == pytest.approx({'slm': 1.5, 'llm': 2.8, 'llm8b': 8.6}, abs=0.05)


def test_an_unknown_preset_lists_the_presets():
  with pytest.raises(ValueError, match='takes one of slm, llm_baseline, llm_rkd, llm_salt, llm_salt_ds, '
                                       'llm8b_baseline.*got \'llm_kd\''):
    paper.get_config('llm_kd')


@pytest.mark.slow
@pytest.mark.parametrize('preset', PRESETS)
def test_every_preset_compiles_and_runs_in_a_dry_run_at_a_reduced_size(preset, tmp_path, capsys):
  teacher = tmp_path / 'teacher.py'
  teacher.write_text('from configs.paper import get_config as paper\n'
                     'def get_config(arg=None):\n'
                     '  c = paper("slm")\n'
                     '  c.model.update(vocab_size=320, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=16,'
                     ' d_ff=64)\n'
                     '  return c\n')
  distils = config_lib.load(f'configs/paper.py:{preset}').salt.n_kd > 0
  extra = [f'--config.salt.teacher={tmp_path}/slm/checkpoints/1', '--teacher-config', str(teacher)] if distils else []
  assert cli.main(['dryrun', '--config', f'configs/paper.py:{preset}', *REDUCED, '--steps', '1', *extra]) == 0
  out = capsys.readouterr().out
  first = 'stage 1 (distillation)' if distils else 'train step'
  assert re.search(rf'{re.escape(first)}: 2 steps, loss [\d.]+', out), out
  assert re.search(r'checkpoint: saved step \d+ to .+, restored it: bitwise equal', out)
