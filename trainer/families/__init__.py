"""The Hugging Face model families salt imports and exports, one module each.

A family module holds what sets it apart from salt's base block: MODEL_TYPE and
ARCHITECTURE (config.json's model_type and class), `from_hf(config) -> dict` (salt's
`model` settings; UserError for a field salt cannot honour), `to_hf(cfg) -> dict` (its
config.json fields) and `tensors(cfg) -> (outer, layer)` (each salt parameter's
Hugging Face tensor, both ways). What they share is in `common`. Adding a family is a
module here, its line in FAMILIES, and its test.
"""

from types import ModuleType

from trainer.errors import UserError
from trainer.families import common, gemma3, llama, mistral, qwen2
from trainer.model import ModelConfig

FAMILIES = {family.MODEL_TYPE: family for family in (llama, mistral, qwen2, gemma3)}


def for_config(hf: dict) -> ModuleType:
  """The family of a Hugging Face config.json."""
  model_type = hf.get('model_type')
  if model_type not in FAMILIES:
    raise UserError(f'{common.CONFIG} model_type={model_type!r}: salt imports the families '
                    f'{", ".join(FAMILIES)}')
  family = FAMILIES[model_type]
  architectures = hf.get('architectures') or [family.ARCHITECTURE]
  if [a.lower() for a in architectures] != [family.ARCHITECTURE.lower()]:
    raise UserError(f'{common.CONFIG} architectures={architectures}: salt imports {family.ARCHITECTURE} '
                    f'for model_type {model_type!r}')
  return family


def for_model(cfg: ModelConfig) -> ModuleType:
  """The family a salt model is exported as. Raises UserError where its settings are
  not that family's (they must read back from the family's own config.json)."""
  if cfg.family not in FAMILIES:
    raise UserError(f'model.family={cfg.family!r} must be one of {", ".join(FAMILIES)}')
  family = FAMILIES[cfg.family]
  hf = {'model_type': family.MODEL_TYPE, **family.to_hf(cfg)}
  expected = {**{key: getattr(ModelConfig, key) for key in _FEATURES}, **family.from_hf(hf)}
  lost = [key for key, value in expected.items() if getattr(cfg, key) != value]
  if lost:
    raise UserError(f'model.{lost[0]}={getattr(cfg, lost[0])!r} cannot be written as a {family.ARCHITECTURE}; '
                    'set model.family to one that has it')
  return family


# The settings that set a family apart; one a family does not read must keep its default.
_FEATURES = ('qkv_bias', 'qk_norm', 'post_norms', 'mlp_activation', 'embed_scale', 'norm_plus_one',
             'sliding_window', 'global_layer_every', 'rope_local_theta')
