#!/usr/bin/env bash
# Wall times of `make test`'s set-up steps and test stages, printed together at its end.
# Usage: timer.sh reset | start NAME | end NAME | report
# Lines go to $TIMINGS ("<seconds>\t<name>"); the image builds and pytest append to it too,
# their names indented under the stage they ran in.
set -euo pipefail
: "${TIMINGS:?TIMINGS names the file the times go to}"
starts="$TIMINGS.starts"
case "$1" in
reset)
    mkdir -p "$(dirname "$TIMINGS")"
    : >"$TIMINGS"
    rm -f "$TIMINGS.failed"
    rm -rf "$starts" && mkdir -p "$starts"
    ;;
start)
    mkdir -p "$starts"
    date +%s.%N >"$starts/${2//[^A-Za-z0-9._-]/_}"
    ;;
end)
    file="$starts/${2//[^A-Za-z0-9._-]/_}"
    [ -f "$file" ] || exit 0
    awk -v s="$(cat "$file")" -v e="$(date +%s.%N)" -v n="$2" 'BEGIN {printf "%.1f\t%s\n", e - s, n}' >>"$TIMINGS"
    rm -f "$file"
    ;;
report)
    echo "== wall time of each set-up step and test stage (steps not listed were already done)"
    [ -s "$TIMINGS" ] && awk -F'\t' '{printf "%9.1f s  %s\n", $1, $2}' "$TIMINGS"
    for file in "$starts"/*; do
        [ -e "$file" ] && echo "   (did not finish: $(basename "$file"))"
    done
    if [ -s "$TIMINGS.failed" ]; then
        echo "== failed tests"
        sed 's/^/   /' "$TIMINGS.failed"
    fi
    true
    ;;
*)
    echo "usage: timer.sh reset | start NAME | end NAME | report" >&2
    exit 2
    ;;
esac
