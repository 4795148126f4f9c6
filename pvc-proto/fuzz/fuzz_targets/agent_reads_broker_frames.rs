//! What an agent decodes from a broker (which it does not trust), and the
//! checks it runs on member records and relayed handshakes: never panics,
//! and whatever it accepts re-encodes to the same message.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pvc_proto::{
    AgentCodec, BrokerCodec, BrokerMessage, PublicKey, handshake::Handshake, unix_now,
};
use tokio_util::codec::{Decoder as _, Encoder as _};

/// Some master key; the fuzzer cannot forge its signatures, but the
/// decoding and checking paths before that are exercised.
const MASTER: PublicKey = PublicKey([0x42; 32]);

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    let mut codec = AgentCodec::default();
    while let Ok(Some(msg)) = codec.decode(&mut buf) {
        match &msg {
            BrokerMessage::Welcome {
                you,
                members,
                revocations,
                policy,
                ..
            } => {
                let _ = you.verify(&MASTER).map(|r| r.check(unix_now(), &[]));
                for m in members {
                    let _ = m.record.verify(&MASTER);
                }
                let _ = revocations.as_ref().map(|r| r.verify(&MASTER));
                let _ = policy.as_ref().map(|p| p.verify(&MASTER));
            }
            BrokerMessage::Relayed { payload, .. } => {
                if let Some(h) = Handshake::decode(payload) {
                    assert_eq!(Handshake::decode(&h.encode()), Some(h));
                }
            }
            _ => {}
        }
        let mut again = BytesMut::new();
        BrokerCodec::default()
            .encode(msg.clone(), &mut again)
            .unwrap();
        let back = AgentCodec::default().decode(&mut again).unwrap();
        assert_eq!(back, Some(msg));
    }
});
