//! Fuzzes the delta codecs' decoders: the first byte picks a codec, the next
//! two the element count; the rest is the payload. Never a panic, never a
//! non-finite value out, and a decoded vector re-encodes to a payload of the
//! promised length.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tapestry_protocol::Codec;

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let codec = match data[0] % 8 {
        0 => Codec::F32,
        1 => Codec::Bf16,
        2 => Codec::Int8 { block: 64 },
        3 => Codec::Int8 { block: 4096 },
        4 => Codec::TopK { fraction: 0.01 },
        5 => Codec::TopKBf16 { fraction: 0.1 },
        6 => Codec::TopKInt8 { fraction: 0.1 },
        _ => Codec::TopK { fraction: 0.5 },
    };
    let n = usize::from(u16::from_le_bytes([data[1], data[2]]));
    if let Ok(values) = codec.decode(&data[3..], n) {
        assert_eq!(values.len(), n);
        assert!(values.iter().all(|v| v.is_finite()));
        let again = codec.encode(&values).expect("decoded values are finite");
        assert_eq!(Some(again.len()), codec.encoded_len(n));
    }
});
