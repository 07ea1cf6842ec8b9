//! Hostile and broken input: every case gets its own typed error, none panics,
//! and nothing unverified comes back as a message.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use ed25519_dalek::Verifier;
use serde_bytes::ByteBuf;
use tapestry_protocol::*;

type RawEnvelope = (String, ByteBuf, ByteBuf, ByteBuf);

fn raw(envelope: &[u8]) -> RawEnvelope {
    ciborium::de::from_reader(envelope).unwrap()
}

fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::ser::into_writer(v, &mut out).unwrap();
    out
}

fn valid_delta_envelope() -> Vec<u8> {
    let key = test_key(1);
    Signed::sign(sample_delta(&key), &key)
        .unwrap()
        .envelope_bytes()
        .to_vec()
}

#[test]
fn every_truncation_is_reported_as_truncated() {
    let env = valid_delta_envelope();
    for len in 0..env.len() {
        assert_eq!(
            Signed::<DeltaManifest>::open(&env[..len]).unwrap_err(),
            DecodeError::Truncated,
            "prefix of {len} bytes"
        );
    }
}

#[test]
fn oversized_input_is_refused_before_parsing() {
    let mut env = valid_delta_envelope();
    env.resize(DecodeLimits::MANIFEST.max_bytes + 1, 0);
    assert!(matches!(
        Signed::<DeltaManifest>::open(&env),
        Err(DecodeError::TooLarge { .. })
    ));
    let huge = FetchResponse::Chunk(vec![0; MAX_CHUNK_SIZE + (64 << 10)])
        .to_bytes()
        .unwrap();
    assert!(matches!(
        FetchResponse::from_bytes(&huge),
        Err(DecodeError::TooLarge { .. })
    ));
}

#[test]
fn deep_nesting_is_refused() {
    let mut deep = vec![0x81u8; 10_000];
    deep.push(0x00);
    assert!(matches!(
        Signed::<DeltaManifest>::open(&deep),
        Err(DecodeError::TooDeep(_))
    ));
    assert!(matches!(
        FetchRequest::from_bytes(&deep),
        Err(DecodeError::TooDeep(_))
    ));
}

#[test]
fn a_length_prefix_larger_than_the_input_is_truncated() {
    // FetchResponse::Chunk with a byte string claiming 2^62 bytes.
    let mut bytes = vec![0xa1, 0x65];
    bytes.extend_from_slice(b"chunk");
    bytes.extend_from_slice(&[0x5b, 0x40, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3]);
    assert_eq!(
        FetchResponse::from_bytes(&bytes),
        Err(DecodeError::Truncated)
    );
}

#[test]
fn wrong_kind_and_cross_kind_replay_are_refused() {
    let key = test_key(3);
    let roster = Roster {
        model_id: "m".into(),
        region: "r".into(),
        version: 1,
        members: vec![],
        created_unix_ms: 0,
    };
    let env = Signed::sign(roster, &key).unwrap();
    assert!(matches!(
        Signed::<DeltaManifest>::open(env.envelope_bytes()),
        Err(DecodeError::WrongKind {
            expected: "tapestry/v1/delta-manifest",
            ..
        })
    ));
    // Relabel a model manifest's envelope as a delta manifest, keeping its
    // body and signature: the signature was made under another domain tag.
    let model = Signed::sign(sample_model(&key), &key).unwrap();
    let (_, body, signer, sig) = raw(model.envelope_bytes());
    let relabelled = encode(&(DeltaManifest::DOMAIN_TAG, body, signer, sig));
    assert_eq!(
        Signed::<DeltaManifest>::open(&relabelled).unwrap_err(),
        DecodeError::BadSignature
    );
}

#[test]
fn every_single_bit_flip_is_caught() {
    let env = valid_delta_envelope();
    for i in 0..env.len() * 8 {
        let mut b = env.clone();
        b[i / 8] ^= 1 << (i % 8);
        assert!(
            Signed::<DeltaManifest>::open(&b).is_err(),
            "flip of bit {i} was accepted"
        );
    }
}

#[test]
fn forged_signatures_are_refused() {
    let env = valid_delta_envelope();
    let (tag, body, signer, sig) = raw(&env);
    // Random signature bytes.
    let forged = encode(&(
        tag.clone(),
        body.clone(),
        signer.clone(),
        ByteBuf::from(vec![0x42; 64]),
    ));
    assert_eq!(
        Signed::<DeltaManifest>::open(&forged).unwrap_err(),
        DecodeError::BadSignature
    );
    // Someone else's key in the signer field.
    let other = ByteBuf::from(test_key(9).node_id().as_bytes().to_vec());
    let forged = encode(&(tag.clone(), body.clone(), other, sig.clone()));
    assert_eq!(
        Signed::<DeltaManifest>::open(&forged).unwrap_err(),
        DecodeError::BadSignature
    );
    // A signature of the wrong length.
    let short = encode(&(
        tag.clone(),
        body.clone(),
        signer.clone(),
        ByteBuf::from(vec![1; 63]),
    ));
    assert!(matches!(
        Signed::<DeltaManifest>::open(&short),
        Err(DecodeError::Schema(_))
    ));
    // A small-order (weak) public key.
    let mut identity = [0u8; 32];
    identity[0] = 1;
    let weak = encode(&(tag, body, ByteBuf::from(identity.to_vec()), sig));
    assert_eq!(
        Signed::<DeltaManifest>::open(&weak).unwrap_err(),
        DecodeError::InvalidKey
    );
}

#[test]
fn a_valid_signature_over_an_invalid_message_is_refused() {
    // Node 5 signs a manifest that claims node 6 wrote it.
    let signer = test_key(5);
    let mut m = sample_delta(&signer);
    m.author = test_key(6).node_id();
    let body = encode(&m);
    let sk = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
    let digest = tapestry_protocol::signed::signing_digest(DeltaManifest::DOMAIN_TAG, &body);
    let sig = ed25519_dalek::Signer::sign(&sk, &digest).to_bytes();
    let env = encode(&(
        DeltaManifest::DOMAIN_TAG,
        ByteBuf::from(body),
        ByteBuf::from(signer.node_id().as_bytes().to_vec()),
        ByteBuf::from(sig.to_vec()),
    ));
    assert!(matches!(
        Signed::<DeltaManifest>::open(&env),
        Err(DecodeError::Invalid(_))
    ));
}

/// Signs `body` by hand with the identity point as R (s = h·a), a signature
/// that the plain cofactorless equation accepts but `verify_strict` refuses.
fn small_order_r_envelope(seed: u8, body: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    let sk = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
    let a = sk.to_scalar();
    let pk = sk.verifying_key().to_bytes();
    let digest = tapestry_protocol::signed::signing_digest(DeltaManifest::DOMAIN_TAG, body);
    let mut r = [0u8; 32];
    r[0] = 1; // the identity point
    let h = sha2::Sha512::new()
        .chain_update(r)
        .chain_update(pk)
        .chain_update(digest)
        .finalize();
    let h = curve25519_dalek::Scalar::from_bytes_mod_order_wide(&h.into());
    let s = h * a;
    let mut sig = [0u8; 64];
    sig[..32].copy_from_slice(&r);
    sig[32..].copy_from_slice(s.as_bytes());
    encode(&(
        DeltaManifest::DOMAIN_TAG,
        ByteBuf::from(body.to_vec()),
        ByteBuf::from(pk.to_vec()),
        ByteBuf::from(sig.to_vec()),
    ))
}

#[test]
fn small_order_r_is_refused_singly_and_in_batches() {
    let key = test_key(11);
    let body = encode(&sample_delta(&key));
    let env = small_order_r_envelope(11, &body);
    // The forgery is real: lax verification, and plain batch verification
    // without our extra checks on R, both accept it.
    let (_, _, pk, sig) = raw(&env);
    let vk = ed25519_dalek::VerifyingKey::from_bytes(&pk.to_vec().try_into().unwrap()).unwrap();
    let sig = ed25519_dalek::Signature::from_slice(&sig).unwrap();
    let digest = tapestry_protocol::signed::signing_digest(DeltaManifest::DOMAIN_TAG, &body);
    assert!(vk.verify(&digest, &sig).is_ok());
    assert!(ed25519_dalek::verify_batch(&[&digest], &[sig], &[vk]).is_ok());
    assert_eq!(
        Signed::<DeltaManifest>::open(&env).unwrap_err(),
        DecodeError::BadSignature
    );
    // In a batch with good envelopes, it alone is refused.
    let mut batch: Vec<Signed<DeltaManifest>> = (20..30)
        .map(|s| {
            let k = test_key(s);
            Signed::parse(
                Signed::sign(sample_delta(&k), &k)
                    .unwrap()
                    .envelope_bytes()
                    .to_vec(),
            )
            .unwrap()
        })
        .collect();
    batch.insert(3, Signed::parse(env).unwrap());
    let results = verify_batch(batch);
    assert_eq!(results[3].as_ref().unwrap_err(), &DecodeError::BadSignature);
    assert_eq!(results.len(), 11);
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 10);
}

#[test]
fn bodies_that_do_not_match_the_schema_are_refused() {
    let key = test_key(1);
    let sign_raw = |body: Vec<u8>| {
        let sk = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        let digest = tapestry_protocol::signed::signing_digest(DeltaManifest::DOMAIN_TAG, &body);
        let sig = ed25519_dalek::Signer::sign(&sk, &digest).to_bytes();
        encode(&(
            DeltaManifest::DOMAIN_TAG,
            ByteBuf::from(body),
            ByteBuf::from(key.node_id().as_bytes().to_vec()),
            ByteBuf::from(sig.to_vec()),
        ))
    };
    let mut value: ciborium::Value =
        ciborium::de::from_reader(encode(&sample_delta(&key)).as_slice()).unwrap();
    if let ciborium::Value::Map(fields) = &mut value {
        fields.push(("surprise".into(), 1.into()));
    }
    let unknown_field = sign_raw(encode(&value));
    assert!(matches!(
        Signed::<DeltaManifest>::open(&unknown_field),
        Err(DecodeError::Schema(_))
    ));
    let not_a_map = sign_raw(encode(&(1u8, 2u8)));
    assert!(matches!(
        Signed::<DeltaManifest>::open(&not_a_map),
        Err(DecodeError::Schema(_))
    ));
    // A body padded with trailing bytes, signed correctly.
    let mut padded = encode(&sample_delta(&key));
    padded.push(0);
    assert_eq!(
        Signed::<DeltaManifest>::open(&sign_raw(padded)).unwrap_err(),
        DecodeError::TrailingBytes(1)
    );
}

#[test]
fn garbage_never_panics() {
    // A cheap deterministic sweep; the fuzz targets go further.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for len in 0..2000usize {
        let bytes: Vec<u8> = (0..len % 300)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(Signed::<DeltaManifest>::open(&bytes).is_err());
        let _ = Signed::<ModelManifest>::open(&bytes);
        let _ = FetchRequest::from_bytes(&bytes);
        let _ = FetchResponse::from_bytes(&bytes);
    }
}

#[test]
fn a_head_request_with_a_field_the_protocol_does_not_have_is_refused() {
    use ciborium::Value as C;
    let head = |extra: bool| {
        let mut fields = vec![
            (C::Text("model_id".into()), C::Text("m".into())),
            (C::Text("region".into()), C::Text("r".into())),
        ];
        if extra {
            fields.push((C::Text("x".into()), C::Integer(1.into())));
        }
        encode(&C::Map(vec![(C::Text("head".into()), C::Map(fields))]))
    };
    assert!(FetchRequest::from_bytes(&head(false)).is_ok());
    assert!(FetchRequest::from_bytes(&head(true)).is_err());
}

#[test]
fn one_signed_message_has_one_encoding_and_so_one_id() {
    // A third party holding an honest envelope tries to re-wrap it under a
    // new id (the id is the hash of the envelope bytes) without touching
    // the signed body: every such form is refused, and the original opens.
    let key = test_key(3);
    let env = Signed::sign(sample_delta(&key), &key)
        .unwrap()
        .envelope_bytes()
        .to_vec();
    assert!(Signed::<DeltaManifest>::open(&env).is_ok());
    let (tag, body, signer, sig) = raw(&env);
    let not_canonical = |bytes: &[u8], what: &str| {
        assert_ne!(bytes, env.as_slice(), "{what}: not a re-wrap");
        assert!(
            matches!(
                Signed::<DeltaManifest>::open(bytes),
                Err(DecodeError::NotCanonical(_))
            ),
            "{what}: {:?}",
            Signed::<DeltaManifest>::open(bytes).map(|v| v.id())
        );
    };
    // The body's length in eight bytes instead of its shortest form.
    let mut wide = vec![0x84];
    wide.extend(encode(&tag));
    wide.push(0x5b);
    wide.extend((body.len() as u64).to_be_bytes());
    wide.extend(body.iter());
    wide.extend(encode(&signer));
    wide.extend(encode(&sig));
    not_canonical(&wide, "a wide length");
    // A fifth element after the signature.
    not_canonical(
        &encode(&(&tag, &body, &signer, &sig, 0u8)),
        "a fifth element",
    );
    // The signature (or the body) as an array of integers.
    not_canonical(
        &encode(&(&tag, &body, &signer, sig.to_vec())),
        "a signature as an array",
    );
    not_canonical(
        &encode(&(&tag, body.to_vec(), &signer, &sig)),
        "a body as an array",
    );
    // The author's own body with its fields in another order, correctly
    // signed: one message, one encoding, whoever signs it.
    let mut value: ciborium::Value = ciborium::de::from_reader(body.as_slice()).unwrap();
    if let ciborium::Value::Map(fields) = &mut value {
        fields.reverse();
    }
    let reordered = encode(&value);
    let sk = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
    let digest = tapestry_protocol::signed::signing_digest(DeltaManifest::DOMAIN_TAG, &reordered);
    let resigned = encode(&(
        DeltaManifest::DOMAIN_TAG,
        ByteBuf::from(reordered),
        &signer,
        ByteBuf::from(
            ed25519_dalek::Signer::sign(&sk, &digest)
                .to_bytes()
                .to_vec(),
        ),
    ));
    assert_eq!(
        Signed::<DeltaManifest>::open(&resigned).unwrap_err(),
        DecodeError::NotCanonical("body")
    );
}
