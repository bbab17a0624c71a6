//! Criterion benchmarks of the gateway's hot paths live in `benches/benches/`; run them with
//! `cargo bench -p aihub-benches`.
