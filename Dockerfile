# The image `salt launch xpk` runs on GKE TPU node pools: salt with jax[tpu] and the
# Cloud Storage filesystems for gs:// run directories.
#   docker build -t us-docker.pkg.dev/PROJECT/REPO/salt:TAG . && docker push us-docker.pkg.dev/PROJECT/REPO/salt:TAG
FROM python:3.12-slim
WORKDIR /salt
COPY pyproject.toml README.md ./
COPY trainer trainer
COPY kernels kernels
COPY configs configs
COPY launch launch
RUN pip install --no-cache-dir '.[tpu]' gcsfs google-cloud-storage
ENV SALT_DISTRIBUTED=auto
