//! What goes into an engine ([`Input`]: events, each with the time) and
//! what it asks its shell to do ([`Action`]).

use super::*;

/// What happens to an engine.
#[derive(Debug, Clone)]
pub enum Input {
    /// Start (or restart) from this model version.
    Start {
        /// Its signed manifest.
        manifest: Verified<ModelManifest>,
        /// Its parameters.
        params: Vec<f32>,
    },
    /// The parameters of the head's parent, for an outer step with
    /// momentum (the step the next version continues): what a shell that
    /// started from a stored head, or caught up to one, gives once it reads
    /// them. Ignored unless `version` is the head's only parent; until the
    /// engine has them it leaves closing rounds to its peers.
    PreviousStep {
        /// The head's parent.
        version: ContentId,
        /// Its parameters.
        params: Vec<f32>,
    },
    /// Local training of `round` finished with these parameters.
    TrainingDone {
        /// The round trained for.
        round: u64,
        /// The version trained from (as in [`Action::Train`]); a result for
        /// a version this node has since replaced is dropped.
        version: ContentId,
        /// θ′ after the inner steps.
        params: Vec<f32>,
        /// Samples seen (the delta's weight).
        samples: u64,
    },
    /// A verified delta manifest arrived from gossip.
    DeltaAnnounced(Verified<DeltaManifest>),
    /// This node's own delta, announced before a restart (the shell keeps
    /// the last one on disk). Given before [`Input::Start`], it stands as
    /// the node's one vote in its round: the node does not train that
    /// round again (a second delta would be a `duplicate_author_round` to
    /// peers that heard the first), and the payload is fetched (from the
    /// local store first) to be aggregated like a peer's.
    OwnVote(Verified<DeltaManifest>),
    /// The chunks of an announced delta arrived, verified and reassembled.
    DeltaPayload {
        /// The manifest's id.
        id: ContentId,
        /// The payload bytes (shared: the shell keeps them to store once
        /// the door admits them).
        payload: std::sync::Arc<Vec<u8>>,
    },
    /// The chunks of an announced delta of a fixed-width codec (`f32`,
    /// `bf16`) arrived and the shell kept them as they came, each checked
    /// against its id: the door judges the payload read from `source`, a
    /// block at a time, and the engine aggregates it from there. A payload
    /// the door refuses is the shell's to let go of.
    DeltaStored {
        /// The manifest's id.
        id: ContentId,
        /// Where the payload is kept.
        source: std::sync::Arc<dyn crate::aggregate::PayloadSource + Send + Sync>,
    },
    /// A peer's model version, verified by recomputation
    /// ([`crate::verify`]): the shell offers nothing else.
    ModelOffered {
        /// Its manifest.
        manifest: Verified<ModelManifest>,
        /// Its parameters (shared: the shell may hand over a buffer it
        /// holds already, the head's own when the version matches it).
        params: std::sync::Arc<Vec<f32>>,
        /// Its parent's parameters, when the outer step has momentum and
        /// it is a plain version ([`crate::verify::previous_step_parent`]
        /// of the next version): what the next round's step continues.
        /// `None` if not held (the engine then uses its head's when that is
        /// the parent, else leaves closing the next round to its peers).
        previous: Option<std::sync::Arc<Vec<f32>>>,
        /// Distinct authors of the deltas it aggregates (verified).
        authors: usize,
        /// Deltas already aggregated into it and its recent ancestors
        /// ([`crate::verify::recent_deltas`]): not to be used again.
        used: Vec<ContentId>,
        /// Weights of this node's head and of the offered version since
        /// their lineages parted ([`crate::verify::fork_weights`]), if the
        /// shell compared them.
        fork: Option<(usize, usize)>,
    },
    /// A version from a branch that grew apart from this node's (a
    /// partition: each side went on training without the other's deltas),
    /// to be merged with the head `against` rather than replace it. The
    /// merge averages both, weighted `weights` = (this node's branch, the
    /// offered one), and becomes a version with both as parents, so the
    /// work of both sides stays in the lineage.
    BranchOffered {
        /// The other branch's version.
        manifest: Verified<ModelManifest>,
        /// Its parameters.
        params: std::sync::Arc<Vec<f32>>,
        /// The head it is to be merged with; ignored if the head moved on.
        against: ContentId,
        /// Weights of this node's branch and of the offered one
        /// ([`crate::verify::branch_split`]).
        weights: (f64, f64),
        /// Deltas already aggregated into the offered version's recent
        /// lineage (added to those of this node's own).
        used: Vec<ContentId>,
    },
    /// Push-sum mode: a share pushed by a peer.
    PushShare {
        /// Its share of the value.
        x: Vec<f32>,
        /// Its share of the weight.
        w: f64,
    },
    /// Mixing mode: a neighbour's trained model for a round.
    NeighbourModel {
        /// The neighbour.
        from: NodeId,
        /// The round it trained.
        round: u64,
        /// Its parameters after training.
        params: Vec<f32>,
        /// Its number of neighbours (for the Metropolis–Hastings weight).
        degree: usize,
    },
    /// Mixing and push-sum modes: a model to resume from after an absence,
    /// as [`crate::mixing::catch_up`] combined it from several neighbours'
    /// offers (never one neighbour's). Taken only if `round` is ahead of
    /// this node's and the parameters fit; the node signs it as its own
    /// version of `round` (its old version as parent) and trains on.
    CaughtUp {
        /// The round reached.
        round: u64,
        /// The combined parameters.
        params: Vec<f32>,
    },
    /// A federating region's mix round: the agreed heads of neighbouring
    /// regions of the head's round, each taken by the shell on its
    /// region's attestations ([`crate::attest`]), with their parameters
    /// (checked against their chunk ids). The engine mixes its head with
    /// them ([`crate::federation::mix`]) into a version with all of them as
    /// parents, if its head is still its region's plain version of that
    /// round (see [`crate::engine::Engine::awaits_foreign_heads`]).
    ForeignHeads(Vec<(Verified<ModelManifest>, std::sync::Arc<Vec<f32>>)>),
    /// A peer joined the region (in mixing mode: a neighbour).
    PeerJoined(NodeId),
    /// A peer left the region.
    PeerLeft(NodeId),
    /// Time passed (a timer fired).
    Tick,
}

/// What an engine asks its shell to do.
#[derive(Debug, Clone)]
pub enum Action {
    /// Run local training for `round` from `params` with this seed, and
    /// answer with [`Input::TrainingDone`] naming the same version.
    Train {
        /// The round.
        round: u64,
        /// The version trained from.
        version: ContentId,
        /// θ at the start of the round.
        params: Vec<f32>,
        /// Seed of the batch order.
        seed: u64,
    },
    /// Store these chunks and announce this delta.
    Publish {
        /// The signed manifest.
        manifest: Verified<DeltaManifest>,
        /// Its payload (shared: the engine holds it too until the shell
        /// says it is stored, [`Engine::payload_stored`]).
        payload: crate::aggregate::Payload,
    },
    /// Mixing mode: send this trained model to every neighbour, as an
    /// [`Input::NeighbourModel`] from this node.
    SendToNeighbours {
        /// The round.
        round: u64,
        /// The parameters after training.
        params: Vec<f32>,
        /// This node's number of neighbours.
        degree: usize,
    },
    /// Push-sum mode: send this share to each of these peers.
    PushShare {
        /// The receivers.
        to: Vec<NodeId>,
        /// The value share.
        x: Vec<f32>,
        /// The weight share.
        w: f64,
    },
    /// Fetch the chunks of an announced delta.
    Fetch {
        /// The manifest.
        manifest: Verified<DeltaManifest>,
    },
    /// A new model version: store it, make it the head, offer it to peers.
    Adopt {
        /// Its signed manifest.
        manifest: Verified<ModelManifest>,
        /// Its parameters (the engine's own head, shared: not a copy).
        params: std::sync::Arc<Vec<f32>>,
    },
    /// Wake the engine with [`Input::Tick`] at this time (ms).
    SetTimer {
        /// When.
        at_ms: u64,
    },
    /// A peer sent something invalid: count it against them.
    Penalise(Rejected),
}
