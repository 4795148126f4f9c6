//! What an agent decodes from a broker (which it does not trust): never
//! panics, and whatever it accepts re-encodes to the same message.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pvc_proto::{AgentCodec, BrokerCodec};
use tokio_util::codec::{Decoder as _, Encoder as _};

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    let mut codec = AgentCodec::default();
    while let Ok(Some(msg)) = codec.decode(&mut buf) {
        let mut again = BytesMut::new();
        BrokerCodec::default().encode(msg.clone(), &mut again).unwrap();
        let back = AgentCodec::default().decode(&mut again).unwrap();
        assert_eq!(back, Some(msg));
    }
});
