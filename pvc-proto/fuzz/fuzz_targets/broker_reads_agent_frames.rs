//! What a broker decodes from any TCP client, and the checks it then runs on
//! it: never panics, never consumes more than it was given, and whatever it
//! accepts re-encodes to the same message.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pvc_proto::{AgentCodec, AgentMessage, BrokerCodec, handshake::Handshake, unix_now};
use tokio_util::codec::{Decoder as _, Encoder as _};

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    let mut codec = BrokerCodec::default();
    while let Ok(Some(msg)) = codec.decode(&mut buf) {
        match &msg {
            AgentMessage::Register(r) => {
                let _ = r.validate(unix_now());
            }
            AgentMessage::Publish(p) => {
                for r in &p.records {
                    let _ = r.verify(&p.master_key);
                }
                if let Some(r) = &p.revocations {
                    let _ = r.verify(&p.master_key);
                }
                if let Some(g) = &p.policy {
                    let _ = g.verify(&p.master_key);
                }
            }
            AgentMessage::Relay { payload, .. } => {
                let _ = Handshake::decode(payload);
            }
            AgentMessage::Ping { .. }
            | AgentMessage::Leave
            | AgentMessage::Site(_)
            | AgentMessage::Probe { .. }
            | AgentMessage::RelayOffer { .. }
            | AgentMessage::RelayJoin { .. } => {}
        }
        let mut again = BytesMut::new();
        AgentCodec::default()
            .encode(msg.clone(), &mut again)
            .unwrap();
        let back = BrokerCodec::default().decode(&mut again).unwrap();
        assert_eq!(back, Some(msg));
    }
});
