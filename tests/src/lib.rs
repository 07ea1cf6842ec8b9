//! Black-box tests that start real `tapestry` processes on loopback or in
//! network namespaces and check what they do together.
//!
//! **Status: empty.** There is no node binary to test yet; the tests arrive
//! with the node and local-cluster issues.
