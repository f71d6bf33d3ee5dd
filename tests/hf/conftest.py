"""The session's zoo of tiny Hugging Face models (tests/hf/families.py)."""

import pytest


@pytest.fixture(scope='session')
def zoo(tmp_path_factory):
  # Imported here, not above: torch and transformers are there only where the tier runs.
  from tests.hf.families import Zoo

  return Zoo(tmp_path_factory.mktemp('hf'))
