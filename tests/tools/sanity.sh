#!/usr/bin/env bash
# Runs csi-sanity against `reflinker-csi standalone` on the XFS filesystem at $XFS_MNT.
# Needs: CSI_SANITY (the binary), REFLINKER (the reflinker-csi command).
set -euo pipefail
: "${XFS_MNT:?run me through with-xfs.sh}"
prefix="$XFS_MNT/volumes"
work=$(dirname "$XFS_MNT")
targets="$work/targets"
mkdir -p "$prefix" "$targets"
sock="$work/csi.sock"
HOSTPATH_PREFIX="$prefix" TARGET_ROOT="$targets" CSI_ENDPOINT="unix://$sock" NODE_ID=sanity-node \
    LOG_LEVEL="${LOG_LEVEL:-info}" "$REFLINKER" standalone 2>"$work/driver.log" &
driver=$!
trap 'kill $driver 2>/dev/null; wait $driver 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
status=0
"$CSI_SANITY" -csi.endpoint "unix://$sock" \
    -csi.mountdir "$targets/mount" -csi.stagingdir "$targets/stage" \
    -csi.testvolumesize 1073741824 -ginkgo.no-color ${SANITY_ARGS:-} || status=$?
if [ $status -ne 0 ]; then
    echo "--- driver log (last 60 lines) ---"; tail -60 "$work/driver.log"
fi
exit $status
