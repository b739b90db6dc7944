# The bayesal image: the worker (Prefect process worker that runs campaign flows) and the
# dashboard. Configuration comes from environment variables only (see docker-compose.yml).
FROM python:3.11-slim

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    BAYESAL_REPO=/opt/bayesal BAYESAL_DATA_DIR=/data

RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends build-essential libpq5 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/bayesal
# CPU torch first: a bare `torch` would pull a multi-GB CUDA build. For GPU training use a
# CUDA base image and the matching torch wheel instead.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY bayesal bayesal
COPY cli cli
COPY flows flows
COPY tasks tasks
COPY bayes_model bayes_model
COPY labelers labelers
COPY db db
COPY dashboard dashboard
COPY examples examples
COPY prefect.yaml ./
RUN pip install -e . && useradd --create-home bayesal && mkdir -p /data \
 && chown bayesal /data
USER bayesal
VOLUME /data

# default: a process worker on the `bayesal` pool (the compose file sets the command)
CMD ["prefect", "worker", "start", "--pool", "bayesal", "--type", "process"]
