//! Round trips of every message through its signed envelope or wire codec.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use proptest::prelude::*;
use tapestry_protocol::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn delta_manifest_round_trips(m in delta_manifest(test_key(1).node_id())) {
        let key = test_key(1);
        let signed = Signed::sign(m.clone(), &key).unwrap();
        let opened = Signed::<DeltaManifest>::open(signed.envelope_bytes()).unwrap();
        prop_assert_eq!(opened.message(), &m);
        prop_assert_eq!(opened.signer(), key.node_id());
        prop_assert_eq!(opened.id(), ContentId::of(signed.envelope_bytes()));
        prop_assert_eq!(opened.id(), signed.id());
    }

    #[test]
    fn model_manifest_round_trips(m in model_manifest(test_key(2).node_id())) {
        let signed = Signed::sign(m.clone(), &test_key(2)).unwrap();
        let opened = Signed::<ModelManifest>::open(signed.envelope_bytes()).unwrap();
        prop_assert_eq!(opened.message(), &m);
    }

    #[test]
    fn roster_round_trips(mut members in prop::collection::vec(any::<u8>(), 0..30), version in any::<u64>()) {
        members.sort_unstable();
        members.dedup();
        let roster = Roster {
            model_id: "m".into(),
            region: "r".into(),
            version,
            members: members.iter().map(|s| test_key(*s).node_id()).collect::<std::collections::BTreeSet<_>>().into_iter().collect(),
            created_unix_ms: 5,
        };
        let region_key = test_key(200);
        let signed = Signed::sign(roster.clone(), &region_key).unwrap();
        let opened = Signed::<Roster>::open(signed.envelope_bytes()).unwrap();
        prop_assert_eq!(opened.message(), &roster);
        prop_assert_eq!(opened.signer(), region_key.node_id());
    }

    #[test]
    fn fetch_messages_round_trip(id in content_id(), data in prop::collection::vec(any::<u8>(), 0..5000), region in name()) {
        for req in [FetchRequest::Chunk(id), FetchRequest::SignedManifest(id), FetchRequest::Head { model_id: "m".into(), region: region.clone() }, FetchRequest::Attest(id), FetchRequest::MixHead { model_id: "m".into(), region: region.clone(), round: id.as_bytes()[0].into() }] {
            prop_assert_eq!(FetchRequest::from_bytes(&req.to_bytes().unwrap()).unwrap(), req);
        }
        for resp in [FetchResponse::Chunk(data.clone()), FetchResponse::SignedManifest(data.clone()), FetchResponse::Head(Some(id)), FetchResponse::Head(None), FetchResponse::NotFound, FetchResponse::Busy] {
            let bytes = resp.to_bytes().unwrap();
            prop_assert_eq!(FetchResponse::from_bytes(&bytes).unwrap(), resp);
        }
    }
}

#[test]
fn chunk_payload_travels_as_a_byte_string() {
    // A 1000-byte chunk costs ~1000 bytes on the wire, not an array of integers.
    let resp = FetchResponse::Chunk(vec![0xff; 1000]);
    let bytes = resp.to_bytes().unwrap();
    assert!(bytes.len() < 1020, "{} bytes", bytes.len());
}

#[test]
fn signing_refuses_an_invalid_message() {
    let key = test_key(1);
    let mut m = sample_delta(&key);
    m.author = test_key(2).node_id();
    assert!(Signed::sign(m, &key).is_err());
    let mut m = sample_delta(&key);
    m.payload_bytes += 1;
    assert!(Signed::sign(m, &key).is_err());
}

#[test]
fn batch_verification_matches_single_verification() {
    let keys: Vec<Keypair> = (0..64).map(test_key).collect();
    let envelopes: Vec<Vec<u8>> = keys
        .iter()
        .map(|k| {
            Signed::sign(sample_delta(k), k)
                .unwrap()
                .envelope_bytes()
                .to_vec()
        })
        .collect();
    let parsed = envelopes
        .iter()
        .map(|b| Signed::<DeltaManifest>::parse(b.clone()).unwrap())
        .collect();
    let results = verify_batch(parsed);
    assert!(results.iter().all(Result::is_ok));

    // Swap one signature for another's: only that one fails.
    let mut tampered = envelopes.clone();
    let other = Signed::<DeltaManifest>::open(&envelopes[4]).unwrap();
    tampered[9] = swap_signature(&envelopes[9], &other);
    let parsed = tampered
        .into_iter()
        .map(|b| Signed::<DeltaManifest>::parse(b).unwrap())
        .collect();
    let results = verify_batch(parsed);
    for (i, r) in results.iter().enumerate() {
        if i == 9 {
            assert_eq!(r.as_ref().unwrap_err(), &DecodeError::BadSignature);
        } else {
            assert!(r.is_ok(), "envelope {i} should verify");
        }
    }
}

#[test]
fn a_stored_envelope_decodes_without_its_signature_check_and_only_that() {
    let key = test_key(3);
    let v = Signed::sign(sample_delta(&key), &key).unwrap();
    let m = Signed::<DeltaManifest>::decode_stored(v.envelope_bytes()).unwrap();
    assert_eq!(&m, v.message());
    // It skips the signature, so it is for bytes verified before: a forged
    // signature decodes here and is refused by `open`.
    let other_key = test_key(4);
    let other = Signed::sign(sample_delta(&other_key), &other_key).unwrap();
    let forged = swap_signature(v.envelope_bytes(), &other);
    assert!(Signed::<DeltaManifest>::decode_stored(&forged).is_ok());
    assert_eq!(
        Signed::<DeltaManifest>::open(&forged).unwrap_err(),
        DecodeError::BadSignature
    );
    // Everything else is still checked: the kind, the body's validation.
    assert!(matches!(
        Signed::<ModelManifest>::decode_stored(v.envelope_bytes()),
        Err(DecodeError::WrongKind { .. })
    ));
    let mut broken = v.envelope_bytes().to_vec();
    broken.truncate(broken.len() - 10);
    assert!(Signed::<DeltaManifest>::decode_stored(&broken).is_err());
}

/// Re-encodes `envelope` with the signature of `other`.
fn swap_signature(envelope: &[u8], other: &Verified<DeltaManifest>) -> Vec<u8> {
    let (tag, body, signer, _sig): (
        String,
        serde_bytes::ByteBuf,
        serde_bytes::ByteBuf,
        serde_bytes::ByteBuf,
    ) = ciborium::de::from_reader(envelope).unwrap();
    let (_, _, _, sig): (
        String,
        serde_bytes::ByteBuf,
        serde_bytes::ByteBuf,
        serde_bytes::ByteBuf,
    ) = ciborium::de::from_reader(other.envelope_bytes()).unwrap();
    let mut out = Vec::new();
    ciborium::ser::into_writer(&(tag, body, signer, sig), &mut out).unwrap();
    out
}
