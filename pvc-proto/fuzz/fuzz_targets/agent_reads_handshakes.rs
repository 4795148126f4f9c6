//! Handshake messages arrive from other agents through an untrusted broker:
//! decoding arbitrary payloads never panics, and what decodes round-trips.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pvc_proto::handshake::Handshake;

fuzz_target!(|data: &[u8]| {
    if let Some(h) = Handshake::decode(data) {
        let _ = h.id();
        assert_eq!(Handshake::decode(&h.encode()), Some(h));
    }
});
