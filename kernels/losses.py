"""`token_losses`: the loss terms of every token, by the implementation the config names.

  xla     the chunked plain-JAX reference (kernels.reference), sharded by the compiler
  pallas  the Pallas kernels with a custom VJP (kernels.fused on TPU, and in interpret
          mode on CPU; kernels.fused_gpu through Triton on GPU), run per shard under
          shard_map: tokens split over `token_axes`, the vocabulary over `vocab_axes`,
          the shards' statistics combined with collectives
  auto    pallas where the kernels have been compiled and timed on the device, the
          reference elsewhere and wherever an option is one the kernels do not
          support (the reason is logged once)

The kernels are tested in interpret mode and lowered for TPU (Mosaic) and an H100
(Triton) on CPU, but neither has yet run on its device: until a session with the
device compiles and times them (bench/kernel.py), `auto` uses the reference there
and `pallas` opts in.
"""

import functools
import logging

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from kernels import fused, fused_gpu, reference
from kernels import stats as S
from kernels.reference import TokenLosses

log = logging.getLogger('salt')
IMPLS = ('xla', 'pallas', 'auto')
# Devices `auto` keeps on the reference until the kernels are compiled and timed there.
NOT_YET_RUN = {
    'tpu': 'the TPU kernels have not yet been compiled on a TPU (loss.impl=pallas opts in)',
    'gpu': 'the GPU kernels have not yet been compiled on a GPU (loss.impl=pallas opts in)',
}


def unsupported(backend: str, teacher_top_k: int, widths: tuple[int, ...]) -> str | None:
  """Why the Pallas kernels cannot run this call, or None."""
  if backend not in ('tpu', 'gpu', 'cpu'):
    return f'the Pallas kernels have no lowering for {backend}'
  if teacher_top_k:
    return 'the Pallas kernels do not truncate the teacher (salt.teacher_top_k > 0)'
  if backend == 'gpu' and any(d % 16 for d in widths):
    return f'the GPU kernels need model widths that are multiples of 16, got {widths}'
  return None


@functools.cache
def _log_fallback(reason: str) -> None:
  log.info('loss: the plain-JAX reference instead of the Pallas kernels: %s', reason)


def token_losses(
    h_s_TxD: jax.Array,
    w_s_DxV: jax.Array,
    targets_T: jax.Array,
    teacher: tuple[jax.Array, jax.Array] | None = None,
    *,
    mask_T: jax.Array | None = None,
    tau: float = 1.0,
    teacher_top_k: int = 0,
    impl: str = 'xla',
    chunk: int = 8192,
    block_t: int = 0,
    block_v: int = 0,
    mesh: Mesh | None = None,
    token_axes: tuple[str, ...] = (),
    vocab_axes: tuple[str, ...] = (),
) -> TokenLosses:
  """Per-token CE (and KD, teacher CE, top-1 agreement with a teacher), float32 [T].

  Gradients flow to the student's hidden states and unembedding only. Tokens where
  `mask_T` is 0 get zero terms (and so no gradient). `chunk` is the reference's
  vocabulary chunk; `block_t` x `block_v` the kernels' block (0: the kernels'
  default). `mesh` and the axes say how the Pallas path splits the work (no mesh:
  one shard).
  """
  if impl not in IMPLS:
    raise ValueError(f'impl={impl!r} must be one of {IMPLS}')
  backend = jax.default_backend() if mesh is None else mesh.devices.flat[0].platform
  if impl != 'xla':
    widths = (h_s_TxD.shape[1],) + (() if teacher is None else (teacher[0].shape[1],))
    reason = unsupported(backend, teacher_top_k, widths)
    if impl == 'pallas' and reason:
      raise ValueError(f'impl=pallas: {reason}')
    if impl == 'auto':
      reason = reason or NOT_YET_RUN.get(backend)
      impl = 'pallas' if backend != 'cpu' and not reason else 'xla'
      if reason:
        _log_fallback(reason)
  if impl == 'xla':
    out = reference.token_losses(h_s_TxD, w_s_DxV, targets_T, teacher, tau=tau, teacher_top_k=teacher_top_k,
                                 chunk=chunk)
  else:
    out = _pallas_losses(h_s_TxD, w_s_DxV, targets_T, teacher, tau=tau, blocks=(block_t, block_v),
                         backend=backend, mesh=mesh, token_axes=token_axes, vocab_axes=vocab_axes)
  if mask_T is None:
    return out
  keep = mask_T > 0
  return TokenLosses(*(None if x is None else jnp.where(keep, x, 0.0) for x in out))


def _pallas_losses(h_s, w_s, targets, teacher, *, tau, blocks, backend, mesh, token_axes, vocab_axes):
  if backend == 'gpu':
    kernels, kernel_args = fused_gpu, dict(interpret=False)
  else:
    kernels, kernel_args = fused, dict(backend=backend)
  block_t, block_v = (b or default for b, default in zip(blocks, kernels.BLOCK))
  kernel_args.update(tau=tau, block_t=block_t, block_v=block_v)
  h_t, w_t = jax.tree.map(jax.lax.stop_gradient, teacher) if teacher is not None else (None, None)

  def local(targets, w_s):
    """This shard's first column, and the targets as its column ids (-1: another shard's)."""
    offset = jax.lax.axis_index(vocab_axes) * w_s.shape[1] if vocab_axes else 0
    ids = targets - offset
    return offset, jnp.where((ids >= 0) & (ids < w_s.shape[1]), ids, -1)

  def shard_stats(h_s, w_s, targets, h_t, w_t):
    """Statistics over all columns, for this shard's tokens."""
    offset, ids = local(targets, w_s)
    local_teacher = None if h_t is None else (h_t, w_t)
    stats = kernels.partial_stats(h_s, w_s, ids, local_teacher, **kernel_args)
    if vocab_axes:
      best = [S.S_BEST, S.T_BEST][:1 if h_t is None else 2]
      stats = S.combine(stats.at[:, best].add(offset), vocab_axes)
    return stats

  def shard_gradients(h_s, w_s, targets, h_t, w_t, coef):
    _, ids = local(targets, w_s)
    local_teacher = None if h_t is None else (h_t, w_t)
    dh, dw = kernels.gradients(h_s, w_s, ids, local_teacher, coef, **kernel_args)
    if vocab_axes:
      dh = jax.lax.psum(dh, vocab_axes)
    if token_axes:
      dw = jax.lax.psum(dw, token_axes)
    return dh, dw

  if mesh is not None:
    tok, voc = token_axes or None, vocab_axes or None
    teacher_specs = (P(tok, None), P(None, voc)) if h_t is not None else (None, None)
    shard_stats = jax.shard_map(
        shard_stats, mesh=mesh, in_specs=(P(tok, None), P(None, voc), P(tok), *teacher_specs),
        out_specs=P(tok, None), check_vma=False)
    shard_gradients = jax.shard_map(
        shard_gradients, mesh=mesh, in_specs=(P(tok, None), P(None, voc), P(tok), *teacher_specs, P(tok, None)),
        out_specs=(P(tok, None), P(None, voc)), check_vma=False)

  # Targets and the teacher are inputs of the custom VJP, not closed over, so that
  # they may be traced values; their cotangents are zero (None).
  @jax.custom_vjp
  def losses(h_s, w_s, targets, h_t, w_t):
    return S.losses(shard_stats(h_s, w_s, targets, h_t, w_t))

  def forward(h_s, w_s, targets, h_t, w_t):
    stats = shard_stats(h_s, w_s, targets, h_t, w_t)
    return S.losses(stats), (h_s, w_s, targets, h_t, w_t, stats)

  def backward(residuals, cotangents):
    h_s, w_s, targets, h_t, w_t, stats = residuals
    coef = S.backward_coefficients(stats, cotangents.ce, None if h_t is None else cotangents.kd, tau)
    dh, dw = shard_gradients(h_s, w_s, targets, h_t, w_t, coef)
    return dh.astype(h_s.dtype), dw.astype(w_s.dtype), None, None, None

  losses.defvjp(forward, backward)
  return losses(h_s, w_s, targets, h_t, w_t)
