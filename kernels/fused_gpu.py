"""The loss kernels in the shape Pallas' Triton lowering needs (GPUs).

Triton runs the programs of a grid in parallel, so nothing may accumulate along a
grid axis as the TPU kernels (kernels.fused) do. Forward: one program per token
block walks the vocabulary in a loop, carrying the [bT, 1] statistics columns
(kernels.stats) in registers, each logit block a loop of [bT, bD] x [bD, bV] dots.
Backward: one program per (token block, vocabulary block) recomputes its logit
block, forms dz, and adds dz W^T into dh and h^T dz into dW with atomic adds, so
the logits are recomputed once rather than once per gradient.

Why Triton and not Mosaic GPU (the lowering jax recommends; Triton's is deprecated):
this shape, per-program loops with atomic adds, is what Triton lowers directly,
while Mosaic GPU wants warpgroup-level code; and its IR can be lowered and checked
for an H100 on a machine without one (tests/test_kernels.py). Which is faster is
owed to a GPU session: time both with bench/kernel.py before making it the default.

Triton's tensors have power-of-two shapes: blocks are powers of two, the widths
multiples of 16 (the smallest dot), and T and V are padded to whole blocks (free
when they are multiples already, as vocabularies of 32K, 128K or 256K are).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels import stats as S

_COMPILER_PARAMS = pltriton.CompilerParams(num_warps=4, num_stages=2)
# Tokens x vocabulary columns: a float32 [64, 128] logit tile fits a program's registers.
BLOCK = (64, 128)


def width_block(D: int) -> int:
  """The widest power-of-two chunk, up to 64, that divides D; D must be a multiple of 16."""
  if D % 16:
    raise ValueError(f'the GPU kernels need model widths that are multiples of 16, got {D}')
  return next(b for b in (64, 32, 16) if D % b == 0)


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int] = (1, 0)) -> jax.Array:
  """a @ b over the given dimensions (a^T b: (0, 0); a b^T: (1, 1)), float32."""
  return jax.lax.dot_general(a, b, ((contract[:1], contract[1:]), ((), ())), preferred_element_type=jnp.float32)


def _logits(h_ref, w_ref, rows, cols, bT: int, bV: int) -> jax.Array:
  D = h_ref.shape[1]
  bD = width_block(D)

  def chunk(k, acc):
    d = pl.ds(k * bD, bD)
    return acc + _dot(h_ref[rows, d], w_ref[d, cols])

  return jax.lax.fori_loop(0, D // bD, chunk, jnp.zeros((bT, bV), jnp.float32))


def _forward_kernel(T, V, tau, bT, bV, with_teacher, targets_ref, hs_ref, ws_ref, *rest):
  ht_ref, wt_ref, *out_refs = rest if with_teacher else (None, None, *rest)
  rows = pl.ds(pl.program_id(0) * bT, bT)
  targets = targets_ref[rows][:, None]

  def block(j, col):
    cols = pl.ds(j * bV, bV)
    columns = j * bV + jax.lax.broadcasted_iota(jnp.int32, (1, bV), 1)
    z = jnp.where(columns < V, _logits(hs_ref, ws_ref, rows, cols, bT, bV), -jnp.inf)
    u = None
    if with_teacher:
      u = jnp.where(columns < V, _logits(ht_ref, wt_ref, rows, cols, bT, bV), -jnp.inf)
    return tuple(S.fold_columns(list(col), z, u, columns, targets, tau))

  stats = jax.lax.fori_loop(0, pl.cdiv(V, bV), block, tuple(S.initial_columns(bT, len(out_refs))))
  for ref, column in zip(out_refs, stats):
    ref[rows] = column[:, 0]


def _backward_kernel(T, V, tau, bT, bV, with_teacher, targets_ref, lse_ref, g_ce_ref, lse_tau_ref,
                     lse_teacher_ref, g_kd_ref, hs_ref, ws_ref, *rest):
  ht_ref, wt_ref, _, _, dh_ref, dw_ref = rest if with_teacher else (None, None, *rest)
  i, j = pl.program_id(0), pl.program_id(1)
  rows, cols = pl.ds(i * bT, bT), pl.ds(j * bV, bV)

  def column(ref):
    return ref[rows][:, None]

  columns = j * bV + jax.lax.broadcasted_iota(jnp.int32, (1, bV), 1)
  row_ids = i * bT + jax.lax.broadcasted_iota(jnp.int32, (bT, 1), 0)
  z = _logits(hs_ref, ws_ref, rows, cols, bT, bV)
  dz = column(g_ce_ref) * (jnp.exp(z - column(lse_ref)) - (columns == column(targets_ref)))
  if with_teacher:
    u = _logits(ht_ref, wt_ref, rows, cols, bT, bV)
    dz += column(g_kd_ref) * (jnp.exp(z / tau - column(lse_tau_ref)) - jnp.exp(u / tau - column(lse_teacher_ref)))
  dz = jnp.where((columns < V) & (row_ids < T), dz, 0.0).astype(hs_ref.dtype)
  D = hs_ref.shape[1]
  bD = width_block(D)

  def chunk(k, carry):
    d = pl.ds(k * bD, bD)
    pltriton.atomic_add(dh_ref, (rows, d), _dot(dz, ws_ref[d, cols], (1, 1)))
    pltriton.atomic_add(dw_ref, (d, cols), _dot(hs_ref[rows, d], dz, (0, 0)))
    return carry

  jax.lax.fori_loop(0, D // bD, chunk, 0)


def _padded(x, axis: int, block: int):
  extra = -x.shape[axis] % block
  return x if not extra else jnp.pad(x, [(0, extra if a == axis else 0) for a in range(x.ndim)])


def partial_stats(h_s, w_s, targets, teacher, *, tau: float, block_t: int, block_v: int,
                  interpret: bool) -> jax.Array:
  """As kernels.fused.partial_stats, for GPUs."""
  T, V = h_s.shape[0], w_s.shape[1]
  args = [_padded(targets, 0, block_t), _padded(h_s, 0, block_t), _padded(w_s, 1, block_v)]
  if teacher is not None:
    args += [_padded(teacher[0], 0, block_t), _padded(teacher[1], 1, block_v)]
  Tp = args[0].shape[0]
  k = S.width(teacher is not None)
  columns = pl.pallas_call(
      functools.partial(_forward_kernel, T, V, tau, block_t, block_v, teacher is not None),
      grid=(Tp // block_t,),
      out_shape=[jax.ShapeDtypeStruct((Tp,), jnp.float32)] * k,
      compiler_params=_COMPILER_PARAMS, interpret=interpret,
  )(*args)
  return jnp.stack(columns, axis=1)[:T]


def gradients(h_s, w_s, targets, teacher, coef, *, tau: float, block_t: int, block_v: int,
              interpret: bool) -> tuple[jax.Array, jax.Array]:
  """As kernels.fused.gradients, for GPUs."""
  T, D = h_s.shape
  V = w_s.shape[1]
  args = [_padded(x, 0, block_t) for x in (targets, *(coef[:, c] for c in range(5)), h_s)]
  args.append(_padded(w_s, 1, block_v))
  if teacher is not None:
    args += [_padded(teacher[0], 0, block_t), _padded(teacher[1], 1, block_v)]
  Tp, Vp = args[0].shape[0], args[7].shape[1]
  zeros = [jnp.zeros((Tp, D), jnp.float32), jnp.zeros((D, Vp), jnp.float32)]
  dh, dw = pl.pallas_call(
      functools.partial(_backward_kernel, T, V, tau, block_t, block_v, teacher is not None),
      grid=(Tp // block_t, Vp // block_v),
      out_shape=[jax.ShapeDtypeStruct(z.shape, z.dtype) for z in zeros],
      # The atomic adds accumulate into zeroed buffers.
      input_output_aliases={len(args): 0, len(args) + 1: 1},
      compiler_params=_COMPILER_PARAMS, interpret=interpret,
  )(*args, *zeros)
  return dh[:T], dw[:, :V]
