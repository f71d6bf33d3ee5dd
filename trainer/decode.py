"""`salt sample`: text from a checkpoint, one token a step, with a KV cache.

    salt sample RUN/checkpoints/STEP --prompt 'To be, or not'
    salt sample OUT/checkpoints/0 --prompts prompts.txt --temperature 0.8 --top-p 0.95

The prompts are left-padded to one length, a power of two (so that a new prompt length
seldom compiles again), and run through the model at once (the prefill), which fills
the cache; every row's last prompt token is then in the same slot, and each step feeds
the token just chosen in every row, its earlier tokens' keys and values read from the
cache. The prefill compiles once per padded length, the step once per cache length.

The parameters are sharded as the checkpoint's run trained them (its mesh and rules,
over this machine's devices) and stay float32; the model computes in its own dtype.
Rows (padded to a multiple of the batch shards) split over the batch axes, the cache
over those and the key/value heads.

Greedy at temperature 0; otherwise the logits divided by the temperature, filtered by
top-k and then top-p (nucleus), and drawn with a key made of the seed, the row and the
step, so a prompt's text depends on its place in the batch but on no other prompt.
"""

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from trainer import sharding, step
from trainer.checkpoint_files import checkpoint_tokenizer, read_checkpoint
from trainer.config import mesh_shape
from trainer.errors import UserError
from trainer.model import KVCache, ModelConfig, Transformer, empty_cache
from trainer.tokenizer import Tokenizer

SMALLEST_BUCKET = 16  # prompt tokens: shorter prompts pad to this
# (temperature, top_k, top_p, allowed ids): static, so each setting compiles its own sampler.
Rule = tuple[float, int, float, int]


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is chosen, and how many are generated at most."""
  max_tokens: int = 128
  temperature: float = 1.0  # 0: greedy
  top_k: int = 0  # keep the k most likely tokens (0: all)
  top_p: float = 1.0  # keep the most likely tokens whose mass reaches p (1: all)
  seed: int = 0

  def problems(self) -> list[str]:
    """What is wrong with these settings, one line each, named as the options."""
    checks = [
        (self.max_tokens >= 1, f'--max-tokens {self.max_tokens} must be at least 1'),
        (self.temperature >= 0 and math.isfinite(self.temperature),
         f'--temperature {self.temperature} must be a number >= 0 (0: greedy)'),
        (self.top_k >= 0, f'--top-k {self.top_k} must be >= 0 (0: all tokens)'),
        (0 < self.top_p <= 1, f'--top-p {self.top_p} must be in (0, 1]'),
        # A key holds 32 bits of its seed: a larger seed would repeat a smaller one's text.
        (0 <= self.seed < 2**32, f'--seed {self.seed} must be in [0, 2**32)'),
    ]
    return [message for ok, message in checks if not ok]


def filter_logits(logits_BxV: jax.Array, top_k: int, top_p: float) -> jax.Array:
  """The logits of the tokens that top-k keeps, and of those then the smallest most
  likely set whose probability reaches top_p; -inf elsewhere. A token tied with the
  last one kept is kept too. top_k 0 and top_p 1 keep all."""
  if top_k:
    kth_Bx1 = jax.lax.top_k(logits_BxV, min(top_k, logits_BxV.shape[-1]))[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
  if top_p < 1:
    sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)
    p_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    # A token is kept while the tokens ranked above it hold less than top_p: the most
    # likely one always is.
    kept_BxV = jnp.cumsum(p_BxV, axis=-1) - p_BxV < top_p
    least_Bx1 = jnp.min(jnp.where(kept_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV < least_Bx1, -jnp.inf, logits_BxV)
  return logits_BxV


def choose_tokens(logits_BxV: jax.Array, keys_B: jax.Array, temperature: float, top_k: int,
                  top_p: float) -> jax.Array:
  """int32 [B]: the most likely token at temperature 0, else one drawn with each row's
  key from the tempered, filtered distribution."""
  if temperature == 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  filtered_BxV = filter_logits(logits_BxV / temperature, top_k, top_p)
  return jax.vmap(jax.random.categorical)(keys_B, filtered_BxV).astype(jnp.int32)


def logits(model: Transformer, h_BxD: jax.Array) -> jax.Array:
  """float32 [B, V] from final hidden states, multiplied in the compute dtype as the loss does."""
  return jnp.dot(h_BxD, model.unembedding().astype(h_BxD.dtype), preferred_element_type=jnp.float32)


def bucket(length: int) -> int:
  """The padded prompt length: the power of two at or above `length`, at least SMALLEST_BUCKET."""
  return max(SMALLEST_BUCKET, 1 << (length - 1).bit_length())


class Decoder:
  """A model's parameters in a mesh, and the two programs that decode from them: the
  prefill of the prompts and the step of one token per row."""

  def __init__(self, cfg: ModelConfig, params: dict, mesh: Mesh, rules: sharding.Rules):
    """`params`: the parameters by salt name (nnx.to_pure_dict's layout), anywhere."""
    self.cfg = cfg
    self.graphdef, state = step.abstract_model(cfg)
    shardings = step.param_shardings(state, mesh, rules)
    nnx.replace_by_pure_dict(state, params)
    self.params = jax.device_put(state, shardings)
    self.batch_shards = math.prod(mesh.shape[axis] for axis in rules['batch'])
    self.rows = NamedSharding(mesh, sharding.logical_to_spec(('batch',), rules))
    self.row_tokens = sharding.batch_sharding(mesh, rules)
    layers = NamedSharding(mesh, sharding.logical_to_spec(('layers', 'batch', None, 'kv_heads', 'head_dim'), rules))
    caches = KVCache(layers, layers, self.row_tokens)
    self._prefill = jax.jit(self._prefill_rows, static_argnames=('length', 'rule'), out_shardings=(self.rows, caches))
    self._step = jax.jit(self._step_rows, static_argnames=('rule',), out_shardings=(self.rows, caches),
                         donate_argnames=('cache',))

  def generate(self, prompts: list[np.ndarray], sampling: Sampling, eos_id: int | None, allowed: int | None = None,
               on_step: Callable[[np.ndarray], None] | None = None) -> list[np.ndarray]:
    """Each prompt's new token ids, up to its first `eos_id` (left out) or
    `sampling.max_tokens`. Ids from `allowed` on (a model's vocabulary padding past its
    tokenizer's) are never chosen. `on_step` gets every step's tokens, one per prompt."""
    count, length = len(prompts), bucket(max(len(p) for p in prompts))
    rows = -(-count // self.batch_shards) * self.batch_shards
    tokens_BxP, lengths_B = np.zeros((rows, length), np.int32), np.zeros(rows, np.int32)
    for i, prompt in enumerate(prompts):
      tokens_BxP[i, length - len(prompt):], lengths_B[i] = prompt, len(prompt)
    positions_BxP = np.maximum(np.arange(length) - (length - lengths_B)[:, None], -1).astype(np.int32)
    rule = (float(sampling.temperature), sampling.top_k, float(sampling.top_p), allowed or self.cfg.vocab_size)
    key = jax.random.key(sampling.seed)
    token_B, cache = self._prefill(self.params, jax.device_put(tokens_BxP, self.row_tokens),
                                   jax.device_put(positions_BxP, self.row_tokens), key,
                                   length=length + sampling.max_tokens - 1, rule=rule)
    lengths_B = jax.device_put(lengths_B, self.rows)
    chosen, done = [], np.zeros(count, bool)
    for t in range(sampling.max_tokens):
      if t:
        token_B, cache = self._step(self.params, token_B, lengths_B, cache, length + t - 1, t, key, rule=rule)
      chosen.append(np.asarray(token_B)[:count])
      if on_step:
        on_step(chosen[-1])
      if eos_id is not None:
        done |= chosen[-1] == eos_id
      if done.all():
        break
    return [_until(ids, eos_id) for ids in np.stack(chosen, axis=1)]

  def _prefill_rows(self, params: nnx.State, tokens_BxP: jax.Array, positions_BxP: jax.Array, key: jax.Array, *,
                    length: int, rule: Rule) -> tuple[jax.Array, KVCache]:
    model = nnx.merge(self.graphdef, params)
    h_BxPxD, cache = model.decode(tokens_BxP, positions_BxP, empty_cache(self.cfg, tokens_BxP.shape[0], length), 0)
    # Left padding puts every row's last prompt token in the last slot.
    return self._choose(model, h_BxPxD[:, -1], key, 0, rule), cache

  def _step_rows(self, params: nnx.State, token_B: jax.Array, lengths_B: jax.Array, cache: KVCache,
                 index: jax.Array, t: jax.Array, key: jax.Array, *, rule: Rule) -> tuple[jax.Array, KVCache]:
    """Feeds the token chosen at step t - 1, at position (prompt length + t - 1) and slot `index`."""
    model = nnx.merge(self.graphdef, params)
    h_Bx1xD, cache = model.decode(token_B[:, None], (lengths_B + t - 1)[:, None], cache, index)
    return self._choose(model, h_Bx1xD[:, 0], key, t, rule), cache

  def _choose(self, model: Transformer, h_BxD: jax.Array, key: jax.Array, t, rule: Rule) -> jax.Array:
    temperature, top_k, top_p, allowed = rule
    logits_BxV = logits(model, h_BxD)
    logits_BxV = jnp.where(jnp.arange(logits_BxV.shape[-1]) < allowed, logits_BxV, -jnp.inf)
    keys_B = jax.vmap(lambda row: jax.random.fold_in(jax.random.fold_in(key, row), t))(jnp.arange(h_BxD.shape[0]))
    return choose_tokens(logits_BxV, keys_B, temperature, top_k, top_p)


def _until(ids: np.ndarray, eos_id: int | None) -> np.ndarray:
  ends = np.flatnonzero(ids == eos_id)
  return ids[:ends[0]] if ends.size else ids


def continuation(tok: Tokenizer, prompt: np.ndarray, new: np.ndarray) -> str:
  """The text the new ids add to the prompt's. Decoded together, since a tokenizer
  decodes a token by what precedes it (sentencepiece drops the space of a text's first
  word, byte tokens join into characters)."""
  before, whole = tok.decode(prompt), tok.decode(np.concatenate([prompt, new]).astype(np.int32))
  return whole[len(before):] if whole.startswith(before) else tok.decode(new)


class _Stream:
  """Writes the continuation of one prompt as its tokens arrive, holding back a
  character that later bytes may still complete."""

  def __init__(self, tok: Tokenizer, prompt: np.ndarray, write: Callable[[str], None]):
    self.tok, self.prompt, self.write = tok, prompt, write
    self.new, self.shown = [], 0

  def __call__(self, tokens: np.ndarray) -> None:
    self.new.append(int(tokens[0]))
    self.show(continuation(self.tok, self.prompt, np.asarray(self.new, np.int32)).rstrip('\ufffd'))

  def show(self, text: str) -> None:
    if len(text) > self.shown:
      self.write(text[self.shown:])
      self.shown = len(text)


def read_prompts(prompt: str | None, file: Path | None) -> list[str]:
  """--prompt, then the non-blank lines of --prompts FILE."""
  prompts = [] if prompt is None else [prompt]
  if file is not None:
    try:
      lines = [line for line in Path(file).read_text(encoding='utf-8').splitlines() if line.strip()]
    except UnicodeDecodeError:
      raise UserError(f'--prompts {file} is not UTF-8 text') from None
    if not lines:
      raise UserError(f'--prompts {file} holds no prompt (one per line)')
    prompts += lines
  if not prompts:
    raise UserError('no prompt: give --prompt TEXT or --prompts FILE (one per line)')
  return prompts


def load(checkpoint: Path, tokenizer: Path | None = None) -> tuple[Decoder, Tokenizer, dict]:
  """The checkpoint's decoder on this machine's devices, its tokenizer and its config."""
  config, params = read_checkpoint(checkpoint)
  tok = checkpoint_tokenizer(checkpoint, config, tokenizer)
  mesh = sharding.make_mesh(mesh_shape(config['mesh'], jax.device_count()))
  decoder = Decoder(ModelConfig(**config['model']), params, mesh, sharding.parse_rules(config['sharding']))
  return decoder, tok, config


def sample(checkpoint: Path, prompts: list[str], sampling: Sampling, *, tokenizer: Path | None = None,
           stream: Callable[[str], None] | None = None) -> list[str]:
  """Each prompt's continuation. With `stream` (one prompt), its text is also written
  there as it is generated."""
  problems = sampling.problems()
  if problems:
    raise UserError('; '.join(problems))
  decoder, tok, config = load(checkpoint, tokenizer)
  ids = tok.encode(prompts)
  seq_len = config['data']['seq_len']
  for i, prompt in enumerate(ids, 1):
    if not len(prompt):
      raise UserError(f'prompt {i} encodes to no tokens: give it some text')
    if len(prompt) + sampling.max_tokens > seq_len:
      raise UserError(f'prompt {i} is {len(prompt)} tokens, and with --max-tokens {sampling.max_tokens} needs '
                      f'{len(prompt) + sampling.max_tokens} positions, more than the model\'s {seq_len} '
                      '(data.seq_len): shorten it or lower --max-tokens')
  shown = _Stream(tok, ids[0], stream) if stream else None
  new = decoder.generate(ids, sampling, tok.eos_id, allowed=min(tok.vocab_size, decoder.cfg.vocab_size),
                         on_step=shown)
  texts = [continuation(tok, prompt, ids_) for prompt, ids_ in zip(ids, new)]
  if shown:
    shown.show(texts[0])
  return texts
