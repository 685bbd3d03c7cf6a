#!/bin/sh
# Seed both fuzz corpora with the test kit (crates/bundle/tests/testkit). Run from the repository root or fuzz/.
set -eu
cd "$(dirname "$0")"
kit=../crates/bundle/tests/testkit
for target in bundle_open manifest_parse; do
    mkdir -p "corpus/$target"
    cp "$kit"/*.ferry "corpus/$target/"
done
echo "seeded corpus/bundle_open and corpus/manifest_parse from $kit"
