"""Each mistake a user can make in a config is one line that names the value and the fix."""

import subprocess
import sys

import pytest

from trainer import cli
from trainer import config as config_lib
from trainer.errors import UserError

DEMO = 'configs/demo.py'


def load_and_validate(*overrides, devices=8):
  config = config_lib.load(DEMO, list(overrides))
  config_lib.validate(config, devices)
  return config


def test_override_sets_nested_value_with_its_type():
  config = load_and_validate('--config.optim.lr=3e-4', '--config.model.n_layers', '2',
                             '--config.model.tie_embeddings=false', '--config.mesh.fsdp=2')
  assert config.optim.lr == 3e-4 and config.model.n_layers == 2
  assert config.model.tie_embeddings is False and config.mesh.fsdp == 2


def test_int_is_accepted_for_a_float_key():
  assert load_and_validate('--config.optim.lr=1').optim.lr == 1.0


@pytest.mark.parametrize('overrides, message', [
    (['--config.optim.lrr=1e-3'], "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
    (['--config.optimizer.lr=1e-3'], "unknown config key 'optimizer.lr'; did you mean 'optim'?"),
    (['--config.optim.lr=fast'], "config key 'optim.lr' wants a float, got 'fast'"),
    (['--config.model.n_layers=2.5'], "config key 'model.n_layers' wants a int, got '2.5'"),
    (['--config.data.global_batch_size=12'],
     'data.global_batch_size=12 does not divide over the batch axes data=8*fsdp=1; use a multiple of 8'),
    (['--config.mesh.data=2', '--config.mesh.tensor=2'],
     'mesh data=2 fsdp=1 tensor=2 needs 4 devices but 8 are available'),
    (['--config.mesh.data=-1', '--config.mesh.tensor=3'],
     'mesh data=-1 fsdp=1 tensor=3: the fixed axes (3 devices) do not divide the 8 devices available'),
    (['--config.mesh.fsdp=-1'], 'mesh data=-1 fsdp=-1 tensor=1 has more than one axis set to -1'),
    (['--config.model.remat=some'], "model.remat='some' must be one of ('save_everything', 'save_nothing', 'save_matmuls', 'save_attention', 'save_matmuls_and_attention')"),
    (['--config.model.n_kv_heads=3'], 'model.n_heads=4 must be a multiple of model.n_kv_heads=3'),
    # Issue 24: the families' switches.
    (['--config.model.family=gpt2'], "model.family='gpt2' must be one of ('llama', 'mistral', 'qwen2', 'gemma3_text')"),
    (['--config.model.mlp_activation=relu'], "model.mlp_activation='relu' must be one of ('silu', 'gelu_tanh')"),
    (['--config.model.sliding_window=-4'], 'model.sliding_window=-4 must not be negative'),
    (['--config.model.global_layer_every=6'],
     'model.global_layer_every and model.rope_local_theta apply to sliding-window layers: set model.sliding_window'),
    # Issue 16: zeros that were a ZeroDivisionError, a traceback, or "validation loss 0.000".
    (['--config.model.n_kv_heads=0'], 'model.n_kv_heads=0 must be positive'),
    (['--config.model.d_ff=0'], 'model.d_ff=0 must be positive'),
    (['--config.log.every_steps=0'], 'log.every_steps=0 must be positive'),
    (['--config.eval.every_steps=0'], 'eval.every_steps=0 must be positive'),
    (['--config.eval.batches=0'], 'eval.batches=0 must be positive'),
    # Issue 25: the evaluation tasks' settings.
    (['--config.eval.task_shots=-1'], 'eval.task_shots=-1 must be >= 0'),
    (['--config.eval.task_every_steps=-5'], 'eval.task_every_steps=-5 must be >= 0'),
    (['--config.data.global_batch_size=0'], 'data.global_batch_size=0 must be positive'),
    (['--config.sharding.mlp=model'], "sharding.mlp='model' names mesh axis 'model'"),
    # Issue 23, 5: optimizer values that trained "successfully" while the loss rose or nothing learned.
    (['--config.optim.lr=-1e-3'], 'optim.lr=-0.001 must be positive'),
    (['--config.optim.lr=1e999'], 'optim.lr=inf must be a finite number'),
    (['--config.optim.min_lr_ratio=-2'], 'optim.min_lr_ratio=-2.0 must be in [0, 1]'),
    (['--config.optim.clip_norm=0'], 'optim.clip_norm=0.0 must be positive'),
    (['--config.optim.b2=1.5'], 'optim.b2=1.5 must be in [0, 1)'),
    (['--config.optim.b1=-0.1'], 'optim.b1=-0.1 must be in [0, 1)'),
    (['--config.optim.eps=0'], 'optim.eps=0.0 must be positive'),
    (['--config.optim.weight_decay=-0.1'], 'optim.weight_decay=-0.1 must be >= 0'),
    (['--config.optim'], "override '--config.optim' has no value"),
    (['--config.optim=1'], "config key 'optim' is a group; set one of its keys"),
    (['--lr=1'], "unrecognized argument '--lr=1'"),
])
def test_bad_config_gives_its_message(overrides, message):
  with pytest.raises(UserError) as error:
    load_and_validate(*overrides)
  assert message in str(error.value)
  assert '\n' not in str(error.value)


def test_missing_config_file():
  with pytest.raises(UserError, match="config file 'configs/nope.py' does not exist"):
    config_lib.load('configs/nope.py')


def test_config_file_with_unknown_key(tmp_path):
  path = tmp_path / 'bad.py'
  path.write_text('from trainer.config import defaults\n'
                  'def get_config(arg=None):\n  c = defaults()\n  c.model.widht = 3\n  return c\n')
  with pytest.raises(UserError, match="sets unknown key 'model.widht'"):
    config_lib.load(str(path))


@pytest.mark.parametrize('spec', ['configs/demo.py', 'configs/demo.py:slm', 'configs/paper.py:slm',
                                  'configs/paper.py:llm'])
def test_shipped_configs_validate_on_their_meshes(spec):
  config = config_lib.load(spec)
  config_lib.validate(config, 8 if spec.startswith(DEMO) else 256)


def test_cli_prints_one_line_and_no_traceback(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'trainer.cli', 'train', '--config', DEMO, '--workdir', str(tmp_path),
       '--config.optim.lrr=1'], capture_output=True, text=True)
  assert result.returncode == 2
  assert result.stderr.strip() == "salt: error: unknown config key 'optim.lrr'; did you mean 'optim.lr'?"


@pytest.mark.parametrize('body, message', [
    ('def get_config(arg=None):\n  raise ValueError("no such size")\n',
     "raised ValueError: no such size"),
    ('import nowhere_to_be_found\n', "raised ModuleNotFoundError: No module named 'nowhere_to_be_found'"),
    ('def get_config(arg=None):\n  return {"total_steps": 3}\n',
     'returned a dict, not the ConfigDict of trainer.config.defaults()'),
])
def test_a_config_file_that_raises_or_returns_the_wrong_type_is_one_line(tmp_path, body, message):
  """Issue 16: these were tracebacks from inside the user's file."""
  path = tmp_path / 'bad.py'
  path.write_text(body)
  with pytest.raises(UserError) as error:
    config_lib.load(str(path))
  assert message in str(error.value) and '\n' not in str(error.value)


def test_a_workdir_that_cannot_be_written_is_one_line_with_exit_2(tmp_path, capsys):
  blocker = tmp_path / 'file'
  blocker.write_text('')
  code = cli.main(['train', '--config', 'configs/demo.py', '--workdir', str(blocker / 'run')])
  err = capsys.readouterr().err
  assert code == 2 and err.startswith('salt: error: Not a directory: ') and 'Traceback' not in err
