# moe-cluster image for KubeRay: Ray's own image (same Ray as pyproject) + this package.
# Build: docker build -t moe-cluster:latest .
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /home/ray/moe-cluster
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users cluster ./cluster
COPY --chown=ray:users deployments ./deployments
COPY --chown=ray:users protos ./protos
COPY --chown=ray:users models ./models
# The base image's torch (CUDA build) is used as is; only the project and its small deps install.
RUN pip install --no-cache-dir -e .
# Serve resolves import paths and model paths relative to the working directory.
ENV PYTHONPATH=/home/ray/moe-cluster
