//! Fuzzes the request-response decoders: never a panic, and a decoded
//! message re-encodes and decodes to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tapestry_protocol::{FetchRequest, FetchResponse};

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = FetchRequest::from_bytes(data) {
        let again = FetchRequest::from_bytes(&req.to_bytes().expect("encode")).expect("re-decode");
        assert_eq!(again, req);
    }
    if let Ok(resp) = FetchResponse::from_bytes(data) {
        let again = FetchResponse::from_bytes(&resp.to_bytes().expect("encode")).expect("re-decode");
        assert_eq!(again, resp);
    }
});
