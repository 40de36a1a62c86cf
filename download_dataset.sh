#!/usr/bin/env bash
# Download a MovieLens archive from GroupLens into RAW_DIR as DATASET.zip.
set -euo pipefail

PROG=$(basename "$0")
BASE_URL=https://files.grouplens.org/datasets/movielens
KNOWN="ml-100k ml-1m ml-10m ml-20m ml-25m ml-32m ml-latest-small"

usage() {
    cat <<USAGE
Usage: $PROG DATASET [RAW_DIR]

Download $BASE_URL/DATASET.zip to RAW_DIR/DATASET.zip (RAW_DIR defaults to /data).
An archive already there is kept: a download is written under a temporary name and only
renamed when complete, so an existing DATASET.zip is never a partial one.

DATASET is one of: $KNOWN
USAGE
}

die() {
    echo "$PROG: $*" >&2
    exit 1
}

case "${1:-}" in
    -h | --help) usage; exit 0 ;;
esac
if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "$PROG: needs DATASET and at most RAW_DIR (see $PROG -h)" >&2
    exit 2
fi

DATASET=$1
RAW_DIR=${2:-/data}
[[ " $KNOWN " == *" $DATASET "* ]] || die "unknown dataset '$DATASET'; known: $KNOWN"

ZIP="$RAW_DIR/$DATASET.zip"
if [ -f "$ZIP" ]; then
    echo "$ZIP already downloaded"
    exit 0
fi
# mkdir's own message, reduced to its reason, goes on the one line
ERROR=$(mkdir -p -- "$RAW_DIR" 2>&1) || die "cannot create $RAW_DIR: ${ERROR##*: }"

URL="$BASE_URL/$DATASET.zip"
PART="$ZIP.$$.part"
trap 'rm -f "$PART"' EXIT
echo "downloading $URL to $ZIP"
if command -v curl >/dev/null; then
    curl -fL --retry 3 --progress-bar -o "$PART" "$URL" || die "download of $URL failed"
elif command -v wget >/dev/null; then
    wget -q --tries=3 -O "$PART" "$URL" || die "download of $URL failed"
else
    die "needs curl or wget to download $URL; install one, or fetch it by hand to $ZIP"
fi
mv "$PART" "$ZIP"
echo "saved $ZIP"
