"""Greedy decoding speed: `salt sample`'s KV cache against recomputing the whole sequence
every step, for the demo model (random parameters) on the devices found.

    python -m bench.decode                                   # 16 prompt tokens, 256 new, batch 1 and 8
    python -m bench.decode --batch 1 --new-tokens 64

The plain loop runs the full forward pass over the prompt and every token so far, padded
to one fixed length (so it compiles once), and takes the argmax at the last real
position. Both loops fetch each step's tokens to the host, as `salt sample` does. One
JSON line per method and batch (`what`: decode_tokens_per_s, after a warm-up run that
compiles), then the speed-up of the cache, and whether both chose the same tokens.
"""

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.results import record
from configs import demo
from trainer import decode, sharding
from trainer.config import mesh_shape
from trainer.model import ModelConfig, Transformer


def full_step(graphdef: nnx.GraphDef):
  """(params, tokens [B, L], index) -> the greedy token at `index` [B], and the tokens
  with it written there: a forward pass over the whole padded sequence."""

  @jax.jit
  def step(params, tokens_BxL, index):
    model = nnx.merge(graphdef, params)
    positions_BxL = jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1]), tokens_BxL.shape)
    h_BxLxD = model(tokens_BxL, positions_BxL, jnp.ones_like(tokens_BxL))
    token_B = jnp.argmax(decode.logits(model, h_BxLxD[:, index - 1]), axis=-1).astype(jnp.int32)
    return token_B, tokens_BxL.at[:, index].set(token_B)

  return step


def full_recompute(step, params: nnx.State, prompts_BxP: np.ndarray, new: int) -> np.ndarray:
  """[B, new] greedy tokens, one full forward pass each."""
  P = prompts_BxP.shape[1]
  tokens_BxL = jnp.asarray(np.pad(prompts_BxP, ((0, 0), (0, new))))
  chosen = []
  for t in range(new):
    token_B, tokens_BxL = step(params, tokens_BxL, P + t)
    chosen.append(np.asarray(token_B))
  return np.stack(chosen, axis=1)


def timed(run) -> tuple[float, np.ndarray]:
  """Seconds of the second call (the first compiles), and its tokens."""
  run()
  start = time.perf_counter()
  tokens = run()
  return time.perf_counter() - start, tokens


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--batch', type=int, nargs='+', default=[1, 8])
  parser.add_argument('--prompt-tokens', type=int, default=16)
  parser.add_argument('--new-tokens', type=int, default=256)
  args = parser.parse_args()
  config = demo.get_config()
  cfg = ModelConfig(**config.model)
  with nnx.use_eager_sharding(False):
    graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(0)))
  mesh = sharding.make_mesh(mesh_shape(config.mesh, jax.device_count()))
  decoder = decode.Decoder(cfg, nnx.to_pure_dict(params), mesh, sharding.parse_rules(config.sharding))
  greedy = decode.Sampling(max_tokens=args.new_tokens, temperature=0)
  step = full_step(graphdef)
  for B in args.batch:
    prompts_BxP = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, args.prompt_tokens)).astype(np.int32)
    shape = dict(batch=B, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, model='configs/demo.py',
                 dtype=cfg.dtype)
    cached_s, cached = timed(lambda: np.stack(decoder.generate(list(prompts_BxP), greedy, eos_id=None)))
    full_s, full = timed(functools.partial(full_recompute, step, decoder.params, prompts_BxP, args.new_tokens))
    for method, seconds in (('kv_cache', cached_s), ('full_recompute', full_s)):
      record('decode_tokens_per_s', round(B * args.new_tokens / seconds, 1), method=method, seconds=round(seconds, 3),
             **shape)
    record('decode_kv_cache_speedup', round(full_s / cached_s, 2), same_tokens=bool(np.array_equal(cached, full)),
           **shape)


if __name__ == '__main__':
  main()
