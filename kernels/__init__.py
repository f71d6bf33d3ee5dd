"""Loss kernels of salt. Nothing here imports `trainer`."""

from kernels.cross_entropy import chunked_cross_entropy

__all__ = ['chunked_cross_entropy']
