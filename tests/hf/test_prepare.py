"""`salt prepare --tokenizer MODEL_DIR`: each family's model directory tokenizes the
documents as transformers' AutoTokenizer does, each ending with its EOS."""

import numpy as np
import pytest

from tests.hf import FAMILIES, RECORD_TOKENS, requires_hf
from trainer.data import TokenStream

pytestmark = requires_hf


def prepared_documents(data_dir) -> list[list[int]]:
  """Each document's ids, joined from its records (a document spans several)."""
  stream = TokenStream(data_dir, 'train', seq_len=1)
  records = stream.record_tokens(list(range(len(stream.records))))
  documents = {}
  for k in np.lexsort((stream.start, stream.document)):
    documents.setdefault(int(stream.document[k]), []).extend(records[k].tolist())
  return [documents[d] for d in sorted(documents)]


@pytest.mark.parametrize('name', FAMILIES)
def test_prepare_gives_the_ids_of_the_family_s_tokenizer(zoo, name):
  tokenizer = zoo.tokenizer(name)
  want = [tokenizer(p.read_text(), add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
          for p in zoo.documents()]
  got = prepared_documents(zoo.prepared(name))
  assert max(map(len, want)) > RECORD_TOKENS  # documents span records
  assert got == want
