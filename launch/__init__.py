"""Launchers: a Cloud TPU pod through gcloud (tpu.py), a local multi-process cluster (local.py)."""
