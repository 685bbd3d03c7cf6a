# ferry's everyday commands. `just --list` shows them. Each is a shortcut: the scripts run without `just`.

# The whole test suite, with its data and tools set up first (what CI runs). Extra arguments go to cargo test.
test *ARGS:
    scripts/test.sh {{ARGS}}

# Formatting and lints, as CI checks them.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# Release artefacts into target/ferry-dist/: Linux and Windows binaries, .debs, signed SHA256SUMS (docs/install.md).
dist:
    scripts/dist.sh

# The README walkthrough with the Windows binaries under Wine (after `just dist`).
wine-smoke:
    scripts/wine-smoke.sh target/x86_64-pc-windows-gnu/dist

# The air-gapped loop end to end on synthetic plates (about 5 minutes on 2 cores).
demo:
    cargo run --release -p ferry-lab -- demo

# The field study's table, reproduced through real bundles.
seed-table *ARGS:
    cargo run --release -p ferry-lab -- seed-table {{ARGS}}

# Training and bundle throughput benchmarks.
bench:
    cargo run --release -p ferry-lab -- bench train --model plate-cnn --batch 64 --steps 50
    cargo bench --workspace
