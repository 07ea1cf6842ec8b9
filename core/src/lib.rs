//! `tapestry-core`: the learning, averaging and agreement core, written
//! sans-IO: it computes, it does not move bytes, read clocks or spawn
//! tasks, so the real node (`tapestry-node`) and the simulator
//! (`tapestry-sim`) run the very same code. It depends on the protocol
//! crate and on candle, nothing networked.
//!
//! - [`data`]: CSV / gzipped CSV / IDX loading, a seeded synthetic set,
//!   stratified splits, IID / Dirichlet / k-class partitions, feature scaling.
//! - [`model`]: logistic regression and MLPs (trained in place with
//!   hand-written passes on the flat parameter vector, `dense`), SGD with
//!   momentum and AdamW, evaluation, safetensors export and import.
//! - [`text`]: text corpora (plain or `fortune` format) for byte-level
//!   language models, with every tenth unit held out.
//! - [`transformer`]: a byte-level GPT-2-style transformer in candle:
//!   training on text windows, bits per byte, sampling.
//! - [`aggregate`]: weighted mean, trimmed mean, median, clipping (centred on
//!   the median, self-centred, aligned).
//! - [`outer`]: the outer step: SGD, and heavy-ball momentum taken on versions.
//! - [`mixing`]: Metropolis–Hastings weights, push-sum, consensus distance,
//!   catch-up from several neighbours.
//! - [`admission`]: size, envelope and roster checks of an announcement, and
//!   every refusal's gossip verdict and metric label in one place.
//! - [`door`]: the checks every incoming delta passes, with named reasons.
//! - [`engine`]: the round engine (broadcast, neighbour mixing, push-sum).
//! - [`verify`]: checking a peer's model version by recomputation.
//! - [`attest`]: versions vouched for by several roster members (catch-up
//!   where recomputation is impossible).
//! - [`heads`]: the agreement policy: which versions to verify, and what to
//!   do with one that passed (adopt, merge, remember, leave).

pub mod admission;
pub mod aggregate;
pub mod attest;
pub mod data;
mod dense;
pub mod door;
pub mod engine;
pub mod federation;
pub mod heads;
mod linalg;
pub mod mixing;
pub mod model;
pub mod outer;
pub mod text;
pub mod transformer;
mod transformer_passes;
pub mod verify;
