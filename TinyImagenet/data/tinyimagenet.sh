#!/usr/bin/env bash
# Download Tiny ImageNet into a data folder and regroup its validation images by class.
#
#   TinyImagenet/data/tinyimagenet.sh [DATA_DIR]     (default: data/)
#
# Leaves DATA_DIR/tiny-imagenet-200/{train,val} ready for ImageFolder. Safe to re-run:
# a finished download or an unpacked folder is reused.
set -euo pipefail

url="http://cs231n.stanford.edu/tiny-imagenet-200.zip"
data_dir="${1:-data}"
python="${PYTHON:-python}"
script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
archive="$data_dir/tiny-imagenet-200.zip"
root="$data_dir/tiny-imagenet-200"

download() {
    # Writes to a .part file first so an interrupted download is never taken for a finished one.
    if command -v curl >/dev/null 2>&1; then
        curl --fail --location --output "$archive.part" "$url"
    elif command -v wget >/dev/null 2>&1; then
        wget --output-document="$archive.part" "$url"
    else
        echo "tinyimagenet.sh: error: neither curl nor wget is installed" >&2
        exit 2
    fi
    mv "$archive.part" "$archive"
}

mkdir -p "$data_dir"
if [ ! -d "$root" ]; then
    if [ ! -f "$archive" ]; then
        echo "downloading $url into $data_dir"
        download
    fi
    echo "unpacking $archive"
    # Unpacks beside the target and renames it, so an interrupted unzip is redone on re-run.
    staging="$data_dir/.tiny-imagenet-unpack"
    rm -rf "$staging"
    unzip -q "$archive" -d "$staging"
    mv "$staging/tiny-imagenet-200" "$root"
    rmdir "$staging"
fi
"$python" "$script_dir/val_format.py" --root "$root"
