#!/usr/bin/env bash
# Check a MovieLens archive against the MD5 that GroupLens publishes beside it.
set -euo pipefail

PROG=$(basename "$0")
BASE_URL=https://files.grouplens.org/datasets/movielens
KNOWN="ml-100k ml-1m ml-10m ml-20m ml-25m ml-32m ml-latest-small"

usage() {
    cat <<USAGE
Usage: $PROG DATASET ZIPFILE
       $PROG DATASET

Compare ZIPFILE's MD5 with the one GroupLens publishes at $BASE_URL/DATASET.zip.md5.
With DATASET alone, as the original script, check DATASET.zip in the current directory (or in
/data, where download_dataset.sh puts it) and print PASSED or FAILED.
The sums of ml-100k, ml-1m, ml-10m, ml-20m and ml-25m are built in; for ml-32m and
ml-latest-small (which GroupLens regenerates now and then) the published file is fetched, so
checking those needs the network.
Exit status 0 when they match, 1 otherwise.

DATASET is one of: $KNOWN
USAGE
}

die() {
    echo "$PROG: $*" >&2
    exit 1
}

# The values GroupLens publishes in DATASET.zip.md5 for its frozen releases.
published_md5() {
    case "$1" in
        ml-100k) echo 0e33842e24a9c977be4e0107933c0723 ;;
        ml-1m) echo c4d9eecfca2ab87c1945afe126590906 ;;
        ml-10m) echo ce571fd55effeba0271552578f2648bd ;;
        ml-20m) echo cd245b17a1ae2cc31bb14903e1204af3 ;;
        ml-25m) echo 6b51fb2759a8657d3bfcbfc42b592ada ;;
        *) fetch_md5 "$BASE_URL/$1.zip.md5" ;;
    esac
}

# GroupLens writes "MD5 (NAME.zip) = HEX"; md5sum's "HEX  NAME.zip" is taken too: the sum is
# the one run of 32 hex digits.
fetch_md5() {
    local text
    if command -v curl >/dev/null; then
        text=$(curl -fsSL --retry 3 "$1") || text=
    elif command -v wget >/dev/null; then
        text=$(wget -q -O - "$1") || text=
    else
        text=
    fi
    [ -n "$text" ] || die "cannot fetch the published MD5 from $1 (offline, or no curl/wget); compare \`md5sum $ZIPFILE\` with it by hand"
    [[ "$text" =~ (^|[^[:xdigit:]])([[:xdigit:]]{32})([^[:xdigit:]]|$) ]] || return 0
    echo "${BASH_REMATCH[2]}" | tr '[:upper:]' '[:lower:]'
}

case "${1:-}" in
    -h | --help) usage; exit 0 ;;
esac
if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "$PROG: needs DATASET and optionally ZIPFILE (see $PROG -h)" >&2
    exit 2
fi

DATASET=$1
ORIGINAL_FORM=
if [ $# -eq 2 ]; then
    ZIPFILE=$2
else
    ORIGINAL_FORM=1
    ZIPFILE=$DATASET.zip
    [ -f "$ZIPFILE" ] || [ ! -f "/data/$DATASET.zip" ] || ZIPFILE=/data/$DATASET.zip
    # every failure below exits non-zero from this shell (die, or set -e after a failed fetch)
    trap '[ $? -eq 0 ] || echo FAILED' EXIT
fi
[[ " $KNOWN " == *" $DATASET "* ]] || die "unknown dataset '$DATASET'; known: $KNOWN"
[ -f "$ZIPFILE" ] || die "$ZIPFILE: no such file; download it with download_dataset.sh $DATASET"

# Read from stdin: md5sum would take a name starting with "-" for an option, and marks the sum
# of a name holding a backslash with a leading "\".
if command -v md5sum >/dev/null; then
    ACTUAL=$(md5sum <"$ZIPFILE" | cut -d' ' -f1)
else
    ACTUAL=$(md5 -q <"$ZIPFILE")
fi
EXPECTED=$(published_md5 "$DATASET")
[[ "$EXPECTED" =~ ^[0-9a-f]{32}$ ]] || die "no MD5 in the file published for $DATASET"
[ "$ACTUAL" = "$EXPECTED" ] ||
    die "$ZIPFILE: MD5 $ACTUAL does not match the published $EXPECTED for $DATASET; delete it and download again"
if [ -n "$ORIGINAL_FORM" ]; then
    echo PASSED
else
    echo "$ZIPFILE: MD5 matches the published one for $DATASET"
fi
