# The bot on an NVIDIA GPU: docker build -t imagine-bot . && docker run --gpus all \
#   -v $PWD/models:/srv/bot/models -v $PWD/data:/srv/bot/data -v $PWD/outputs:/srv/bot/outputs \
#   -v $PWD/config.toml:/srv/bot/config.toml:ro -e DISCORD_TOKEN -e TELEGRAM_TOKEN imagine-bot
# PyTorch's CUDA wheels carry the CUDA runtime; the host needs only the NVIDIA driver and the
# NVIDIA container toolkit.
FROM python:3.11-slim

# torch.compile's kernels are cached on the data volume, so a restarted container skips most of
# the start-up compilation (model.compile).
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MODELSCOPE_CACHE=/srv/bot/models TORCHINDUCTOR_CACHE_DIR=/srv/bot/data/torch-compile-cache

WORKDIR /srv/bot
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY bot ./bot
COPY config.example.toml ./
RUN pip install . \
    && useradd --create-home --uid 10001 bot \
    && mkdir -p models data outputs \
    && chown -R bot:bot /srv/bot

USER bot
# Models (about 33 GB, downloaded on first start), the SQLite journal, and the images.
VOLUME ["/srv/bot/models", "/srv/bot/data", "/srv/bot/outputs"]
ENTRYPOINT ["python", "-m", "bot"]
CMD ["run"]
