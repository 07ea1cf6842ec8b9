//! Names a node keeps things under: store refs (head, verified and
//! attested versions), gossip topics, peer ids as node ids, and the
//! genesis key of a model and region.

use super::*;

/// The ref naming a node's head model version.
pub const HEAD_REF: &str = "head";

/// The ref marking a model version this node verified (made, recomputed,
/// or derived: the genesis). Only verified versions are parents to build
/// on, served as lineage, or compared as branches.
pub fn verified_ref(id: &ContentId) -> String {
    format!("verified/{id}")
}

/// The ref marking a version this node took on roster members'
/// attestations ([`tapestry_core::attest`]) rather than recomputed: it builds
/// on it, but does not attest it to others.
pub fn attested_ref(id: &ContentId) -> String {
    format!("attested/{id}")
}

/// Whether `store` marks version `id` verified.
pub(super) fn is_verified(store: &Store, id: &ContentId) -> bool {
    matches!(store.get_ref(&verified_ref(id)), Ok(Some(v)) if v == *id)
}

/// Gossip topic of a region's delta announcements.
pub fn deltas_topic(model_id: &str, region: &str) -> String {
    format!("/tapestry/1/{model_id}/{region}/deltas")
}

/// Gossip topic of a region's model versions.
pub fn models_topic(model_id: &str, region: &str) -> String {
    format!("/tapestry/1/{model_id}/{region}/models")
}

/// The node id behind a peer id (both are the same ed25519 key).
pub fn node_id_of(peer: &PeerId) -> Option<NodeId> {
    let key = libp2p::identity::PublicKey::try_decode_protobuf(peer.as_ref().digest()).ok()?;
    let ed = key.try_into_ed25519().ok()?;
    Some(NodeId::from_bytes(ed.to_bytes()))
}

/// The key that signs a region's initial model version. Every node derives
/// the same one from the model and region names, so every node starts from
/// the same, verifiable genesis without anyone distributing it.
pub fn genesis_key(model_id: &str, region: &str) -> Keypair {
    let seed = blake3::derive_key(
        "tapestry genesis key v1",
        format!("{model_id}\0{region}").as_bytes(),
    );
    Keypair::from_secret_bytes(&seed)
}
