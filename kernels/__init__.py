"""Loss kernels of salt. Nothing here imports `trainer`."""

from kernels.losses import IMPLS, token_losses, weighted_loss
from kernels.reference import TokenLosses, ce_and_rank

__all__ = ['IMPLS', 'TokenLosses', 'ce_and_rank', 'token_losses', 'weighted_loss']
