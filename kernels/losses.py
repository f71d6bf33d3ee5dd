"""The teacher-student loss by the implementation the config names.

  xla           the vocabulary-chunked plain-JAX reference (kernels.reference),
                sharded by the compiler
  pallas        the Pallas kernels with a custom VJP (kernels.fused: Mosaic on TPU,
                interpret mode on CPU), run per shard under shard_map: tokens split
                over `token_axes`, the vocabulary over `vocab_axes`, the shards'
                statistics combined with collectives
  token_chunks  tokens in chunks with the gradients in the forward pass
                (kernels.token_chunks, shaped for GPUs), per shard likewise
  auto          per backend, the implementation measured fastest there (FASTEST),
                the reference where an option is one it does not support (the
                reason is logged once)

`weighted_loss` is the trainer's entry point: the loss sum_t g_ce CE + g_kd KD, with
the per-token terms as metrics. `token_losses` gives the per-token terms of xla or
pallas, differentiable term by term.
"""

import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from kernels import fused, reference, token_chunks, tpu
from kernels import stats as S
from kernels.reference import TokenLosses

log = logging.getLogger('salt')
IMPLS = ('xla', 'pallas', 'token_chunks', 'auto')
# Per backend, the implementation `auto` runs: the fastest measured there. The figures,
# and which backends are not measured yet (those get the reference), are in
# BENCHMARKS.md, "Loss kernels"; on CPU the Pallas kernels only interpret.
FASTEST = {'gpu': 'token_chunks', 'tpu': 'xla', 'cpu': 'xla'}


def unsupported(impl: str, backend: str, teacher_top_k: int = 0, *, device_kind: str = '',
                widths: tuple[int, ...] = (), itemsize: int = 2) -> str | None:
  """Why `impl` cannot run this call, or None. `widths`: the student's and the
  teacher's; with `device_kind` (a TPU's), the Pallas kernels' VMEM is checked."""
  if impl == 'xla':
    return None
  if impl == 'pallas' and backend not in ('tpu', 'cpu'):
    return f'the Pallas loss kernels run on tpu (and interpreted on cpu), not {backend}'
  if teacher_top_k:
    return f'{impl} does not truncate the teacher (salt.teacher_top_k > 0)'
  limit = tpu.vmem_limit(device_kind)
  if impl == 'pallas' and limit and widths and not fused.fitting_block(widths, itemsize, limit):
    need = fused.vmem_bytes(*fused.BLOCKS[-1], widths, itemsize) / tpu.MiB
    return (f'the Pallas loss kernels need {need:.0f} MiB of VMEM at widths {widths} even at their smallest block, '
            f'more than the {limit / tpu.MiB:.0f} MiB of a {device_kind} core')
  return None


def choose(impl: str, backend: str, teacher_top_k: int = 0, **shape) -> str:
  """The implementation that will run: `impl`, or for `auto` FASTEST[backend] where it
  can run the call and the reference where not (the reason logged once). `shape`:
  the keywords of `unsupported` that describe the call.

  Raises ValueError when `impl` is unknown, or named and cannot run the call.
  """
  if impl not in IMPLS:
    raise ValueError(f'loss implementation {impl!r} must be one of {IMPLS}')
  if impl != 'auto':
    reason = unsupported(impl, backend, teacher_top_k, **shape)
    if reason:
      raise ValueError(reason)
    return impl
  fastest = FASTEST.get(backend, 'xla')
  reason = unsupported(fastest, backend, teacher_top_k, **shape)
  if reason:
    _log_fallback(reason)
    return 'xla'
  return fastest


@functools.cache
def _log_fallback(reason: str) -> None:
  log.info('loss: the plain-JAX reference: %s', reason)


def _device(mesh: Mesh | None) -> jax.Device:
  return jax.devices()[0] if mesh is None else mesh.devices.flat[0]


def _shape(h_s: jax.Array, teacher, mesh: Mesh | None) -> dict:
  """The keywords of `unsupported` for this call."""
  return dict(device_kind=_device(mesh).device_kind, itemsize=jnp.dtype(h_s.dtype).itemsize,
              widths=(h_s.shape[1],) + (() if teacher is None else (teacher[0].shape[1],)))


@dataclasses.dataclass(frozen=True)
class Options:
  """The keywords of `weighted_loss` and `token_losses` beyond the arrays.

  tau, teacher_top_k: the KD term's temperature and the teacher's kept tokens (0: all).
  impl: one of IMPLS. chunk: the reference's vocabulary chunk; block_t x block_v: the
  Pallas kernels' block; chunk_tokens: token_chunks' chunk (0 for each: the default).
  mesh and the axes: how pallas and token_chunks split the work (no mesh: one shard).
  """
  tau: float = 1.0
  teacher_top_k: int = 0
  impl: str = 'xla'
  chunk: int = 8192
  block_t: int = 0
  block_v: int = 0
  chunk_tokens: int = 0
  mesh: Mesh | None = None
  token_axes: tuple[str, ...] = ()
  vocab_axes: tuple[str, ...] = ()


def weighted_loss(h_s_TxD: jax.Array, w_s_DxV: jax.Array, targets_T: jax.Array,
                  teacher: tuple[jax.Array, jax.Array] | None, g_ce_T: jax.Array, g_kd_T: jax.Array | None = None,
                  **options) -> tuple[jax.Array, TokenLosses]:
  """sum_t g_ce[t] CE[t] + g_kd[t] KD[t], float32, and the per-token terms (no gradient).

  Gradients flow to the student's hidden states and unembedding only; g_ce and g_kd
  (float32 [T]: the mixing weight, the mask and the normaliser) are constants.
  `options`: the fields of Options.

  Raises ValueError when `impl` is named and cannot run the call.
  """
  o = Options(**options)
  impl = choose(o.impl, _device(o.mesh).platform, o.teacher_top_k, **_shape(h_s_TxD, teacher, o.mesh))
  if g_kd_T is None or teacher is None:
    g_kd_T = None
  if impl == 'token_chunks':
    return _token_chunk_loss(h_s_TxD, w_s_DxV, targets_T, teacher, g_ce_T, g_kd_T, tau=o.tau, chunk=o.chunk_tokens,
                             mesh=o.mesh, token_axes=o.token_axes, vocab_axes=o.vocab_axes)
  terms = token_losses(h_s_TxD, w_s_DxV, targets_T, teacher, **{**options, 'impl': impl})
  return _weighted_sum(terms, g_ce_T, g_kd_T), jax.lax.stop_gradient(terms)


def _weighted_sum(terms: TokenLosses, g_ce: jax.Array, g_kd: jax.Array | None) -> jax.Array:
  return (g_ce * terms.ce).sum() + (0.0 if g_kd is None else (g_kd * terms.kd).sum())


def token_losses(h_s_TxD: jax.Array, w_s_DxV: jax.Array, targets_T: jax.Array,
                 teacher: tuple[jax.Array, jax.Array] | None = None, *, mask_T: jax.Array | None = None,
                 **options) -> TokenLosses:
  """Per-token CE (and KD, teacher CE, top-1 agreement with a teacher), float32 [T],
  by `xla` or `pallas`, each term differentiable.

  Gradients flow to the student's hidden states and unembedding only. Tokens where
  `mask_T` is 0 get zero terms (and so no gradient). `options`: the fields of Options.
  """
  o = Options(**options)
  if o.impl not in ('xla', 'pallas'):
    raise ValueError(f'token_losses runs xla or pallas, not {o.impl!r}; weighted_loss runs every implementation')
  if o.impl == 'pallas':
    choose(o.impl, _device(o.mesh).platform, o.teacher_top_k, **_shape(h_s_TxD, teacher, o.mesh))
    out = _pallas_losses(h_s_TxD, w_s_DxV, targets_T, teacher, tau=o.tau, blocks=(o.block_t, o.block_v),
                         device=_device(o.mesh), mesh=o.mesh, token_axes=o.token_axes, vocab_axes=o.vocab_axes)
  else:
    out = reference.token_losses(h_s_TxD, w_s_DxV, targets_T, teacher, tau=o.tau, teacher_top_k=o.teacher_top_k,
                                 chunk=o.chunk)
  if mask_T is None:
    return out
  keep = mask_T > 0
  return TokenLosses(*(None if x is None else jnp.where(keep, x, 0.0) for x in out))


def _local(targets, w_s, vocab_axes):
  """This shard's first column, and the targets as its column ids (-1: another shard's)."""
  offset = jax.lax.axis_index(vocab_axes) * w_s.shape[1] if vocab_axes else 0
  ids = targets - offset
  return offset, jnp.where((ids >= 0) & (ids < w_s.shape[1]), ids, -1)


def _token_chunk_loss(h_s, w_s, targets, teacher, g_ce, g_kd, *, tau, chunk, mesh, token_axes, vocab_axes):
  h_t, w_t = jax.tree.map(jax.lax.stop_gradient, teacher) if teacher is not None else (None, None)
  if not chunk:
    V = w_s.shape[1] // (1 if mesh is None else math.prod(mesh.shape[a] for a in vocab_axes))
    chunk = token_chunks.default_chunk(V, jnp.dtype(h_s.dtype).itemsize, teacher is not None)

  def shard(h_s, w_s, targets, h_t, w_t, g_ce, g_kd, gradients):
    offset, ids = _local(targets, w_s, vocab_axes)
    stats, dh, dw = token_chunks.losses_and_gradients(
        h_s, w_s, ids, None if h_t is None else (h_t, w_t), g_ce, g_kd, tau=tau, chunk=chunk,
        gradients=gradients, vocab_axes=vocab_axes, offset=offset)
    if not gradients:
      return stats
    return stats, dh, jax.lax.psum(dw, token_axes) if token_axes else dw

  shard_stats = functools.partial(shard, gradients=False)
  shard_all = functools.partial(shard, gradients=True)
  if mesh is not None:
    tok, voc = token_axes or None, vocab_axes or None
    teacher_specs = (P(tok, None), P(None, voc)) if h_t is not None else (None, None)
    in_specs = (P(tok, None), P(None, voc), P(tok), *teacher_specs, P(tok), None if g_kd is None else P(tok))
    shard_stats = jax.shard_map(shard_stats, mesh=mesh, in_specs=in_specs, out_specs=P(tok, None), check_vma=False)
    shard_all = jax.shard_map(shard_all, mesh=mesh, in_specs=in_specs,
                              out_specs=(P(tok, None), P(tok, None), P(None, voc)), check_vma=False)

  # The statistics are an output so that the terms can be reported; they carry no
  # gradient (stop_gradient below), so their cotangent is zero and is not used.
  @jax.custom_vjp
  def loss(h_s, w_s, targets, h_t, w_t, g_ce, g_kd):
    stats = shard_stats(h_s, w_s, targets, h_t, w_t, g_ce, g_kd)
    return _weighted_sum(S.losses(stats), g_ce, g_kd), stats

  def forward(h_s, w_s, targets, h_t, w_t, g_ce, g_kd):
    stats, dh, dw = shard_all(h_s, w_s, targets, h_t, w_t, g_ce, g_kd)
    return (_weighted_sum(S.losses(stats), g_ce, g_kd), stats), (dh, dw)

  def backward(residuals, cotangents):
    (dh, dw), (g_loss, _) = residuals, cotangents
    return (g_loss * dh).astype(dh.dtype), (g_loss * dw).astype(dw.dtype), None, None, None, None, None

  loss.defvjp(forward, backward)
  value, stats = loss(h_s, w_s, targets, h_t, w_t, g_ce, g_kd)
  return value, S.losses(jax.lax.stop_gradient(stats))


def _pallas_losses(h_s, w_s, targets, teacher, *, tau, blocks, device, mesh, token_axes, vocab_axes):
  vmem_limit = tpu.vmem_limit(device.device_kind)
  widths = (h_s.shape[1],) + (() if teacher is None else (teacher[0].shape[1],))
  fitting = fused.fitting_block(widths, jnp.dtype(h_s.dtype).itemsize, vmem_limit) if vmem_limit else fused.BLOCK
  block_t, block_v = (b or default for b, default in zip(blocks, fitting))
  kernel_args = dict(backend=device.platform, vmem_limit=vmem_limit, tau=tau, block_t=block_t, block_v=block_v)
  # The kernels multiply in the hidden states' dtype (bf16 on the MXU, half the VMEM).
  w_s = w_s.astype(h_s.dtype)
  h_t, w_t = jax.tree.map(jax.lax.stop_gradient, teacher) if teacher is not None else (None, None)
  w_t = None if w_t is None else w_t.astype(h_t.dtype)
  local = functools.partial(_local, vocab_axes=vocab_axes)

  def shard_stats(h_s, w_s, targets, h_t, w_t):
    """Statistics over all columns, for this shard's tokens."""
    offset, ids = local(targets, w_s)
    local_teacher = None if h_t is None else (h_t, w_t)
    stats = fused.partial_stats(h_s, w_s, ids, local_teacher, **kernel_args)
    if vocab_axes:
      best = [S.S_BEST, S.T_BEST][:1 if h_t is None else 2]
      stats = S.combine(stats.at[:, best].add(offset), vocab_axes)
    return stats

  def shard_gradients(h_s, w_s, targets, h_t, w_t, coef):
    _, ids = local(targets, w_s)
    local_teacher = None if h_t is None else (h_t, w_t)
    dh, dw = fused.gradients(h_s, w_s, ids, local_teacher, coef, **kernel_args)
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
