//! Black-box tests that start real Tapestry processes and check what they do
//! together: `tests/cluster.rs` drives `tapestry-lab cluster`, which starts,
//! kills, restarts and stops `tapestry` node processes on 127.0.0.1. They
//! find both binaries beside the test executable, where `cargo test
//! --workspace` builds them. (The node's own process tests are in
//! `node/tests/cluster.rs`.)
