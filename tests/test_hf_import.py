"""`salt import-teacher`: tiny random models of each family in Hugging Face's layout,
imported and run by salt, give the logits of an independent NumPy implementation
(tests/hf holds them to transformers' own)."""

import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from trainer import cli, salt, sharding, step
from trainer.errors import UserError
from trainer.hf_import import import_teacher
from trainer.model import ModelConfig
from trainer.prepare import file_sha256
from trainer.tokenizer import sentencepiece_sha256 as tokenizer_sha256
from trainer.score import score

V = 320  # the vocabulary of the tiny_data fixture's tokenizer, which the model ships
TOKENS = np.random.default_rng(1).integers(0, V, 24)


def llama_config(**changes) -> dict:
  return {'architectures': ['LlamaForCausalLM'], 'model_type': 'llama', 'vocab_size': V, 'hidden_size': 32,
          'intermediate_size': 48, 'num_hidden_layers': 2, 'num_attention_heads': 4, 'num_key_value_heads': 2,
          'hidden_act': 'silu', 'max_position_embeddings': 64, 'rms_norm_eps': 1e-5, 'rope_theta': 10000.0,
          'rope_scaling': None, 'attention_bias': False, 'mlp_bias': False, 'tie_word_embeddings': False,
          **changes}


def dims(hf: dict) -> tuple[int, int, int, int, int]:
  H = hf['num_attention_heads']
  return hf['hidden_size'], H, hf['num_key_value_heads'], hf.get('head_dim') or hf['hidden_size'] // H, \
      hf['intermediate_size']


def random_weights(hf: dict, seed: int = 0) -> dict[str, np.ndarray]:
  """Hugging Face tensor names and [out, in] shapes; norms near 1 so that they matter."""
  rng = np.random.default_rng(seed)
  D, H, K, E, F = dims(hf)

  def linear(out, inp):
    return rng.normal(0, inp ** -0.5, (out, inp)).astype(np.float32)

  def norm(size=D):
    return (1 + 0.2 * rng.normal(size=size)).astype(np.float32)

  w = {'model.embed_tokens.weight': rng.normal(size=(hf['vocab_size'], D)).astype(np.float32),
       'model.norm.weight': norm()}
  for i in range(hf['num_hidden_layers']):
    p = f'model.layers.{i}.'
    w.update({p + 'input_layernorm.weight': norm(), p + 'post_attention_layernorm.weight': norm(),
              p + 'self_attn.q_proj.weight': linear(H * E, D), p + 'self_attn.k_proj.weight': linear(K * E, D),
              p + 'self_attn.v_proj.weight': linear(K * E, D), p + 'self_attn.o_proj.weight': linear(D, H * E),
              p + 'mlp.gate_proj.weight': linear(F, D), p + 'mlp.up_proj.weight': linear(F, D),
              p + 'mlp.down_proj.weight': linear(D, F)})
    if hf['model_type'] == 'qwen2':
      w.update({p + f'self_attn.{x}_proj.bias': rng.normal(0, 0.5, n * E).astype(np.float32)
                for x, n in (('q', H), ('k', K), ('v', K))})
    if hf['model_type'] == 'gemma3_text':
      w.update({p + 'pre_feedforward_layernorm.weight': norm(), p + 'post_feedforward_layernorm.weight': norm(),
                p + 'self_attn.q_norm.weight': norm(E), p + 'self_attn.k_norm.weight': norm(E)})
  if not hf['tie_word_embeddings']:
    w['lm_head.weight'] = linear(hf['vocab_size'], D)
  return w


def write_model(directory, hf: dict, weights: dict, *, tokenizer=None, shards: int = 1, dtype=np.float32):
  """A model directory as Hugging Face writes it: config.json, safetensors (sharded with an index)."""
  directory.mkdir(parents=True, exist_ok=True)
  (directory / 'config.json').write_text(json.dumps(hf))
  tensors = {name: w.astype(dtype) if w.dtype.kind == 'f' else w for name, w in weights.items()}
  if shards == 1:
    save_file(tensors, directory / 'model.safetensors')
  else:
    names, weight_map = sorted(tensors), {}
    for s in range(shards):
      file = f'model-{s + 1:05d}-of-{shards:05d}.safetensors'
      save_file({n: tensors[n] for n in names[s::shards]}, directory / file)
      weight_map.update(dict.fromkeys(names[s::shards], file))
    (directory / 'model.safetensors.index.json').write_text(json.dumps({'metadata': {}, 'weight_map': weight_map}))
  if tokenizer:
    shutil.copyfile(tokenizer, directory / 'tokenizer.model')
  return directory


# The NumPy reference, from the Hugging Face Llama code: float64, its own names and layout.

def reference_inv_freq(hf: dict) -> np.ndarray:
  _, _, _, E, _ = dims(hf)
  rope = hf.get('rope_parameters') or hf.get('rope_scaling') or {}
  inv_freq = 1.0 / rope.get('rope_theta', hf.get('rope_theta')) ** (np.arange(0, E, 2) / E)
  kind = rope.get('rope_type', rope.get('type', 'default'))
  if kind == 'linear':
    return inv_freq / rope['factor']
  if kind == 'llama3':
    factor, low, high = rope['factor'], rope['low_freq_factor'], rope['high_freq_factor']
    old_context = rope['original_max_position_embeddings']
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
    return np.where(medium, smoothed, scaled)
  return inv_freq


def reference_logits(hf: dict, weights: dict, tokens: np.ndarray) -> np.ndarray:
  """[L, V] logits of the Hugging Face model (LlamaForCausalLM, or the Mistral, Qwen2 or
  Gemma 3 one its model_type names) on one sequence."""
  w = {k: v.astype(np.float64) for k, v in weights.items()}
  _, H, K, E, _ = dims(hf)
  eps, L = hf['rms_norm_eps'], len(tokens)
  gemma = hf['model_type'] == 'gemma3_text'

  def rms_norm(x, scale):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * (1 + scale if gemma else scale)

  def rotate_half(x):
    return np.concatenate([-x[..., E // 2:], x[..., :E // 2]], axis=-1)

  def heads(x, n):  # [L, n*E] -> [n, L, E]
    return x.reshape(L, n, E).transpose(1, 0, 2)

  def rotation(inv_freq):
    freqs = np.outer(np.arange(L), inv_freq)
    return np.cos(np.concatenate([freqs, freqs], -1)), np.sin(np.concatenate([freqs, freqs], -1))

  def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))

  causal = np.tril(np.ones((L, L), bool))
  distance = np.arange(L)[:, None] - np.arange(L)[None]
  x = w['model.embed_tokens.weight'][tokens] * (np.sqrt(hf['hidden_size']) if gemma else 1)
  for i in range(hf['num_hidden_layers']):
    p = f'model.layers.{i}.'
    windowed = hf.get('sliding_window') and (not gemma or hf['layer_types'][i] == 'sliding_attention')
    cos, sin = rotation(reference_inv_freq({**hf, 'rope_scaling': None, 'rope_theta': hf['rope_local_base_freq']}
                                           if gemma and windowed else hf))
    h = rms_norm(x, w[p + 'input_layernorm.weight'])
    q, k, v = (heads(h @ w[p + f'self_attn.{n}_proj.weight'].T + w.get(p + f'self_attn.{n}_proj.bias', 0), m)
               for n, m in (('q', H), ('k', K), ('v', K)))
    if gemma:
      q, k = rms_norm(q, w[p + 'self_attn.q_norm.weight']), rms_norm(k, w[p + 'self_attn.k_norm.weight'])
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    k, v = np.repeat(k, H // K, axis=0), np.repeat(v, H // K, axis=0)  # repeat_kv
    visible = causal & (distance < hf['sliding_window']) if windowed else causal
    scores = np.where(visible, q @ k.transpose(0, 2, 1) / np.sqrt(E), -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = (probs @ v).transpose(1, 0, 2).reshape(L, H * E) @ w[p + 'self_attn.o_proj.weight'].T
    if gemma:
      x = x + rms_norm(out, w[p + 'post_attention_layernorm.weight'])
      h = rms_norm(x, w[p + 'pre_feedforward_layernorm.weight'])
    else:
      x = x + out
      h = rms_norm(x, w[p + 'post_attention_layernorm.weight'])
    gate, up = h @ w[p + 'mlp.gate_proj.weight'].T, h @ w[p + 'mlp.up_proj.weight'].T
    out = ((gelu_tanh(gate) if gemma else gate / (1 + np.exp(-gate))) * up) @ w[p + 'mlp.down_proj.weight'].T
    x = x + (rms_norm(out, w[p + 'post_feedforward_layernorm.weight']) if gemma else out)
  lm_head = w['model.embed_tokens.weight'] if hf['tie_word_embeddings'] else w['lm_head.weight']
  return rms_norm(x, w['model.norm.weight']) @ lm_head.T


def teacher_logits(checkpoint: str, tokens: np.ndarray) -> np.ndarray:
  """[L, V] logits of the imported model as a salt teacher (bf16 parameters), computed in float32."""
  config = salt.teacher_metadata(checkpoint)['config']
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  teacher = salt.load_teacher(checkpoint, mesh, sharding.parse_rules(config['sharding']),
                              config['data']['tokenizer_sha256'])
  graphdef, _ = step.abstract_model(ModelConfig(**{**config['model'], 'dtype': 'float32'}))

  def forward(params, tokens_1xL):
    model = nnx.merge(graphdef, params)
    positions = jnp.arange(tokens_1xL.shape[1])[None]
    h_1xLxD = model(tokens_1xL, positions, jnp.ones_like(tokens_1xL))
    return h_1xLxD @ model.unembedding().astype(jnp.float32)

  return np.asarray(jax.jit(forward)(teacher.params, jnp.asarray(tokens)[None]))[0]


def bf16(weights: dict) -> dict:
  """The weights as the teacher holds them."""
  return {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in weights.items()}


LLAMA3 = {'rope_type': 'llama3', 'factor': 4.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
          'original_max_position_embeddings': 32}

# theta 100 and an original context of 32 put the frequencies of head_dim 8 in all
# three llama3 bands: kept (wavelength < 8), blended, divided (> 32).
CASES = {
    'gqa-untied-float32': (llama_config(), {}),
    'tied-sharded-bfloat16': (llama_config(tie_word_embeddings=True),
                              dict(shards=3, dtype=ml_dtypes.bfloat16)),
    'rope-llama3': (llama_config(rope_theta=100.0, rope_scaling=LLAMA3), dict(shards=2)),
    'rope-linear': (llama_config(rope_scaling={'type': 'linear', 'factor': 3.0}), {}),
    'mistral-head-dim-float16': (llama_config(architectures=['MistralForCausalLM'], model_type='mistral',
                                              sliding_window=None, head_dim=16, num_key_value_heads=4),
                                 dict(dtype=np.float16)),
    'rope-parameters-of-transformers-5': (
        llama_config(rope_theta=None, rope_scaling=None, rope_parameters={**LLAMA3, 'rope_theta': 100.0}), {}),
    # Issue 24: the families. A window shorter than the 24 tokens, on every layer (Mistral)
    # or on all but every 2nd, with its own RoPE base (Gemma 3).
    'mistral-sliding-window': (llama_config(architectures=['MistralForCausalLM'], model_type='mistral',
                                            sliding_window=5), {}),
    'qwen2-biases-tied': (llama_config(architectures=['Qwen2ForCausalLM'], model_type='qwen2',
                                       tie_word_embeddings=True, rope_theta=1000.0), {}),
    'gemma3-windowed-and-global-layers': (
        llama_config(architectures=['Gemma3ForCausalLM'], model_type='gemma3_text', num_hidden_layers=3,
                     hidden_act='gelu_pytorch_tanh', tie_word_embeddings=True, head_dim=8, query_pre_attn_scalar=8,
                     sliding_window=5, sliding_window_pattern=2, rope_theta=1000.0, rope_local_base_freq=10.0,
                     rope_scaling={'rope_type': 'linear', 'factor': 2.0},
                     layer_types=['sliding_attention', 'full_attention', 'sliding_attention']),
        dict(shards=2, dtype=ml_dtypes.bfloat16)),
}


@pytest.mark.parametrize('case', CASES)
def test_the_imported_teacher_computes_the_logits_of_the_hugging_face_model(case, sp_model, tmp_path):
  hf, layout = CASES[case]
  dtype = layout.get('dtype', np.float32)
  weights = {k: v.astype(dtype).astype(np.float32) for k, v in random_weights(hf).items()}  # as stored
  summary = import_teacher(write_model(tmp_path / 'hf', hf, weights, tokenizer=sp_model, **layout),
                           tmp_path / 'out')
  want = reference_logits(hf, bf16(weights), TOKENS)
  got = teacher_logits(summary['checkpoint'], TOKENS)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_rope_scaling_changes_the_logits():
  """The scaled cases above test something: without the scaling the logits differ."""
  hf, _ = CASES['rope-llama3']
  weights = random_weights(hf)
  plain = reference_logits({**hf, 'rope_scaling': None}, weights, TOKENS)
  assert np.abs(reference_logits(hf, weights, TOKENS) - plain).max() > 0.1 * np.abs(plain).max()


def test_the_import_writes_the_config_and_the_tokenizer_and_salt_scores_with_it(sp_model, tiny_data, tmp_path):
  hf = llama_config(rope_scaling=LLAMA3, rope_theta=500000.0)
  write_model(tmp_path / 'hf', hf, random_weights(hf), tokenizer=sp_model)
  assert cli.main(['import-teacher', str(tmp_path / 'hf'), str(tmp_path / 'out')]) == 0

  config = json.loads((tmp_path / 'out' / 'config.json').read_text())['config']
  assert config['data']['tokenizer_sha256'] == tokenizer_sha256(tmp_path / 'out' / 'tokenizer.model') \
      == tokenizer_sha256(sp_model)
  assert config['data']['seq_len'] == 64  # max_position_embeddings
  assert {k: config['model'][k] for k in ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads',
                                          'head_dim', 'd_ff', 'norm_eps', 'tie_embeddings')} == \
      dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48, norm_eps=1e-5,
           tie_embeddings=False)
  assert {k: v for k, v in config['model'].items() if k.startswith('rope')} == dict(
      rope_theta=500000.0, rope_scaling='llama3', rope_scaling_factor=4.0, rope_low_freq_factor=1.0,
      rope_high_freq_factor=4.0, rope_original_max_positions=32, rope_local_theta=0.0)
  # salt score --teacher: the data was prepared with the teacher's tokenizer.
  summary = score(str(tmp_path / 'out' / 'checkpoints' / '0'), tiny_data, output=tmp_path / 'scores.npy',
                  progress=False)
  assert summary['scored'] > 0


def without(weights: dict, name: str) -> dict:
  return {k: v for k, v in weights.items() if k != name}


@pytest.mark.parametrize('changes, match', [
    (dict(model_type='gpt2', architectures=['GPT2LMHeadModel']), "model_type='gpt2'"),
    (dict(architectures=['LlamaForSequenceClassification']), "salt imports LlamaForCausalLM for model_type 'llama'"),
    # Issue 24: a family's field salt cannot honour is named, with what to do.
    (dict(model_type='qwen2', architectures=['Qwen2ForCausalLM'], use_sliding_window=True, sliding_window=8),
     'use_sliding_window=True is not supported: salt windows every layer or every layer but each n-th'),
    (dict(model_type='gemma3_text', architectures=['Gemma3ForCausalLM'], hidden_act='gelu_pytorch_tanh', head_dim=8,
          query_pre_attn_scalar=256),
     'query_pre_attn_scalar=256 is not supported: .* set it to head_dim=8'),
    (dict(model_type='gemma3_text', architectures=['Gemma3ForCausalLM'], hidden_act='gelu_pytorch_tanh',
          final_logit_softcapping=30.0),
     'final_logit_softcapping=30.0 is not supported: salt does not cap output logits'),
    (dict(model_type='gemma3_text', architectures=['Gemma3ForCausalLM'], hidden_act='gelu'),
     "hidden_act='gelu' is not supported: salt's Gemma MLP is GELU with the tanh approximation"),
    (dict(model_type='gemma3_text', architectures=['Gemma3ForCausalLM'], hidden_act='gelu_pytorch_tanh',
          layer_types=['full_attention', 'sliding_attention'], sliding_window=4),
     r"layer_types=\['full_attention', 'sliding_attention'\] is not supported: salt windows every layer but each"),
    (dict(attention_bias=True), 'attention_bias=True'),
    (dict(mlp_bias=True), 'mlp_bias=True'),
    (dict(hidden_act='gelu'), "hidden_act='gelu'"),
    (dict(rope_scaling={'rope_type': 'dynamic', 'factor': 2.0}), "rope_scaling type 'dynamic'"),
    (dict(rope_scaling={'rope_type': 'llama3', 'factor': 8.0}), "rope_scaling has no 'low_freq_factor'"),
    (dict(hidden_size=None), "config.json has no 'hidden_size'"),
    # Issue 16: wrong types were tracebacks.
    (dict(hidden_size='2048'), "config.json hidden_size='2048' must be a positive integer"),
    (dict(num_key_value_heads=2.5), 'config.json num_key_value_heads=2.5 must be a positive integer'),
    (dict(num_hidden_layers=0), 'config.json num_hidden_layers=0 must be a positive integer'),
    # Issue 23: these were tracebacks too.
    (dict(max_position_embeddings='2048'), "config.json max_position_embeddings='2048' must be a positive integer"),
    (dict(rope_theta=None), 'config.json rope_theta=None must be a positive number'),
    (dict(rms_norm_eps='x'), "config.json rms_norm_eps='x' must be a positive number"),
    (dict(rope_scaling={'rope_type': 'linear', 'factor': 'x'}),
     "config.json rope_scaling factor='x' must be a positive number"),
])
def test_an_unsupported_config_is_refused_naming_the_field(changes, match, sp_model, tmp_path):
  hf = llama_config()
  write_model(tmp_path / 'hf', {**hf, **changes}, random_weights(hf), tokenizer=sp_model)
  with pytest.raises(UserError, match=match):
    import_teacher(tmp_path / 'hf', tmp_path / 'out')
  assert not (tmp_path / 'out').exists()


def test_a_config_that_is_not_a_json_object_is_one_line(sp_model, tmp_path, capsys):
  """Issue 23: a top-level list was a traceback."""
  hf = llama_config()
  model = write_model(tmp_path / 'hf', hf, random_weights(hf), tokenizer=sp_model)
  (model / 'config.json').write_text(json.dumps([hf]))
  assert cli.main(['import-teacher', str(model), str(tmp_path / 'out')]) == 2
  assert f'{model / "config.json"} holds a JSON list, not an object of settings' in capsys.readouterr().err


def test_a_tokenizer_that_is_not_one_or_has_more_tokens_than_the_model_is_refused(sp_model, tmp_path):
  """Issue 24: tokenizer.json is read like tokenizer.model now; refused are files that are
  neither, and tokenizers with more tokens than the model has rows. Fewer is a
  vocabulary padded for speed (Qwen2.5's), accepted."""
  hf = llama_config()
  model = write_model(tmp_path / 'hf', hf, random_weights(hf))
  (model / 'tokenizer.json').write_text('a tiktoken vocabulary')
  with pytest.raises(UserError, match='tokenizer.json is neither a sentencepiece model nor a Hugging Face'):
    import_teacher(model, tmp_path / 'out')
  # --tokenizer gives one; its vocabulary must fit the model's.
  import_teacher(model, tmp_path / 'out', tokenizer=sp_model)
  assert file_sha256(tmp_path / 'out' / 'tokenizer.model') == file_sha256(sp_model)
  small = write_model(tmp_path / 'small', llama_config(vocab_size=V - 1), random_weights(hf))
  with pytest.raises(UserError, match=f'has {V} tokens but config.json vocab_size={V - 1}'):
    import_teacher(small, tmp_path / 'out2', tokenizer=sp_model)
  padded_hf = llama_config(vocab_size=V + 16)
  padded = write_model(tmp_path / 'padded', padded_hf, random_weights(padded_hf), tokenizer=sp_model)
  assert import_teacher(padded, tmp_path / 'out3')['config']['model']['vocab_size'] == V + 16


@pytest.mark.parametrize('edit, match', [
    (lambda w: without(w, 'model.layers.1.mlp.up_proj.weight'), "no tensor 'model.layers.1.mlp.up_proj.weight'"),
    (lambda w: without(w, 'lm_head.weight'), "no tensor 'lm_head.weight'"),
    (lambda w: {**w, 'model.layers.0.self_attn.q_proj.bias': np.zeros(32, np.float32)},
     "tensor 'model.layers.0.self_attn.q_proj.bias'"),
    (lambda w: {**w, 'model.layers.0.self_attn.k_proj.weight': np.zeros((32, 32), np.float32)},
     r"'model.layers.0.self_attn.k_proj.weight' has shape \(32, 32\); config.json implies \(16, 32\)"),
    (lambda w: {**w, 'model.norm.weight': np.ones(32, np.int8)}, "'model.norm.weight' is I8"),
])
def test_missing_unexpected_or_misshapen_tensors_are_refused(edit, match, sp_model, tmp_path):
  hf = llama_config()
  write_model(tmp_path / 'hf', hf, edit(random_weights(hf)), tokenizer=sp_model)
  with pytest.raises(UserError, match=match):
    import_teacher(tmp_path / 'hf', tmp_path / 'out')


def test_missing_files_and_a_used_output_are_refused(sp_model, tmp_path, capsys):
  assert cli.main(['import-teacher', str(tmp_path / 'nothing'), str(tmp_path / 'out')]) == 2
  assert 'has no config.json' in capsys.readouterr().err
  hf = llama_config()
  model = write_model(tmp_path / 'hf', hf, random_weights(hf), tokenizer=sp_model, shards=2)
  (model / 'model-00002-of-00002.safetensors').unlink()
  with pytest.raises(UserError, match='lists model-00002-of-00002.safetensors, which'):
    import_teacher(model, tmp_path / 'out')
  (model / 'model.safetensors.index.json').unlink()
  with pytest.raises(UserError, match='has neither model.safetensors nor model.safetensors.index.json'):
    import_teacher(model, tmp_path / 'out')
  (tmp_path / 'used').mkdir()
  (tmp_path / 'used' / 'config.json').write_text('{}')
  with pytest.raises(UserError, match='is not empty'):
    import_teacher(model, tmp_path / 'used')
