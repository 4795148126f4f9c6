//! The virtual DNS answers whatever arrives on its port: any datagram gets
//! no answer or a well-formed one, never a panic.
#![no_main]

use std::{collections::BTreeMap, net::Ipv4Addr};

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let names: BTreeMap<String, Ipv4Addr> =
        [("node1".to_string(), Ipv4Addr::new(240, 0, 0, 7))].into();
    if let Some(reply) = pvc_proto::dns::answer(data, "pvc", &names) {
        assert!(simple_dns::Packet::parse(&reply).is_ok(), "an answer that does not parse");
    }
});
