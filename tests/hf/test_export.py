"""`salt export` of an imported teacher: transformers loads it back as the family's own
architecture, computes the original model's logits, and its tokenizer gives the
original's ids."""

import numpy as np
import pytest

from tests.hf import FAMILIES, requires_hf

pytestmark = requires_hf


@pytest.mark.parametrize('name', FAMILIES)
def test_transformers_loads_the_export_as_the_family_with_its_logits(zoo, name):
  exported = zoo.exported(name)
  model = zoo.load(exported)
  original = zoo.model(name)
  assert type(model).__name__ == type(original).__name__ == FAMILIES[name]
  vocab = original.config.vocab_size
  tokens = np.stack([np.linspace(0, vocab - 1, 24).astype(int), np.random.default_rng(0).integers(0, vocab, 24)])
  want = zoo.logits(original, tokens)
  np.testing.assert_allclose(zoo.logits(model, tokens), want, rtol=0, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize('name', FAMILIES)
def test_the_export_s_tokenizer_gives_the_original_s_ids(zoo, name):
  """The same ids for each document, the same EOS, and the text back from the ids."""
  original, exported = zoo.tokenizer(name), zoo.load_tokenizer(zoo.exported(name))
  for path in zoo.documents():
    text = path.read_text()
    ids = original(text, add_special_tokens=False).input_ids
    assert exported(text, add_special_tokens=False).input_ids == ids
    assert exported.decode(ids) == text
  assert exported.eos_token_id == original.eos_token_id


@pytest.mark.parametrize('name', FAMILIES)
def test_the_export_s_tokenizer_adds_no_bos(zoo, name):
  """As hf_export says: salt's documents never begin with BOS, so what evaluates the export
  must not put one first."""
  original, exported = zoo.tokenizer(name), zoo.load_tokenizer(zoo.exported(name))
  text = zoo.documents()[0].read_text()
  assert exported(text).input_ids == original(text, add_special_tokens=False).input_ids
