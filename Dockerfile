# pg-reflinker: one image for `reflinker-csi controller` (runs as non-root) and
# `reflinker-csi node` (privileged: it bind-mounts volumes).
FROM python:3.11.7-slim-bookworm

# util-linux (mount, umount) and coreutils (cp --reflink) are the tools the node plugin uses.
RUN apt-get update \
    && apt-get install -y --no-install-recommends util-linux coreutils \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml requirements.lock README.md ./
COPY csi ./csi
COPY reflinker_csi ./reflinker_csi
# The lock file pins every dependency's version (it also lists test tools, which are skipped).
RUN pip install --no-cache-dir --constraint requirements.lock . \
    && rm -rf /src

# The controller runs as this user; the node DaemonSet overrides it with root.
USER 65532:65532
ENTRYPOINT ["reflinker-csi"]
