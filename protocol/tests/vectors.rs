//! Golden vectors: signed envelopes that another implementation can check
//! itself against (layout in `protocol/README.md`).
//!
//! The test re-derives every figure in each `.json` from first principles
//! (BLAKE3 and ed25519 called directly, not through this crate) and checks
//! that signing the same message with the same key gives the same bytes.
//! Regenerate with `TAPESTRY_WRITE_VECTORS=1 cargo test -p tapestry-protocol --test vectors`.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;

use common::*;
use serde_json::{Value as Json, json};
use tapestry_protocol::*;

const SECRET_SEED: u8 = 0x2a;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

fn render<T: SignedMessage>(kind: &str, description: &str, v: &Verified<T>) -> Json {
    let env: (
        String,
        serde_bytes::ByteBuf,
        serde_bytes::ByteBuf,
        serde_bytes::ByteBuf,
    ) = ciborium::de::from_reader(v.envelope_bytes()).unwrap();
    let body = env.1.to_vec();
    let mut hasher = blake3::Hasher::new();
    hasher.update(T::DOMAIN_TAG.as_bytes());
    hasher.update(&body);
    let message: ciborium::Value = ciborium::de::from_reader(body.as_slice()).unwrap();
    json!({
        "kind": kind,
        "description": description,
        "domain_tag": T::DOMAIN_TAG,
        "secret_key_seed_hex": hex::encode([SECRET_SEED; 32]),
        "public_key_hex": hex::encode(env.2.as_slice()),
        "body_hex": hex::encode(&body),
        "signed_digest_hex": hasher.finalize().to_hex().to_string(),
        "signature_hex": hex::encode(env.3.as_slice()),
        "envelope_id_hex": hex::encode(blake3::hash(v.envelope_bytes()).as_bytes()),
        "message": cbor_to_json(&message),
    })
}

struct Case {
    name: &'static str,
    envelope: Vec<u8>,
    json: Json,
}

fn cases() -> Vec<Case> {
    let key = test_key(SECRET_SEED);
    let delta = Signed::sign(sample_delta(&key), &key).unwrap();
    let model = Signed::sign(sample_model(&key), &key).unwrap();
    let roster = Signed::sign(
        Roster {
            model_id: "digits-logreg".into(),
            region: "eu-west".into(),
            version: 3,
            members: {
                let mut m: Vec<NodeId> = (1..=3).map(|s| test_key(s).node_id()).collect();
                m.sort();
                m
            },
            created_unix_ms: 1_795_000_000_000,
        },
        &key,
    )
    .unwrap();
    vec![
        Case {
            name: "delta-manifest",
            json: render(
                "delta-manifest",
                "an int8-coded delta of a 650-parameter model",
                &delta,
            ),
            envelope: delta.envelope_bytes().to_vec(),
        },
        Case {
            name: "model-manifest",
            json: render(
                "model-manifest",
                "a model version with one parent and two deltas",
                &model,
            ),
            envelope: model.envelope_bytes().to_vec(),
        },
        Case {
            name: "roster",
            json: render("roster", "a region roster of three members", &roster),
            envelope: roster.envelope_bytes().to_vec(),
        },
    ]
}

fn hex_field(j: &Json, name: &str) -> Vec<u8> {
    hex::decode(j[name].as_str().unwrap_or_else(|| panic!("missing {name}"))).unwrap()
}

#[test]
fn golden_vectors_rederive() {
    let cases = cases();
    if std::env::var_os("TAPESTRY_WRITE_VECTORS").is_some() {
        std::fs::create_dir_all(dir()).unwrap();
        for c in &cases {
            std::fs::write(dir().join(format!("{}.cbor", c.name)), &c.envelope).unwrap();
            let text = serde_json::to_string_pretty(&c.json).unwrap() + "\n";
            std::fs::write(dir().join(format!("{}.json", c.name)), text).unwrap();
        }
    }
    for c in &cases {
        let cbor = std::fs::read(dir().join(format!("{}.cbor", c.name))).unwrap();
        let stored: Json =
            serde_json::from_slice(&std::fs::read(dir().join(format!("{}.json", c.name))).unwrap())
                .unwrap();
        // Signing the same message with the same key gives the same bytes.
        assert_eq!(
            hex::encode(&cbor),
            hex::encode(&c.envelope),
            "{}: envelope bytes changed",
            c.name
        );
        assert_eq!(stored, c.json, "{}: json changed", c.name);

        // Re-derive every figure from the raw primitives.
        let tag = stored["domain_tag"].as_str().unwrap();
        let body = hex_field(&stored, "body_hex");
        let mut digest_input = tag.as_bytes().to_vec();
        digest_input.extend_from_slice(&body);
        let digest = blake3::hash(&digest_input);
        assert_eq!(
            digest.as_bytes().to_vec(),
            hex_field(&stored, "signed_digest_hex")
        );
        let seed: [u8; 32] = hex_field(&stored, "secret_key_seed_hex")
            .try_into()
            .unwrap();
        let sk = ed25519_dalek::SigningKey::from_bytes(&seed);
        assert_eq!(
            sk.verifying_key().to_bytes().to_vec(),
            hex_field(&stored, "public_key_hex")
        );
        let sig = ed25519_dalek::Signer::sign(&sk, digest.as_bytes());
        assert_eq!(sig.to_bytes().to_vec(), hex_field(&stored, "signature_hex"));
        sk.verifying_key()
            .verify_strict(digest.as_bytes(), &sig)
            .unwrap();
        assert_eq!(
            blake3::hash(&cbor).as_bytes().to_vec(),
            hex_field(&stored, "envelope_id_hex")
        );
        let message: ciborium::Value = ciborium::de::from_reader(body.as_slice()).unwrap();
        assert_eq!(cbor_to_json(&message), stored["message"]);

        // And the crate opens it.
        let id = match c.name {
            "delta-manifest" => Signed::<DeltaManifest>::open(&cbor).unwrap().id(),
            "model-manifest" => Signed::<ModelManifest>::open(&cbor).unwrap().id(),
            _ => Signed::<Roster>::open(&cbor).unwrap().id(),
        };
        assert_eq!(id.to_hex(), stored["envelope_id_hex"].as_str().unwrap());
    }
}
