"""`salt import-teacher`: each family's model, imported and run by salt, computes the logits
transformers computes from the same directory, on rows of one document and on a packed
row of two."""

import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from tests.hf import FAMILIES, SEQ_LEN, requires_hf
from trainer import salt, sharding, step
from trainer.hf_import import import_teacher
from trainer.model import ModelConfig

pytestmark = requires_hf
ROW = 16
SPLIT = 9  # the packed row: a document of 9 tokens, then one of 7


def document_ids(zoo, name: str) -> list[np.ndarray]:
  """The token ids of the prepare documents, as the family's tokenizer gives them."""
  tokenizer = zoo.tokenizer(name)
  return [np.asarray(tokenizer(p.read_text(), add_special_tokens=False).input_ids) for p in zoo.documents()]


def salt_logits(checkpoint: str, tokens_BxL: np.ndarray, positions_BxL: np.ndarray,
                segment_ids_BxL: np.ndarray) -> np.ndarray:
  """[B, L, V] logits of the imported model as a salt teacher (its parameters restored in
  bfloat16 by salt.load_teacher), computed in float32: hidden states times the unembedding."""
  config = salt.teacher_metadata(checkpoint)['config']
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  teacher = salt.load_teacher(checkpoint, mesh, sharding.parse_rules(config['sharding']),
                              config['data']['tokenizer_sha256'])
  graphdef, _ = step.abstract_model(ModelConfig(**{**config['model'], 'dtype': 'float32'}))

  def forward(params, tokens, positions, segment_ids):
    model = nnx.merge(graphdef, params)
    return model(tokens, positions, segment_ids) @ model.unembedding().astype(jnp.float32)

  return np.asarray(jax.jit(forward)(teacher.params, *map(jnp.asarray, (tokens_BxL, positions_BxL, segment_ids_BxL))))


def assert_same_logits(got: np.ndarray, want: np.ndarray) -> None:
  """Equal to 1e-4 of the largest logit."""
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize('name', FAMILIES)
def test_the_imported_teacher_computes_transformers_logits(zoo, name):
  """Two rows, one document each: what transformers computes."""
  tokens = np.stack([ids[:ROW] for ids in document_ids(zoo, name)[:2]])
  positions = np.broadcast_to(np.arange(ROW), tokens.shape)
  got = salt_logits(zoo.teacher(name), tokens, positions, np.ones_like(tokens))
  assert_same_logits(got, zoo.logits(zoo.model(name), tokens))


@pytest.mark.parametrize('name', FAMILIES)
def test_the_imported_teacher_keeps_the_documents_of_a_packed_row_apart(zoo, name):
  """Two documents in one row (segment ids 1 and 2, positions from 0 in each): the logits
  transformers computes from each document alone."""
  first, second = (ids[:n] for ids, n in zip(document_ids(zoo, name)[2:4], (SPLIT, ROW - SPLIT)))
  row = np.concatenate([first, second])[None]
  positions = np.concatenate([np.arange(SPLIT), np.arange(ROW - SPLIT)])[None]
  segment_ids = np.repeat([1, 2], [SPLIT, ROW - SPLIT])[None]
  got = salt_logits(zoo.teacher(name), row, positions, segment_ids)
  model = zoo.model(name)
  want = np.concatenate([zoo.logits(model, first[None]), zoo.logits(model, second[None])], axis=1)
  assert_same_logits(got, want)


def test_a_gemma_teacher_computes_transformers_logits_whatever_its_norms(zoo, tmp_path):
  """Gemma scales by 1 + w. The tiny Gemma's w are chosen so that 1 + w is a bfloat16
  value too; a real checkpoint's w are any bfloat16 values, whose 1 + w mostly are not.
  The teacher, its parameters restored in bfloat16, must compute transformers' logits
  from those as well."""
  model_dir = shutil.copytree(zoo.model_dir('gemma3'), tmp_path / 'model')
  tensors = load_file(model_dir / 'model.safetensors')
  rng = np.random.default_rng(0)
  for key, w in tensors.items():
    if key.endswith('norm.weight'):
      tensors[key] = rng.normal(0, 0.5, w.shape).astype(ml_dtypes.bfloat16).astype(np.float32)
  save_file(tensors, model_dir / 'model.safetensors', metadata={'format': 'pt'})
  tokens = np.stack([ids[:ROW] for ids in document_ids(zoo, 'gemma3')[:2]])
  positions = np.broadcast_to(np.arange(ROW), tokens.shape)
  got = salt_logits(import_teacher(model_dir, tmp_path / 'teacher')['checkpoint'], tokens, positions,
                    np.ones_like(tokens))
  assert_same_logits(got, zoo.logits(zoo.load(model_dir), tokens))


def without_biases(model):
  for name, p in model.named_parameters():
    if name.endswith('.bias'):
      p.data.zero_()
  return model


# What sets a family apart, taken away from transformers' model.
WITHOUT = {
    'mistral-sliding-window': ('mistral', lambda zoo, d: zoo.load(d, sliding_window=SEQ_LEN)),
    'gemma3-sliding-window': ('gemma3', lambda zoo, d: zoo.load(d, sliding_window=SEQ_LEN)),
    'gemma3-local-rope-base': ('gemma3', lambda zoo, d: zoo.load(d, rope_parameters={
        kind: {'rope_type': 'default', 'rope_theta': 1e6} for kind in ('full_attention', 'sliding_attention')})),
    'llama3-rope-scaling': ('llama3', lambda zoo, d: zoo.load(d, rope_parameters={
        'rope_type': 'default', 'rope_theta': 500000.0})),
    'qwen2-biases': ('qwen2', lambda zoo, d: without_biases(zoo.load(d))),
}


@pytest.mark.parametrize('case', WITHOUT)
def test_the_comparisons_see_what_sets_each_family_apart(zoo, case):
  """The logits of a model without its family's feature differ from its own by 100 times
  what the tests above allow: a salt that left the feature out would fail them."""
  name, change = WITHOUT[case]
  tokens = np.stack([ids[:ROW] for ids in document_ids(zoo, name)[:2]])
  want = zoo.logits(zoo.model(name), tokens)
  changed = zoo.logits(change(zoo, zoo.model_dir(name)), tokens)
  assert np.abs(changed - want).max() > 100 * 1e-4 * np.abs(want).max()
