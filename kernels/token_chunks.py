"""The teacher-student loss shaped for GPUs: tokens in chunks, the gradients in the forward pass.

A GPU wants its work on the tensor cores. So the tokens are walked in chunks of C;
per chunk, both models' logits come from one matmul each over this shard's whole
vocabulary (operands and logits in the compute dtype, bf16 in training, accumulated
in float32); one elementwise pass reduces them to the per-token statistics
(kernels.stats) and, with those, forms dz; two more matmuls give dh = dz W^T and
add h^T dz into dW. Nothing is recomputed: the training loss is a scalar at the end
of the graph, and each token's weights on CE and KD (w, the mask, the normaliser)
are inputs, so the gradients are final here and the backward pass only scales them
by the scalar's cotangent. Memory is the inputs, dW (in the unembedding's dtype, as
the gradient of an fp32 parameter or, for bf16 weights, accumulated in bf16 as Liger
does), and one chunk's logits of both models and dz: C x V_shard x 3 values of the
compute dtype, no float32 [C, V].

For a token with logits z (student), u (teacher), target y and weights g_ce, g_kd:

  d loss / d z = g_ce (softmax(z) - onehot(y)) + g_kd / tau (softmax(z / tau) - softmax(u / tau))

Shapes in names: T tokens (of this shard), D student width, G teacher width, V this
shard's vocabulary columns, C chunk, N = T / C chunks, A statistics per token.
"""

import jax
import jax.numpy as jnp

from kernels import stats as S

# Bytes the chunk's [C, V] arrays may take: the chunk is the largest power of two,
# from 256 to 8192 tokens, whose logits of both models and dz fit in it.
CHUNK_BUDGET_BYTES = 1 << 30


def default_chunk(vocab: int, itemsize: int, with_teacher: bool) -> int:
  per_token = vocab * itemsize * (3 if with_teacher else 2)
  chunk = 256
  while chunk < 8192 and 2 * chunk * per_token <= CHUNK_BUDGET_BYTES:
    chunk *= 2
  return chunk


def _dz(z_CxV, u_CxV, ids_C, coef_Cx5, tau):
  """d loss / d z of a chunk, float32 (see the module docstring); coef from S.backward_coefficients."""
  lse, g_ce, lse_tau, lse_teacher, g_kd_over_tau = (coef_Cx5[:, c:c + 1] for c in range(5))
  z = z_CxV.astype(jnp.float32)
  columns = jax.lax.broadcasted_iota(jnp.int32, z.shape, 1)
  dz = g_ce * (jnp.exp(z - lse) - (columns == ids_C[:, None]))
  if u_CxV is not None:
    dz += g_kd_over_tau * (jnp.exp(z / tau - lse_tau) - jnp.exp(u_CxV.astype(jnp.float32) / tau - lse_teacher))
  return dz


def losses_and_gradients(
    h_s_TxD: jax.Array,
    w_s_DxV: jax.Array,
    ids_T: jax.Array,
    teacher: tuple[jax.Array, jax.Array] | None,
    g_ce_T: jax.Array,
    g_kd_T: jax.Array | None,
    *,
    tau: float,
    chunk: int,
    gradients: bool = True,
    vocab_axes: tuple[str, ...] = (),
    offset: jax.Array | int = 0,
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
  """Per-token statistics [T, A] over all vocabulary shards, and (with `gradients`)
  dh [T, D] and this shard's dW [D, V] for the loss sum_t g_ce CE + g_kd KD.

  `ids_T` are the targets as this shard's column ids (-1: another shard's column);
  `offset` is the shard's first column, so that the argmax statistics are global.
  Inside shard_map, `vocab_axes` name the axes the vocabulary is split over: the
  statistics are combined and dh summed over them. dW covers this shard's tokens only.
  T need not be a multiple of `chunk`: padded tokens weigh 0.
  """
  T, D = h_s_TxD.shape
  V = w_s_DxV.shape[1]
  dtype = h_s_TxD.dtype
  C = min(chunk, T)
  N = -(-T // C)
  pad = lambda x, value=0: jnp.pad(x, [(0, N * C - T)] + [(0, 0)] * (x.ndim - 1), constant_values=value)
  split = lambda x: x.reshape(N, C, *x.shape[1:])
  w_s = w_s_DxV.astype(dtype)
  w_t = None if teacher is None else teacher[1].astype(teacher[0].dtype)
  g_kd_T = jnp.zeros_like(g_ce_T) if g_kd_T is None else g_kd_T
  xs = [split(pad(h_s_TxD)), split(pad(ids_T, -1)), split(pad(g_ce_T)), split(pad(g_kd_T))]
  if teacher is not None:
    xs.append(split(pad(teacher[0])))
  A = S.width(teacher is not None)
  best = [S.S_BEST, S.T_BEST][:1 if teacher is None else 2]

  def body(dw_DxV, chunk_xs):
    h_CxD, ids_C, g_ce_C, g_kd_C, *h_t = chunk_xs
    z_CxV = jnp.dot(h_CxD, w_s, preferred_element_type=dtype)
    u_CxV = jnp.dot(h_t[0], w_t, preferred_element_type=h_t[0].dtype) if h_t else None
    columns_1xV = jax.lax.broadcasted_iota(jnp.int32, (1, V), 1)
    stats_CxA = S.fold(S.initial((C, A)), z_CxV.astype(jnp.float32),
                       None if u_CxV is None else u_CxV.astype(jnp.float32), columns_1xV, ids_C[:, None], tau)
    if vocab_axes:
      stats_CxA = S.combine(stats_CxA.at[:, best].add(offset), vocab_axes)
    if not gradients:
      return dw_DxV, (stats_CxA, None)
    coef_Cx5 = S.backward_coefficients(stats_CxA, g_ce_C, None if u_CxV is None else g_kd_C, tau)
    dz_CxV = _dz(z_CxV, u_CxV, ids_C, coef_Cx5, tau).astype(dtype)
    dh_CxD = jnp.dot(dz_CxV, w_s.T, preferred_element_type=jnp.float32)
    if vocab_axes:
      dh_CxD = jax.lax.psum(dh_CxD, vocab_axes)
    # In dW's own dtype, so that the GPU adds into dW inside the matmul (no [D, V] temporary).
    dw_DxV = dw_DxV + jnp.dot(h_CxD.T, dz_CxV, preferred_element_type=dw_DxV.dtype)
    return dw_DxV, (stats_CxA, dh_CxD.astype(dtype))

  dw0 = jnp.zeros((D, V), w_s_DxV.dtype) if gradients else None
  dw_DxV, (stats_NxCxA, dh_NxCxD) = jax.lax.scan(body, dw0, xs)
  stats_TxA = stats_NxCxA.reshape(N * C, A)[:T]
  if not gradients:
    return stats_TxA, None, None
  return stats_TxA, dh_NxCxD.reshape(N * C, D)[:T], dw_DxV
