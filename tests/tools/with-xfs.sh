#!/usr/bin/env bash
# Usage: with-xfs.sh SIZE COMMAND...
# Makes a sparse loop file, formats it XFS with reflink, mounts it, runs COMMAND with
# XFS_MNT set to the mount point, then unmounts and removes everything, whatever happens.
set -euo pipefail
size=$1; shift
work=$(mktemp -d /tmp/pg-reflinker-xfs.XXXXXX)
cleanup() {
    set +e
    if mountpoint -q "$work/mnt"; then
        # Bind mounts left below the mount point would keep it busy.
        grep -F " $work/" /proc/self/mountinfo | awk '{print $5}' | sort -r | while read -r m; do
            umount -l "$m" 2>/dev/null || true
        done
        mountpoint -q "$work/mnt" && umount "$work/mnt"
    fi
    rm -rf "$work"
}
trap cleanup EXIT
truncate -s "$size" "$work/disk.img"
mkfs.xfs -q -m reflink=1 "$work/disk.img"
mkdir "$work/mnt"
mount -o loop "$work/disk.img" "$work/mnt"
XFS_MNT="$work/mnt" "$@"
