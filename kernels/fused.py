"""The teacher-student loss as Pallas kernels: per-token CE and KD, logits never stored.

Forward: a grid over (token blocks, vocabulary blocks). Each grid step multiplies a
[bT, D] block of hidden states by a [D, bV] block of the unembedding, for the student
and the teacher, and folds the two [bT, bV] logit blocks into per-token statistics
(running maxima and sums of exponentials, flash-attention style, in float32) that
stay resident in the output block while the vocabulary axis is walked in order.
The losses follow from the statistics (`kernels.stats`), also when the vocabulary is
split over devices: each shard's statistics are combined with collectives first.

Backward (`jax.custom_vjp`): the gradient of a token's loss with respect to the
student's logits z is, with p = softmax(z), q = softmax(z / tau), r = softmax(u / tau),

    g_ce * (p - onehot(target)) + g_kd / tau * (q - r)

built block by block from the saved log-normalisers: one kernel accumulates
dh = dz W^T over vocabulary blocks, another dW = h^T dz over token blocks; each
recomputes its logit blocks, so memory stays O(bT x bV) per block.

The grid's second axis accumulates into its output block, which is sequential on
TPUs (Mosaic, 'arbitrary' semantics) and in interpret mode; CPUs run the kernels in
interpret mode. GPUs take another shape altogether (kernels.token_chunks). Blocks may
overhang the arrays: rows and columns past the end are masked, so T and V need not
be multiples of the block.

Shapes in names: T tokens, D student width, G teacher width, V vocabulary, bT x bV a
block, A statistics per token (kernels.stats).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import stats as S

# Tokens x vocabulary columns, largest first: the first that fits the generation's
# VMEM (kernels.tpu.vmem_limit) is used; the largest is MXU-sized and leaves room for
# double buffering at widths up to ~2K.
BLOCKS = ((256, 512), (128, 512), (128, 256), (64, 256), (64, 128), (32, 128), (16, 128))
BLOCK = BLOCKS[0]


def vmem_bytes(block_t: int, block_v: int, widths: tuple[int, ...], itemsize: int) -> int:
  """A bound on the scoped VMEM the largest of the three kernels asks for at this block.

  widths: the student's and (with a teacher) the teacher's. Inputs are double-buffered;
  [bT, 1] columns are padded to 128 lanes; the float32 dh or dW output block stays
  resident; the float32 logits of a block and their elementwise temporaries are
  counted a dozen times over.
  """
  bT, bV, D = block_t, block_v, sum(widths)
  inputs = 2 * itemsize * (bT + bV) * D
  columns = 3 * 2 * bT * 128 * 4
  resident = 2 * 4 * max(bT, bV) * widths[0]
  working = 12 * 4 * bT * bV
  return inputs + columns + resident + working


def fitting_block(widths: tuple[int, ...], itemsize: int, limit: int) -> tuple[int, int] | None:
  """The largest of BLOCKS whose kernels fit `limit` bytes of VMEM, or None."""
  return next((b for b in BLOCKS if vmem_bytes(*b, widths, itemsize) <= limit), None)


def _platform_params(backend: str, semantics: tuple[str, ...], vmem_limit: int | None):
  if backend == 'tpu':
    return dict(compiler_params=pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=vmem_limit))
  return dict(interpret=True)


def _valid(start, size: int, limit: int, axis: int, shape: tuple[int, int]) -> jax.Array:
  return start * size + jax.lax.broadcasted_iota(jnp.int32, shape, axis) < limit


def _logits(h_ref, w_ref, rows_ok, cols_ok) -> jax.Array:
  """One [bT, bV] block of logits in float32; overhanging rows and columns are masked."""
  h = jnp.where(rows_ok, h_ref[...], 0)
  w = jnp.where(cols_ok, w_ref[...], 0)
  return jnp.dot(h, w, preferred_element_type=jnp.float32)


def _columns(j, bV) -> jax.Array:
  return j * bV + jax.lax.broadcasted_iota(jnp.int32, (1, bV), 1)


def _forward_kernel(T, V, tau, with_teacher, targets_ref, hs_ref, ws_ref, *rest):
  if with_teacher:
    ht_ref, wt_ref, out_ref = rest
  else:
    (out_ref,) = rest
  i, j = pl.program_id(0), pl.program_id(1)
  bT, bV = targets_ref.shape[0], ws_ref.shape[1]

  @pl.when(j == 0)
  def _():
    out_ref[...] = S.initial(out_ref.shape)

  rows_ok_h = _valid(i, bT, T, 0, (bT, hs_ref.shape[1]))
  cols_ok = _valid(j, bV, V, 1, (1, bV))
  z = _logits(hs_ref, ws_ref, rows_ok_h, _valid(j, bV, V, 1, ws_ref.shape))
  z = jnp.where(cols_ok, z, -jnp.inf)
  u = None
  if with_teacher:
    u = _logits(ht_ref, wt_ref, _valid(i, bT, T, 0, (bT, ht_ref.shape[1])), _valid(j, bV, V, 1, wt_ref.shape))
    u = jnp.where(cols_ok, u, -jnp.inf)
  out_ref[...] = S.fold(out_ref[...], z, u, _columns(j, bV), targets_ref[...], tau)


def _dz(z, u, columns, targets, coef, tau, cols_ok, rows_ok):
  """d loss / d z for one block, from the per-token coefficients (see `kernels.stats.backward_coefficients`)."""
  lse, g_ce, lse_tau, lse_teacher, g_kd = (coef[:, k:k + 1] for k in range(5))
  dz = g_ce * (jnp.exp(z - lse) - (columns == targets))
  if u is not None:
    dz += g_kd * (jnp.exp(z / tau - lse_tau) - jnp.exp(u / tau - lse_teacher))
  return jnp.where(cols_ok & rows_ok, dz, 0.0)


def _block_dz(i, j, T, V, tau, targets_ref, coef_ref, hs_ref, ws_ref, ht_ref, wt_ref):
  bT, bV = targets_ref.shape[0], ws_ref.shape[1]
  rows_ok = _valid(i, bT, T, 0, (bT, 1))
  cols_ok = _valid(j, bV, V, 1, (1, bV))
  z = _logits(hs_ref, ws_ref, _valid(i, bT, T, 0, (bT, hs_ref.shape[1])), _valid(j, bV, V, 1, ws_ref.shape))
  u = None
  if ht_ref is not None:
    u = _logits(ht_ref, wt_ref, _valid(i, bT, T, 0, (bT, ht_ref.shape[1])), _valid(j, bV, V, 1, wt_ref.shape))
  return _dz(z, u, _columns(j, bV), targets_ref[...], coef_ref[...], tau, cols_ok, rows_ok)


def _gradient_kernel(T, V, tau, with_teacher, wrt, targets_ref, coef_ref, hs_ref, ws_ref, *rest):
  """Accumulates dh over vocabulary blocks (wrt='h', grid (token, vocab)) or dW over token
  blocks (wrt='w', grid (vocab, token)) into the output block."""
  ht_ref, wt_ref, out_ref = rest if with_teacher else (None, None, *rest)
  first, second = pl.program_id(0), pl.program_id(1)
  i, j = (first, second) if wrt == 'h' else (second, first)

  @pl.when(second == 0)
  def _():
    out_ref[...] = jnp.zeros_like(out_ref)

  dz = _block_dz(i, j, T, V, tau, targets_ref, coef_ref, hs_ref, ws_ref, ht_ref, wt_ref)
  if wrt == 'h':
    w = jnp.where(_valid(j, ws_ref.shape[1], V, 1, ws_ref.shape), ws_ref[...], 0)
    out_ref[...] += jax.lax.dot_general(dz.astype(w.dtype), w, (((1,), (1,)), ((), ())),
                                        preferred_element_type=jnp.float32)
  else:
    h = jnp.where(_valid(i, hs_ref.shape[0], T, 0, hs_ref.shape), hs_ref[...], 0)
    out_ref[...] += jax.lax.dot_general(h, dz.astype(h.dtype), (((0,), (0,)), ((), ())),
                                        preferred_element_type=jnp.float32)


def _specs(token_major: bool, bT: int, bV: int, D: int, G: int | None):
  """BlockSpecs of (targets, [coef,] h_s, w_s[, h_t, w_t]) for a (token, vocab) or (vocab, token) grid."""
  tok = (lambda i, j: (i, 0)) if token_major else (lambda j, i: (i, 0))
  voc = (lambda i, j: (0, j)) if token_major else (lambda j, i: (0, j))
  specs = [pl.BlockSpec((bT, 1), tok), pl.BlockSpec((bT, D), tok), pl.BlockSpec((D, bV), voc)]
  if G is not None:
    specs += [pl.BlockSpec((bT, G), tok), pl.BlockSpec((G, bV), voc)]
  return specs, tok, voc


def partial_stats(h_s, w_s, targets, teacher, *, tau: float, block_t: int, block_v: int,
                  backend: str, vmem_limit: int | None = None) -> jax.Array:
  """[T, A] statistics over the columns of w_s (targets and argmax relative to its first column)."""
  T, D = h_s.shape
  V = w_s.shape[1]
  bT, bV = min(block_t, T), min(block_v, V)
  G = None if teacher is None else teacher[0].shape[1]
  specs, tok, _ = _specs(True, bT, bV, D, G)
  width = S.width(teacher is not None)
  return pl.pallas_call(
      functools.partial(_forward_kernel, T, V, tau, teacher is not None),
      grid=(pl.cdiv(T, bT), pl.cdiv(V, bV)),
      in_specs=specs,
      out_specs=pl.BlockSpec((bT, width), tok),
      out_shape=jax.ShapeDtypeStruct((T, width), jnp.float32),
      **_platform_params(backend, ('parallel', 'arbitrary'), vmem_limit),
  )(targets.reshape(T, 1), h_s, w_s, *(teacher or ()))


def gradients(h_s, w_s, targets, teacher, coef, *, tau: float, block_t: int, block_v: int,
              backend: str, vmem_limit: int | None = None) -> tuple[jax.Array, jax.Array]:
  """(dh_s [T, D], dW_s [D, V]) in float32 for this shard, from the per-token coefficients."""
  T, D = h_s.shape
  V = w_s.shape[1]
  bT, bV = min(block_t, T), min(block_v, V)
  G = None if teacher is None else teacher[0].shape[1]
  args = (targets.reshape(T, 1), coef, h_s, w_s, *(teacher or ()))
  kernel_args = (T, V, tau, teacher is not None)

  def with_coef(specs, tok):
    return specs[:1] + [pl.BlockSpec((bT, coef.shape[1]), tok)] + specs[1:]

  specs, tok, _ = _specs(True, bT, bV, D, G)
  dh = pl.pallas_call(
      functools.partial(_gradient_kernel, *kernel_args, 'h'), grid=(pl.cdiv(T, bT), pl.cdiv(V, bV)),
      in_specs=with_coef(specs, tok), out_specs=pl.BlockSpec((bT, D), tok),
      out_shape=jax.ShapeDtypeStruct((T, D), jnp.float32),
      **_platform_params(backend, ('parallel', 'arbitrary'), vmem_limit))(*args)
  specs, tok, voc = _specs(False, bT, bV, D, G)
  dw = pl.pallas_call(
      functools.partial(_gradient_kernel, *kernel_args, 'w'), grid=(pl.cdiv(V, bV), pl.cdiv(T, bT)),
      in_specs=with_coef(specs, tok), out_specs=pl.BlockSpec((D, bV), voc),
      out_shape=jax.ShapeDtypeStruct((D, V), jnp.float32),
      **_platform_params(backend, ('parallel', 'arbitrary'), vmem_limit))(*args)
  return dh, dw
