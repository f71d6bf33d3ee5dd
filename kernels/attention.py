"""Causal self-attention inside the documents of packed rows, by the implementation the config names.

A row packs several documents; `segment_ids` number them, and a token attends to the
tokens before it in its own document only, so no document ever sees another. A sliding
`window` W > 0 (Mistral, Gemma 3; Hugging Face's `sliding_window`) narrows that to the
last W tokens, itself included: query i sees key j iff same document, j <= i, i - j < W.
W = 0 is no window.

  xla         `jax.nn.dot_product_attention` with an explicit [B, 1, L, L] mask: the
              reference; segment ids and windows, everywhere, but it builds [B, H, L, L]
              scores
  cudnn       cuDNN's fused (flash) attention through `jax.nn.dot_product_attention`,
              the document mask as its bias; with a window, also cuDNN's own causal
              sliding window, which skips the blocks outside it (GPU, bf16 or fp16)
  pallas_gpu  the Pallas (Triton) flash attention of jax.experimental with segment ids;
              no windows (GPU; interpret mode on CPU)
  splash      Pallas splash attention with segment ids and windows (a local mask)
              (TPU; interpret mode on CPU)
  auto        per backend, the first of FASTEST that can run the call

Every implementation but `xla` runs per shard under `shard_map`: rows over the batch
axes, heads over the heads axes; the sequence stays whole on each shard.

Shapes in names: B batch, L sequence, H query heads, K key/value heads, E head dim.
"""

import functools
import logging
import warnings
from collections.abc import Callable
from typing import Protocol

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

log = logging.getLogger('salt')
IMPLS = ('xla', 'cudnn', 'pallas_gpu', 'splash', 'auto')
# Per backend, the implementations that keep document boundaries, fastest first as
# measured (BENCHMARKS.md, "GPU step with flash attention"); one not yet measured ranks
# after the measured ones and before xla, which materialises the [L, L] scores.
FASTEST = {
    'gpu': ('cudnn', 'pallas_gpu', 'xla'),
    'tpu': ('splash', 'xla'),
    'cpu': ('xla',),
}
# Where each kernel runs; the Pallas ones also in interpret mode on CPU.
RUNS_ON = {'cudnn': ('gpu',), 'pallas_gpu': ('gpu', 'cpu'), 'splash': ('tpu', 'cpu')}
# Blocks of the query and key sequence the Pallas kernels walk; L must be a multiple.
SPLASH_BLOCK = 512
PALLAS_GPU_BLOCK = 128


class Attention(Protocol):
  """(q [B, L, H, E], k [B, L, K, E], v [B, L, K, E], segment_ids [B, L], window=W) ->
  [B, L, H, E]; `window` is a static Python int (0: no window)."""

  def __call__(self, q_BxLxHxE: jax.Array, k_BxLxKxE: jax.Array, v_BxLxKxE: jax.Array, segment_ids_BxL: jax.Array,
               *, window: int = 0) -> jax.Array:
    ...


def document_mask(segment_ids_BxL: jax.Array, window: int = 0) -> jax.Array:
  """[B, 1, L, L] booleans: query i may attend to key j (j <= i, same document, and
  i - j < window if window > 0)."""
  L = segment_ids_BxL.shape[1]
  causal_LxL = jnp.tril(jnp.ones((L, L), dtype=bool))
  if window:
    causal_LxL &= jnp.triu(jnp.ones((L, L), dtype=bool), -(window - 1))
  same_doc_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
  return (causal_LxL & same_doc_BxLxL)[:, None]


def reference(q_BxLxHxE: jax.Array, k_BxLxKxE: jax.Array, v_BxLxKxE: jax.Array, segment_ids_BxL: jax.Array,
              window: int = 0) -> jax.Array:
  """The XLA reference: [B, L, H, E]."""
  return jax.nn.dot_product_attention(q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, mask=document_mask(segment_ids_BxL, window))


def _cudnn(q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, segment_ids_BxL, *, interpret: bool, window: int = 0):
  del interpret
  # The mask (a bias to cuDNN) keeps documents apart and the window exact; cuDNN's own
  # causal sliding window on top lets it skip the blocks outside the window.
  return jax.nn.dot_product_attention(q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, mask=document_mask(segment_ids_BxL, window),
                                      is_causal=bool(window), local_window_size=(window - 1, 0) if window else None,
                                      implementation='cudnn')


def _pallas_gpu(q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, segment_ids_BxL, *, interpret: bool, window: int = 0):
  if window:
    raise ValueError(f'pallas_gpu attention has no sliding window, and window={window}')
  # The kernel wants as many key/value heads as query heads.
  G = q_BxLxHxE.shape[2] // k_BxLxKxE.shape[2]
  k_BxLxHxE, v_BxLxHxE = (jnp.repeat(x, G, axis=2) for x in (k_BxLxKxE, v_BxLxKxE))
  return _triton_flash(q_BxLxHxE, k_BxLxHxE, v_BxLxHxE, segment_ids_BxL, interpret)


def _triton_attention():
  """jax's Triton flash attention module. Its import warns that tokamax will replace it;
  salt pins jax, and the kernel is tested here and timed by bench/attention.py."""
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', DeprecationWarning)
    from jax.experimental.pallas.ops.gpu import attention as triton_attention
  return triton_attention


def _triton_options(q: jax.Array, interpret: bool) -> tuple:
  """The static arguments of jax's Triton flash attention, in its order: sm_scale,
  causal, block_sizes, backward_pass_impl, num_warps, num_stages, grid, interpret,
  debug, return_residuals."""
  return (q.shape[-1] ** -0.5, True, _triton_attention().BlockSizes.get_default(), 'triton', None, 2, None,
          interpret, False, False)


# jax's own custom VJP of this kernel hides its residuals from remat policies, so the
# backward would recompute the forward kernel; this one names them ('attention'), so
# that a policy saving the attention output keeps the flash residuals as well.
@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _triton_flash(q, k, v, segment_ids, interpret):
  return _triton_attention().mha(q, k, v, segment_ids, *_triton_options(q, interpret))


def _triton_flash_forward(q, k, v, segment_ids, interpret):
  out, (q, k, v, segment_ids, out, lse) = _triton_attention()._mha_forward(
      q, k, v, segment_ids, *_triton_options(q, interpret))
  out, lse = checkpoint_name(out, 'attention'), checkpoint_name(lse, 'attention')
  return out, (q, k, v, segment_ids, out, lse)


def _triton_flash_backward(interpret, residuals, d_out):
  dq, dk, dv, _ = _triton_attention()._mha_backward(*_triton_options(residuals[0], interpret), residuals, d_out)
  return dq, dk, dv, None


_triton_flash.defvjp(_triton_flash_forward, _triton_flash_backward)


def _splash(q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, segment_ids_BxL, *, interpret: bool, window: int = 0):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

  _, L, H, E = q_BxLxHxE.shape
  block = min(SPLASH_BLOCK, L)
  blocks = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                             block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  # Keys i - (W - 1) .. i: the window, causal; splash skips the blocks it masks whole.
  mask = masks.LocalMask((L, L), window_size=(window - 1, 0), offset=0) if window else masks.CausalMask((L, L))
  kernel = splash.make_splash_mha(masks.MultiHeadMask([mask] * H), block_sizes=blocks,
                                  head_shards=1, q_seq_shards=1, interpret=interpret,
                                  residual_checkpoint_name='attention')
  # Splash takes heads first and does not scale the queries itself.
  q_BxHxLxE = jnp.swapaxes(q_BxLxHxE * jnp.asarray(E ** -0.5, q_BxLxHxE.dtype), 1, 2)
  k_BxKxLxE, v_BxKxLxE = (jnp.swapaxes(x, 1, 2) for x in (k_BxLxKxE, v_BxLxKxE))
  out_BxHxLxE = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(s, s)))(
      q_BxHxLxE, k_BxKxLxE, v_BxKxLxE, segment_ids_BxL)
  return jnp.swapaxes(out_BxHxLxE, 1, 2)


_KERNELS = {'cudnn': _cudnn, 'pallas_gpu': _pallas_gpu, 'splash': _splash}


def unsupported(impl: str, backend: str, dtype: jnp.dtype, seq_len: int, head_dim: int,
                window: int = 0) -> str | None:
  """Why `impl` cannot run attention of this shape (and sliding window, 0: none) on
  `backend`, or None."""
  if impl == 'xla':
    return None
  if backend not in RUNS_ON[impl]:
    return f'{impl} runs on {RUNS_ON[impl][0]}{" (and interpreted on cpu)" if "cpu" in RUNS_ON[impl] else ""}, ' \
           f'not {backend}'
  if impl == 'pallas_gpu' and window:
    return f'pallas_gpu attention has no sliding window, and window={window}'
  if impl == 'cudnn' and jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    return f'cudnn attention needs bfloat16 or float16 activations, not {jnp.dtype(dtype).name}'
  if impl == 'cudnn' and (head_dim % 8 or head_dim > 128):
    return f'cudnn attention needs a head dim that is a multiple of 8 and at most 128, not {head_dim}'
  block = {'pallas_gpu': PALLAS_GPU_BLOCK, 'splash': SPLASH_BLOCK}.get(impl)
  if block and seq_len > block and seq_len % block:
    return f'{impl} needs a sequence length that is a multiple of {block} (or at most {block}), not {seq_len}'
  if impl == 'splash' and seq_len % 128:
    return f'splash needs a sequence length that is a multiple of 128, not {seq_len}'
  return None


def choose(impl: str, backend: str, dtype: jnp.dtype, seq_len: int, head_dim: int, window: int = 0) -> str:
  """The implementation that will run: `impl` itself, or for `auto` the first of the
  backend's FASTEST that can run the call (the choice and what was passed over are
  logged once).

  Raises:
    ValueError: `impl` is unknown, or named explicitly and cannot run this call, or
      the window is negative.
  """
  if impl not in IMPLS:
    raise ValueError(f'attention implementation {impl!r} must be one of {IMPLS}')
  if window < 0:
    raise ValueError(f'the attention window must be 0 (none) or positive, not {window}')
  if impl != 'auto':
    reason = unsupported(impl, backend, dtype, seq_len, head_dim, window)
    if reason:
      raise ValueError(reason)
    return impl
  passed_over = []
  for candidate in FASTEST.get(backend, ('xla',)):
    reason = unsupported(candidate, backend, dtype, seq_len, head_dim, window)
    if reason is None:
      _log_choice(backend, candidate, tuple(passed_over))
      return candidate
    passed_over.append(reason)
  raise AssertionError('xla runs everywhere')


@functools.cache
def _log_choice(backend: str, impl: str, passed_over: tuple[str, ...]) -> None:
  log.info('attention on %s: %s%s', backend, impl, ''.join(f'; passed over: {r}' for r in passed_over))


def make_attention(impl: str, *, mesh: Mesh | None = None, batch_axes: tuple[str, ...] = (),
                   head_axes: tuple[str, ...] = (), kv_head_axes: tuple[str, ...] = (),
                   interpret: bool | None = None) -> Attention:
  """(q [B, L, H, E], k [B, L, K, E], v [B, L, K, E], segment_ids [B, L], window=W) ->
  [B, L, H, E].

  `impl` is a resolved name (see `choose`), not `auto`. With a mesh, the kernels run
  per shard: rows split over `batch_axes`, query heads over `head_axes`, key/value
  heads over `kv_head_axes`. `interpret` runs the Pallas kernels in interpret mode
  (default: where the devices are CPUs).
  """
  if impl == 'xla':
    return reference
  if interpret is None:
    interpret = (jax.default_backend() if mesh is None else mesh.devices.flat[0].platform) == 'cpu'
  kernel = functools.partial(_KERNELS[impl], interpret=interpret)
  if mesh is None:
    return kernel
  rows = batch_axes or None
  q_spec = P(rows, None, head_axes or None, None)
  kv_spec = P(rows, None, kv_head_axes or None, None)

  # shard_map passes no keywords, and the window shapes the kernel: one per window.
  @functools.cache
  def sharded(window: int) -> Callable:
    return jax.shard_map(functools.partial(kernel, window=window), mesh=mesh,
                         in_specs=(q_spec, kv_spec, kv_spec, P(rows, None)), out_specs=q_spec, check_vma=False)

  def attention(q_BxLxHxE: jax.Array, k_BxLxKxE: jax.Array, v_BxLxKxE: jax.Array, segment_ids_BxL: jax.Array,
                *, window: int = 0) -> jax.Array:
    return sharded(window)(q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, segment_ids_BxL)

  return attention
