"""Per-token student and teacher-student losses from hidden states and unembeddings,
one vocabulary chunk at a time: the plain-JAX reference.

It never holds a [T, V] array of either model: a scan walks the vocabulary in chunks
of C columns keeping online log-sum-exp statistics (running max and sum of
exponentials, as flash attention does) for the student at temperature 1 and tau, and
for the teacher at tau and 1, plus the teacher-weighted sum of student logits that the
distillation term needs. The scan body is rematerialised, so the backward pass
recomputes each [T, C] block instead of storing it: peak memory is O(T x C).

For a token with student logits z, teacher logits u, target y, temperature tau:

  ce          = logsumexp(z) - z[y]
  kd          = -sum_v softmax(u / tau)[v] * log_softmax(z / tau)[v]
              = logsumexp(z / tau) - sum_v softmax(u / tau)[v] * z[v] / tau
  teacher_ce  = logsumexp(u) - u[y]
  agree       = argmax z == argmax u

With teacher_top_k = k > 0 the teacher distribution keeps only the tokens whose
logit reaches its k-th largest (ties may keep a few more), renormalised. Gradients
flow to the student only.

Shapes in names: T tokens, D student width, G teacher width, V vocabulary, C chunk,
N = ceil(V / C) chunks, k the teacher's kept tokens (salt.teacher_top_k).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

# A finite start for running maxima keeps exp(max - new_max) free of inf - inf.
_LOW = -1e30


class TokenLosses(NamedTuple):
  ce: jax.Array  # [T] float32
  kd: jax.Array | None = None  # [T] float32; None without a teacher
  teacher_ce: jax.Array | None = None
  agree: jax.Array | None = None  # [T] float32, 1.0 where the top-1 tokens agree


def _chunked(w_XxV: jax.Array, dtype, C: int) -> jax.Array:
  X, V = w_XxV.shape
  N = -(-V // C)
  return jnp.pad(w_XxV.astype(dtype), ((0, 0), (0, N * C - V))).reshape(X, N, C).transpose(1, 0, 2)


def _online_lse(max_T, sum_T, logits_TxC):
  """Folds a chunk into a running (max, sum of exp(x - max))."""
  new_max_T = jnp.maximum(max_T, logits_TxC.max(-1))
  return new_max_T, sum_T * jnp.exp(max_T - new_max_T) + jnp.exp(logits_TxC - new_max_T[:, None]).sum(-1)


def token_losses(
    h_s_TxD: jax.Array,
    w_s_DxV: jax.Array,
    targets_T: jax.Array,
    teacher: tuple[jax.Array, jax.Array] | None = None,
    *,
    tau: float = 1.0,
    teacher_top_k: int = 0,
    chunk: int = 8192,
) -> TokenLosses:
  """The per-token loss terms (see the module docstring), float32.

  Args:
    h_s_TxD: student hidden states; the student's matmuls run in this dtype.
    w_s_DxV: student unembedding.
    targets_T: int token ids in [0, V).
    teacher: (h_t_TxG, w_t_GxV) or None for the student's cross-entropy alone.
    tau: distillation temperature.
    teacher_top_k: truncate the teacher to its top k tokens (0: keep all).
    chunk: vocabulary columns per block; the last block is padded and masked.
  """
  T = h_s_TxD.shape[0]
  V = w_s_DxV.shape[1]
  C = min(chunk, V)
  N = -(-V // C)
  ws_NxDxC = _chunked(w_s_DxV, h_s_TxD.dtype, C)
  starts_N = jnp.arange(N) * C
  low, zero = jnp.full((T,), _LOW, jnp.float32), jnp.zeros((T,), jnp.float32)
  first_T = jnp.zeros((T,), jnp.int32)

  def logits(h, w_XxC, start):
    z_TxC = jnp.dot(h, w_XxC, preferred_element_type=jnp.float32)
    columns_C = start + jnp.arange(C)
    return jnp.where(columns_C < V, z_TxC, -jnp.inf), columns_C

  def student_terms(carry, z_TxC, columns_C):
    max_T, sum_T, target_T, best_T = carry
    chunk_best_T = columns_C[jnp.argmax(z_TxC, -1)]
    best_T = jnp.where(z_TxC.max(-1) > max_T, chunk_best_T, best_T)
    max_T, sum_T = _online_lse(max_T, sum_T, z_TxC)
    target_T = target_T + jnp.where(columns_C == targets_T[:, None], z_TxC, 0.0).sum(-1)
    return max_T, sum_T, target_T, best_T

  if teacher is None:
    @jax.checkpoint
    def step(carry, xs):
      w_DxC, start = xs
      z_TxC, columns_C = logits(h_s_TxD, w_DxC, start)
      return student_terms(carry, z_TxC, columns_C), None

    (max_T, sum_T, target_T, _), _ = jax.lax.scan(step, (low, zero, zero, first_T), (ws_NxDxC, starts_N))
    return TokenLosses(ce=max_T + jnp.log(sum_T) - target_T)

  h_t_TxG, w_t_GxV = jax.tree.map(jax.lax.stop_gradient, teacher)
  wt_NxGxC = _chunked(w_t_GxV, h_t_TxG.dtype, C)
  threshold_T = jnp.full((T,), -jnp.inf)
  if teacher_top_k:
    def top_k_step(top_Txk, xs):
      u_TxC, _ = logits(h_t_TxG, *xs)
      return jax.lax.top_k(jnp.concatenate([top_Txk, u_TxC], -1), teacher_top_k)[0], None

    top_Txk, _ = jax.lax.scan(top_k_step, jnp.full((T, teacher_top_k), -jnp.inf), (wt_NxGxC, starts_N))
    threshold_T = top_Txk[:, -1]

  @jax.checkpoint
  def step(carry, xs):
    student, teacher_1, (tau_max_T, tau_sum_T), (t_max_T, t_sum_T, weighted_T) = carry
    ws_DxC, wt_GxC, start = xs
    z_TxC, columns_C = logits(h_s_TxD, ws_DxC, start)
    u_TxC, _ = logits(h_t_TxG, wt_GxC, start)
    student = student_terms(student, z_TxC, columns_C)
    teacher_1 = student_terms(teacher_1, u_TxC, columns_C)
    tau_max_T, tau_sum_T = _online_lse(tau_max_T, tau_sum_T, z_TxC / tau)
    # The teacher at tau, over its kept tokens; `weighted` is sum exp(u/tau - max) z/tau.
    kept_TxC = jnp.where(u_TxC >= threshold_T[:, None], u_TxC / tau, -jnp.inf)
    new_t_max_T = jnp.maximum(t_max_T, kept_TxC.max(-1))
    p_TxC = jnp.exp(kept_TxC - new_t_max_T[:, None])
    rescale_T = jnp.exp(t_max_T - new_t_max_T)
    t_sum_T = t_sum_T * rescale_T + p_TxC.sum(-1)
    weighted_T = weighted_T * rescale_T + jnp.where(p_TxC > 0, p_TxC * z_TxC / tau, 0.0).sum(-1)
    return (student, teacher_1, (tau_max_T, tau_sum_T), (new_t_max_T, t_sum_T, weighted_T)), None

  init = ((low, zero, zero, first_T), (low, zero, zero, first_T), (low, zero), (low, zero, zero))
  (student, teacher_1, (tau_max_T, tau_sum_T), (_, t_sum_T, weighted_T)), _ = jax.lax.scan(
      step, init, (ws_NxDxC, wt_NxGxC, starts_N))
  max_T, sum_T, target_T, best_T = student
  t_max_1, t_sum_1, t_target_T, t_best_T = teacher_1
  return TokenLosses(
      ce=max_T + jnp.log(sum_T) - target_T,
      kd=tau_max_T + jnp.log(tau_sum_T) - weighted_T / t_sum_T,
      teacher_ce=t_max_1 + jnp.log(t_sum_1) - t_target_T,
      agree=(best_T == t_best_T).astype(jnp.float32),
  )


def ce_and_rank(h_TxD: jax.Array, w_DxV: jax.Array, targets_T: jax.Array, *,
                chunk: int = 8192) -> tuple[jax.Array, jax.Array]:
  """Each target's cross-entropy, float32 [T], and rank: how many other tokens have a larger logit, int32 [T].

  Two scans over the vocabulary, no sort: the first reads each target's logit from the
  chunk products and keeps the online log-sum-exp, the second counts the larger
  logits. The target's own column is left out of the count, so it is never compared
  with a recomputed copy of itself; ties rank in its favour. The target is in the top
  k exactly when its rank is below k.
  """
  T = h_TxD.shape[0]
  V = w_DxV.shape[1]
  C = min(chunk, V)
  xs = (_chunked(w_DxV, h_TxD.dtype, C), jnp.arange(-(-V // C)) * C)

  def products(w_DxC, start):
    z_TxC = jnp.dot(h_TxD, w_DxC, preferred_element_type=jnp.float32)
    columns_C = start + jnp.arange(C)
    return jnp.where(columns_C < V, z_TxC, -jnp.inf), columns_C

  def target_step(carry, xs):
    max_T, sum_T, target_T = carry
    z_TxC, columns_C = products(*xs)
    max_T, sum_T = _online_lse(max_T, sum_T, z_TxC)
    return (max_T, sum_T, target_T + jnp.where(columns_C == targets_T[:, None], z_TxC, 0.0).sum(-1)), None

  init = (jnp.full((T,), _LOW, jnp.float32), jnp.zeros((T,), jnp.float32), jnp.zeros((T,), jnp.float32))
  (max_T, sum_T, target_T), _ = jax.lax.scan(target_step, init, xs)

  def count_step(count_T, xs):
    z_TxC, columns_C = products(*xs)
    larger = (z_TxC > target_T[:, None]) & (columns_C != targets_T[:, None])
    return count_T + larger.sum(-1, dtype=jnp.int32), None

  rank_T, _ = jax.lax.scan(count_step, jnp.zeros((T,), jnp.int32), xs)
  return max_T + jnp.log(sum_T) - target_T, rank_T
