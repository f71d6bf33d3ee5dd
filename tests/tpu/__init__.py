"""The TPU compile tier: real TPU programs compiled on a CPU machine by libtpu.

Its tests run where libtpu is installed (`make test-tpu` builds that environment,
.venv-tpu) and are skipped elsewhere. Nothing here runs on a TPU: compiling is what
a machine without one can prove.
"""
