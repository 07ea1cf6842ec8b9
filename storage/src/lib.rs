//! Tapestry's chunk store: content-addressed chunks, manifests, refs, pins,
//! garbage collection and scrub, behind one trait with a sled and an in-memory
//! backend.
//!
//! **Status: not implemented yet.** This crate is a placeholder so the
//! workspace has its final shape; nothing here stores anything. The work is
//! tracked in the chunk-store issue.
