"""`salt sample`: decoding with the KV cache equals the full forward pass, sampling is
reproducible and filters as it says, and the command runs from a trained checkpoint."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers import tiny_config
from trainer import cli, decode, sharding, train
from trainer.config import defaults
from trainer.model import ModelConfig, Transformer, empty_cache

LLAMA = ModelConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
                    dtype='float32')
CONFIGS = {
    'llama': LLAMA,
    'qwen2-biases': dataclasses.replace(LLAMA, family='qwen2', qkv_bias=True, tie_embeddings=True),
    'gemma3-windowed-and-global': dataclasses.replace(
        LLAMA, family='gemma3_text', qk_norm=True, post_norms=True, mlp_activation='gelu_tanh', embed_scale=True,
        norm_plus_one=True, sliding_window=4, global_layer_every=2, rope_local_theta=100.0),
    'mistral-window': dataclasses.replace(LLAMA, family='mistral', sliding_window=5),
}
# Rows of different lengths; the 17-token one pads the batch to 32.
PROMPT_LENGTHS = (3, 17, 9)
RULES = sharding.parse_rules(defaults().sharding)


def random_params(cfg: ModelConfig) -> tuple[Transformer, dict]:
  """A model whose every parameter is perturbed, so that zero-initialised biases and
  norms take part."""
  with nnx.use_eager_sharding(False):
    model = Transformer(cfg, nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda x: np.asarray(x) + 0.1 * rng.standard_normal(x.shape).astype(np.float32), params)
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
  return model, params


def prompts(vocab: int, lengths=PROMPT_LENGTHS) -> list[np.ndarray]:
  rng = np.random.default_rng(2)
  return [rng.integers(0, vocab, n).astype(np.int32) for n in lengths]


def full_logits(model: Transformer, ids: np.ndarray) -> np.ndarray:
  """[L, V]: the uncached forward pass over one document."""
  tokens = jnp.asarray(ids)[None]
  h = model(tokens, jnp.arange(len(ids))[None], jnp.ones_like(tokens))
  return np.asarray(decode.logits(model, h[0]))


def mesh_of(devices: int):
  sizes = {'data': 1, 'fsdp': 1, 'tensor': 1} if devices == 1 else {'data': 2, 'fsdp': 2, 'tensor': 2}
  return sharding.make_mesh(sizes, jax.devices()[:devices])


@pytest.mark.parametrize('name', CONFIGS)
def test_cached_logits_equal_the_full_forward_pass(name):
  cfg = CONFIGS[name]
  model, _ = random_params(cfg)
  rows, extra, padded = prompts(cfg.vocab_size), 8, 32
  whole = [np.concatenate([p, q]) for p, q in zip(rows, prompts(cfg.vocab_size, (extra,) * len(rows)))]
  lengths = np.array([len(p) for p in rows])
  tokens = np.zeros((len(rows), padded), np.int32)
  for i, p in enumerate(rows):
    tokens[i, padded - len(p):] = p
  positions = np.maximum(np.arange(padded) - (padded - lengths)[:, None], -1)
  h, cache = model.decode(jnp.asarray(tokens), jnp.asarray(positions), empty_cache(cfg, len(rows), padded + extra), 0)
  cached = [decode.logits(model, h[:, -1])]
  for t in range(extra - 1):  # feed each row's next token of its document
    fed = np.array([w[n + t] for w, n in zip(whole, lengths)])[:, None]
    h, cache = model.decode(jnp.asarray(fed), jnp.asarray(lengths + t)[:, None], cache, padded + t)
    cached.append(decode.logits(model, h[:, 0]))
  cached = np.stack(cached, axis=1)
  for i, (w, n) in enumerate(zip(whole, lengths)):
    np.testing.assert_allclose(cached[i], full_logits(model, w)[n - 1:n + extra - 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('devices', [1, 8])
@pytest.mark.parametrize('name', CONFIGS)
def test_greedy_decoding_with_the_cache_is_the_argmax_of_the_full_forward_pass(name, devices):
  cfg = CONFIGS[name]
  model, params = random_params(cfg)
  rows, new = prompts(cfg.vocab_size), 10
  decoder = decode.Decoder(cfg, params, mesh_of(devices), RULES)
  generated = decoder.generate(rows, decode.Sampling(max_tokens=new, temperature=0), eos_id=None)
  for prompt, ids in zip(rows, generated):
    assert len(ids) == new
    argmax = full_logits(model, np.concatenate([prompt, ids])).argmax(-1)
    np.testing.assert_array_equal(ids, argmax[len(prompt) - 1:-1])


def test_the_cache_is_split_over_the_batch_axes_and_the_kv_heads():
  cfg = CONFIGS['llama']
  decoder = decode.Decoder(cfg, random_params(cfg)[1], mesh_of(8), RULES)
  _, cache = decoder._prefill(decoder.params, jnp.zeros((4, 16), jnp.int32), jnp.zeros((4, 16), jnp.int32),
                              jax.random.key(0), length=20, rule=(0.0, 0, 1.0, cfg.vocab_size))
  assert cache.k_NxBxSxKxE.sharding.spec == jax.sharding.PartitionSpec(None, ('data', 'fsdp'), None, 'tensor', None)
  assert cache.positions_BxS.sharding.spec == jax.sharding.PartitionSpec(('data', 'fsdp'), None)


def test_the_same_seed_gives_the_same_tokens_and_top_k_1_is_greedy():
  cfg = CONFIGS['llama']
  decoder = decode.Decoder(cfg, random_params(cfg)[1], mesh_of(8), RULES)
  rows = prompts(cfg.vocab_size)

  def run(rows=rows, **sampling):
    return np.stack(decoder.generate(rows, decode.Sampling(max_tokens=12, **sampling), eos_id=None))

  drawn = run(temperature=1.0, seed=7)
  np.testing.assert_array_equal(run(temperature=1.0, seed=7), drawn)
  assert not np.array_equal(run(temperature=1.0, seed=8), drawn)
  np.testing.assert_array_equal(run(temperature=1.0, top_k=1, seed=7), run(temperature=0))
  # A prompt's draws do not depend on the prompts after it (nor on the padding they bring).
  np.testing.assert_array_equal(run(rows[:1], temperature=1.0, seed=7), drawn[:1])


def test_generation_stops_at_eos_and_leaves_it_out():
  cfg = CONFIGS['llama']
  decoder = decode.Decoder(cfg, random_params(cfg)[1], mesh_of(1), RULES)
  rows = prompts(cfg.vocab_size)
  greedy = decoder.generate(rows, decode.Sampling(max_tokens=10, temperature=0), eos_id=None)
  eos = int(greedy[0][3])
  stopped = decoder.generate(rows, decode.Sampling(max_tokens=10, temperature=0), eos_id=eos)
  for ids, full in zip(stopped, greedy):
    cut = np.flatnonzero(full == eos)
    np.testing.assert_array_equal(ids, full[:cut[0]] if cut.size else full)
  # Ids past `allowed` (vocabulary padding) are never chosen.
  allowed = decoder.generate(rows, decode.Sampling(max_tokens=10, temperature=0), eos_id=None, allowed=8)
  assert all((ids < 8).all() for ids in allowed)


def test_top_k_and_top_p_keep_the_most_likely_tokens():
  p = np.array([[0.05, 0.5, 0.1, 0.3, 0.05]])
  logits = jnp.log(jnp.asarray(p))

  def kept(**kw):
    return np.isfinite(np.asarray(decode.filter_logits(logits, **kw)))[0].tolist()

  assert kept(top_k=0, top_p=1.0) == [True] * 5
  assert kept(top_k=2, top_p=1.0) == [False, True, False, True, False]
  assert kept(top_k=0, top_p=0.75) == [False, True, False, True, False]  # 0.5 + 0.3 reaches 0.75
  assert kept(top_k=0, top_p=0.85) == [False, True, True, True, False]
  assert kept(top_k=0, top_p=0.1) == [False, True, False, False, False]  # the most likely always stays
  assert kept(top_k=1, top_p=0.99) == [False, True, False, False, False]
  # top-p applies to what top-k keeps, renormalised: 0.5 / 0.9 < 0.6 <= 0.8 / 0.9.
  assert kept(top_k=3, top_p=0.6) == [False, True, False, True, False]
  kept_values = np.asarray(decode.filter_logits(logits, top_k=2, top_p=1.0))[0]
  np.testing.assert_array_equal(kept_values[[1, 3]], np.asarray(logits)[0, [1, 3]])
  draws = decode.choose_tokens(jnp.repeat(logits, 2000, axis=0), jax.random.split(jax.random.key(0), 2000),
                               temperature=1.0, top_k=0, top_p=0.75)
  share = np.bincount(np.asarray(draws), minlength=5) / 2000
  np.testing.assert_allclose(share, [0, 0.5 / 0.8, 0, 0.3 / 0.8, 0], atol=0.04)


@pytest.fixture(scope='module')
def trained(tiny_data, tmp_path_factory):
  config = tiny_config(tiny_data)
  config.total_steps = 6
  run = tmp_path_factory.mktemp('sample') / 'run'
  train.train(config, run)
  return run / 'checkpoints' / '6'


@pytest.mark.slow
def test_salt_sample_prints_a_continuation_of_each_prompt(trained, tmp_path, capsys):
  assert cli.main(['sample', str(trained), '--prompt', 'the king speaks', '--max-tokens', '8', '--temperature',
                   '0']) == 0
  greedy = capsys.readouterr().out
  assert greedy.endswith('\n') and greedy.strip()
  assert cli.main(['sample', str(trained), '--prompt', 'the king speaks', '--max-tokens', '8', '--temperature',
                   '0.8', '--top-k', '20', '--top-p', '0.9', '--seed', '3']) == 0
  assert capsys.readouterr().out.strip()
  (tmp_path / 'prompts.txt').write_text('the queen\n\nthe fool runs over the castle and\n')
  assert cli.main(['sample', str(trained), '--prompts', str(tmp_path / 'prompts.txt'), '--max-tokens', '8',
                   '--temperature', '0']) == 0
  lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [line['prompt'] for line in lines] == ['the queen', 'the fool runs over the castle and']
  # Batched with another prompt, a prompt's greedy text is its text alone.
  (tmp_path / 'one.txt').write_text('the king speaks\nthe fool\n')
  assert cli.main(['sample', str(trained), '--prompts', str(tmp_path / 'one.txt'), '--max-tokens', '8',
                   '--temperature', '0']) == 0
  assert json.loads(capsys.readouterr().out.splitlines()[0])['continuation'] == greedy[:-1]


@pytest.mark.slow
def test_the_streamed_text_is_the_continuation(trained):
  pieces = []
  texts = decode.sample(trained, ['the crown'], decode.Sampling(max_tokens=10, seed=1), stream=pieces.append)
  assert len(pieces) > 1 and ''.join(pieces) == texts[0]


@pytest.mark.slow
@pytest.mark.parametrize('args, message', [
    (['--prompt', 'x'], 'is not a salt checkpoint'),  # run in a directory that holds none
    ([], 'no prompt: give --prompt TEXT or --prompts FILE'),
    (['--prompts', 'EMPTY'], 'holds no prompt (one per line)'),
    (['--prompt', 'the', '--max-tokens', '0'], '--max-tokens 0 must be at least 1'),
    (['--prompt', 'the', '--temperature', '-1'], '--temperature -1.0 must be a number >= 0'),
    (['--prompt', 'the', '--top-p', '0'], '--top-p 0.0 must be in (0, 1]'),
    (['--prompt', 'the', '--top-p', '1.5'], '--top-p 1.5 must be in (0, 1]'),
    (['--prompt', 'the', '--top-k', '-1'], '--top-k -1 must be >= 0'),
    (['--prompt', 'the', '--seed', str(2**40)], f'--seed {2**40} must be in [0, 2**32)'),
    (['--prompt', 'the king speaks', '--max-tokens', '30'], 'more than the model\'s 32 (data.seq_len)'),
    (['--prompt', ''], 'prompt 1 encodes to no tokens'),
])
def test_bad_input_is_one_line_and_exit_code_2(trained, tmp_path, capsys, args, message):
  (tmp_path / 'EMPTY').write_text('\n  \n')
  checkpoint = str(tmp_path / 'checkpoints' / '6') if message == 'is not a salt checkpoint' else str(trained)
  args = [str(tmp_path / 'EMPTY') if a == 'EMPTY' else a for a in args]
  assert cli.main(['sample', checkpoint, *args]) == 2
  err = capsys.readouterr().err
  assert message in err and err.count('\n') == 1, err
