"""Per-token statistics from which the losses follow: fold a block in, combine shards, finish.

A token's statistics over a set of vocabulary columns are an [A] float32 row:

  student at 1:    max, sum exp(z - max), z[target], argmax
  student at tau:  max, sum exp(z/tau - max)
  teacher at tau:  max, sum exp(u/tau - max), sum exp(u/tau - max) * z/tau
  teacher at 1:    max, sum exp(u - max), u[target], argmax

(the first four alone without a teacher). Rows over disjoint column sets combine
exactly: maxima by max, sums rescaled to the common maximum and added, target logits
added (one set holds the target), argmax from the set holding the maximum. The
kernels fold [bT, bV] logit blocks into [bT, A] rows; vocabulary shards combine with
collectives; `losses` turns the final rows into the per-token terms.

Shapes in names: A statistics per token, bT x bV a block of tokens x vocabulary columns.
"""

import jax
import jax.numpy as jnp

from kernels.reference import TokenLosses

S_MAX, S_SUM, S_TARGET, S_BEST = range(4)
Q_MAX, Q_SUM = 4, 5
R_MAX, R_SUM, R_ZSUM = 6, 7, 8
T_MAX, T_SUM, T_TARGET, T_BEST = 9, 10, 11, 12
# Each running maximum and the sums measured against it.
_SCALED = ((S_MAX, (S_SUM,)), (Q_MAX, (Q_SUM,)), (R_MAX, (R_SUM, R_ZSUM)), (T_MAX, (T_SUM,)))
# A finite start for running maxima keeps exp(max - new_max) free of inf - inf.
_LOW = -1e30


def width(with_teacher: bool) -> int:
  return 13 if with_teacher else 4


def initial(shape: tuple[int, int]) -> jax.Array:
  """Statistics of no columns: maxima at -1e30, everything else 0."""
  column = jax.lax.broadcasted_iota(jnp.int32, shape, 1)
  is_max = (column == S_MAX) | (column == Q_MAX) | (column == R_MAX) | (column == T_MAX)
  return jnp.where(is_max, _LOW, 0.0).astype(jnp.float32)


def initial_columns(rows: int, k: int) -> list[jax.Array]:
  """`initial` as A [rows, 1] columns."""
  return [jnp.full((rows, 1), _LOW if c in (S_MAX, Q_MAX, R_MAX, T_MAX) else 0.0, jnp.float32) for c in range(k)]


def _online(max_, sum_, x):
  """Folds logits x [bT, bV] into a running (max, sum of exp(x - max)); also returns exp(x - new max)
  and the factor that rescales the old sums."""
  new_max = jnp.maximum(max_, x.max(-1, keepdims=True))
  p = jnp.exp(x - new_max)
  rescale = jnp.exp(max_ - new_max)
  return new_max, sum_ * rescale + p.sum(-1, keepdims=True), p, rescale


def _best(max_, best, x, columns):
  """The running argmax; the first column wins a tie, as in jnp.argmax."""
  block_max = x.max(-1, keepdims=True)
  block_best = jnp.min(jnp.where(x == block_max, columns, jnp.iinfo(jnp.int32).max), -1, keepdims=True)
  return jnp.where(block_max > max_, block_best.astype(jnp.float32), best)


def fold(stats: jax.Array, z: jax.Array, u: jax.Array | None, columns: jax.Array, targets: jax.Array,
         tau: float) -> jax.Array:
  """Statistics [bT, A] with one block folded in (see `fold_columns`)."""
  col = [stats[:, k:k + 1] for k in range(stats.shape[1])]
  return jnp.concatenate(fold_columns(col, z, u, columns, targets, tau), axis=1)


def fold_columns(col: list[jax.Array], z: jax.Array, u: jax.Array | None, columns: jax.Array,
                 targets: jax.Array, tau: float) -> list[jax.Array]:
  """The A [bT, 1] statistics with one block folded in.

  z, u: [bT, bV] float32 logits of the student and the teacher (None: no teacher),
  -inf in columns past the vocabulary. columns: [1, bV] int32 ids of the block's
  columns. targets: [bT, 1] int32.
  """
  is_target = columns == targets
  out = [None] * len(col)
  out[S_BEST] = _best(col[S_MAX], col[S_BEST], z, columns)
  out[S_MAX], out[S_SUM], _, _ = _online(col[S_MAX], col[S_SUM], z)
  out[S_TARGET] = col[S_TARGET] + jnp.where(is_target, z, 0.0).sum(-1, keepdims=True)
  if u is None:
    return out
  out[Q_MAX], out[Q_SUM], _, _ = _online(col[Q_MAX], col[Q_SUM], z / tau)
  out[R_MAX], out[R_SUM], r, rescale = _online(col[R_MAX], col[R_SUM], u / tau)
  z_finite = jnp.where(r > 0, z, 0.0)  # z is -inf exactly where r is 0 past the vocabulary
  out[R_ZSUM] = col[R_ZSUM] * rescale + (r * z_finite / tau).sum(-1, keepdims=True)
  out[T_BEST] = _best(col[T_MAX], col[T_BEST], u, columns)
  out[T_MAX], out[T_SUM], _, _ = _online(col[T_MAX], col[T_SUM], u)
  out[T_TARGET] = col[T_TARGET] + jnp.where(is_target, u, 0.0).sum(-1, keepdims=True)
  return out


def combine(stats: jax.Array, axis_name) -> jax.Array:
  """The statistics over all shards of `axis_name`, each holding disjoint columns (inside shard_map)."""
  out = stats
  for max_col, sum_cols in _SCALED:
    if max_col >= stats.shape[1]:
      break
    local = stats[:, max_col]
    common = jax.lax.pmax(local, axis_name)
    out = out.at[:, max_col].set(common)
    for c in sum_cols:
      out = out.at[:, c].set(jax.lax.psum(stats[:, c] * jnp.exp(local - common), axis_name))
  for target, best, max_col in ((S_TARGET, S_BEST, S_MAX), (T_TARGET, T_BEST, T_MAX)):
    if best >= stats.shape[1]:
      break
    out = out.at[:, target].set(jax.lax.psum(stats[:, target], axis_name))
    holds_max = stats[:, max_col] == out[:, max_col]
    out = out.at[:, best].set(jax.lax.pmin(jnp.where(holds_max, stats[:, best], jnp.inf), axis_name))
  return out


def losses(stats: jax.Array) -> TokenLosses:
  """The per-token terms (see kernels.reference) from final statistics."""
  ce = stats[:, S_MAX] + jnp.log(stats[:, S_SUM]) - stats[:, S_TARGET]
  if stats.shape[1] == width(False):
    return TokenLosses(ce=ce)
  return TokenLosses(
      ce=ce,
      kd=stats[:, Q_MAX] + jnp.log(stats[:, Q_SUM]) - stats[:, R_ZSUM] / stats[:, R_SUM],
      teacher_ce=stats[:, T_MAX] + jnp.log(stats[:, T_SUM]) - stats[:, T_TARGET],
      agree=(stats[:, S_BEST] == stats[:, T_BEST]).astype(jnp.float32),
  )


def backward_coefficients(stats: jax.Array, g_ce: jax.Array, g_kd: jax.Array | None, tau: float) -> jax.Array:
  """[T, 5]: log-normaliser of the student, g_ce, of the student at tau, of the teacher at tau, g_kd / tau.

  d loss / d z = g_ce (softmax(z) - onehot) + g_kd / tau (softmax(z / tau) - softmax(u / tau)).
  """
  lse = stats[:, S_MAX] + jnp.log(stats[:, S_SUM])
  if g_kd is None:
    zero = jnp.zeros_like(lse)
    return jnp.stack([lse, g_ce, zero, zero, zero], axis=1)
  return jnp.stack([lse, g_ce, stats[:, Q_MAX] + jnp.log(stats[:, Q_SUM]),
                    stats[:, R_MAX] + jnp.log(stats[:, R_SUM]), g_kd / tau], axis=1)
