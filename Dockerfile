# The bot on an NVIDIA GPU. Build and run (or use docker-compose.yml, which sets all of this):
#   docker build -t imagine-bot .
#   docker run -d --restart unless-stopped --gpus all --stop-timeout 90 \
#     -v $PWD/models:/srv/bot/models -v $PWD/data:/srv/bot/data -v $PWD/outputs:/srv/bot/outputs \
#     -v $PWD/config.toml:/srv/bot/config.toml:ro -e DISCORD_TOKEN -e TELEGRAM_TOKEN imagine-bot
# The host needs the NVIDIA driver (580 or newer for the CUDA 13 builds of PyTorch that pip
# installs; `nvidia-smi` shows the version) and the NVIDIA container toolkit, nothing else.
# The bot runs as uid 10001: the bind-mounted folders must be writable by it and config.toml
# readable by it (`sudo chown -R 10001 models data outputs config.toml`), see the README.
FROM python:3.11-slim

# torch.compile (model.compile) builds Triton kernels with a C compiler; without one it falls
# back to eager, about 30% slower. Debian's current gcc is wanted, whatever its version.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# torch.compile's kernels are cached on the data volume, so a restarted container skips most of
# the start-up compilation.
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MODELSCOPE_CACHE=/srv/bot/models TORCHINDUCTOR_CACHE_DIR=/srv/bot/data/torch-compile-cache

WORKDIR /srv/bot
# The dependencies (about 6 GB) in a layer of their own: a change to the code reuses it. The
# cluster extra (nats-py, nkeys: a few MB) lets the same image run `python -m bot worker`.
# Versions come from pyproject.toml (DL3013 takes the extra for an unpinned package).
COPY pyproject.toml README.md ./
# hadolint ignore=DL3013
RUN mkdir -p engine bot \
    && touch engine/__init__.py bot/__init__.py \
    && pip install ".[cluster]" \
    && pip uninstall -y imagine-bot
COPY engine ./engine
COPY bot ./bot
COPY config.example.toml ./
RUN pip install --no-deps . \
    && useradd --create-home --uid 10001 bot \
    && mkdir -p models data outputs \
    && chown -R 10001:10001 /srv/bot

USER 10001
# Models (about 33 GB, downloaded on first start), the SQLite journal, and the images.
VOLUME ["/srv/bot/models", "/srv/bot/data", "/srv/bot/outputs"]
# Files and the bot's heartbeat only: never the GPU (a CUDA context every 30 s would take
# memory from the model). Loading and compiling take minutes on the first start.
HEALTHCHECK --interval=30s --timeout=20s --start-period=15m --retries=4 \
    CMD ["python", "-m", "bot", "doctor", "--quick"]
# SIGTERM lets the running image finish within engine.shutdown_grace_s (60 s): give Docker's
# stop at least that long (docker run --stop-timeout 90, compose's stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "bot"]
CMD ["run"]
