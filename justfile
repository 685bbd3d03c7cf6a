# ferry's everyday commands. `just --list` shows them.

# The whole test suite (what CI runs).
test:
    cargo test --workspace

# Formatting and lints, as CI checks them.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

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
