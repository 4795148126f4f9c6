//! What a broker decodes from any TCP client: never panics, never consumes
//! more than it was given, and whatever it accepts re-encodes to the same
//! frame.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pvc_proto::{AgentCodec, BrokerCodec};
use tokio_util::codec::{Decoder as _, Encoder as _};

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    let mut codec = BrokerCodec::default();
    while let Ok(Some(msg)) = codec.decode(&mut buf) {
        let mut again = BytesMut::new();
        AgentCodec::default().encode(msg.clone(), &mut again).unwrap();
        let back = BrokerCodec::default().decode(&mut again).unwrap();
        assert_eq!(back, Some(msg));
    }
});
