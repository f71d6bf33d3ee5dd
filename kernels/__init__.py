"""Loss kernels of salt. Nothing here imports `trainer`."""

from kernels.reference import TokenLosses, target_in_top_k, token_losses

__all__ = ['TokenLosses', 'target_in_top_k', 'token_losses']
