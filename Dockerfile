# pg-reflinker: one image for `reflinker-csi controller` (runs as non-root) and
# `reflinker-csi node` (privileged: it bind-mounts volumes).
# Debian's own Python in a virtual environment, so the image can be rebuilt from Debian's
# archive and PyPI alone.
FROM debian:bookworm-slim

# python3 and venv run the driver; libpq5 is the client library psycopg uses for hot clones;
# util-linux (mount, umount) and coreutils (cp --reflink) are the tools the node plugin uses.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-venv libpq5 util-linux coreutils ca-certificates \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml requirements.lock README.md ./
COPY csi ./csi
COPY reflinker_csi ./reflinker_csi
# The lock file pins every dependency's version (it also lists test tools, which are skipped).
RUN python3 -m venv /opt/pg-reflinker \
    && /opt/pg-reflinker/bin/pip install --no-cache-dir --disable-pip-version-check \
        --constraint requirements.lock . \
    && rm -rf /src
ENV PATH=/opt/pg-reflinker/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# The controller runs as this user; the node DaemonSet overrides it with root.
USER 65532:65532
WORKDIR /
ENTRYPOINT ["reflinker-csi"]
