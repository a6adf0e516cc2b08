FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 BCFY_STATE_DIR=/var/lib/bcfy
WORKDIR /app

COPY pyproject.toml README.md beat_schedule.py ./
COPY workers ./workers
COPY tasks ./tasks
COPY sql ./sql
RUN pip install -e ".[whisper]" \
 && useradd --system --home /var/lib/bcfy --create-home bcfy

USER bcfy
CMD ["bcfy", "--help"]
