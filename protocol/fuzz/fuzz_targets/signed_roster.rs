//! Fuzzes the signed-envelope decoder for `Roster`: never a panic, and whatever
//! opens must re-encode to the very bytes it came from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tapestry_protocol::{Roster, Signed};

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = Signed::<Roster>::open(data) {
        assert_eq!(v.envelope_bytes(), data);
        assert_eq!(v.id(), tapestry_protocol::ContentId::of(data));
    }
});
