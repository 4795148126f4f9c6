//! The broker over real TCP on loopback: publication, admission,
//! membership, relaying, revocation, persistence, and every kind of bad
//! input ending in an error frame and a closed connection.

use std::{net::Ipv4Addr, sync::Arc, time::Duration};

use broker::{Broker, Limits};
use futures::{SinkExt as _, StreamExt as _};
use pvc_proto::{
    AgentCodec, AgentMessage, BrokerMessage, ClusterId, ErrorCode, MemberInfo, MembershipRecord,
    PublicKey, Publication, Registration, Revocations, SignedRecord, SignedRevocations, unix_now,
};
use ring::{rand::SystemRandom, signature::Ed25519KeyPair};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    time::timeout,
};
use tokio_util::codec::Framed;

type Agent = Framed<TcpStream, AgentCodec>;

fn keypair() -> Ed25519KeyPair {
    let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
    Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap()
}

struct Master {
    key: Ed25519KeyPair,
    public: PublicKey,
    cluster: ClusterId,
    /// One validity for every record it signs: the same record signs the
    /// same, whenever the test asks for it.
    not_after: u64,
}

impl Master {
    fn new() -> Self {
        let key = keypair();
        let public = PublicKey::of(&key);
        Self {
            cluster: ClusterId::of(&public),
            key,
            public,
            not_after: unix_now() + 3600,
        }
    }

    fn record(&self, name: &str, last: u8, host: &Ed25519KeyPair) -> SignedRecord {
        let r = MembershipRecord {
            cluster: self.cluster,
            serial: last as u64,
            name: name.into(),
            virtual_ip: Ipv4Addr::new(240, 0, 0, last),
            host_key: PublicKey::of(host),
            groups: vec![],
            not_before: 0,
            not_after: self.not_after,
        };
        SignedRecord::sign(&r, &self.key)
    }

    fn publication(&self, records: Vec<SignedRecord>) -> Publication {
        Publication {
            master_key: self.public,
            records,
            revocations: None,
            policy: None,
        }
    }

    async fn publish(&self, addr: std::net::SocketAddr, p: Publication) -> BrokerMessage {
        let mut s = Framed::new(
            TcpStream::connect(addr).await.unwrap(),
            AgentCodec::default(),
        );
        s.send(AgentMessage::Publish(p)).await.unwrap();
        next(&mut s).await
    }
}

async fn start(limits: Limits) -> (Arc<Broker>, std::net::SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let broker = Broker::new("test-broker", limits);
    tokio::spawn(Arc::clone(&broker).serve(listener));
    (broker, addr)
}

async fn next(agent: &mut Agent) -> BrokerMessage {
    timeout(Duration::from_secs(5), agent.next())
        .await
        .expect("broker answers within 5 s")
        .expect("connection open")
        .expect("well-formed frame")
}

fn register(cluster: ClusterId, host: &Ed25519KeyPair, last: u8) -> AgentMessage {
    AgentMessage::Register(Registration::new(
        cluster,
        host,
        vec![Ipv4Addr::new(198, 18, 0, last)],
        "test".into(),
    ))
}

async fn connect(addr: std::net::SocketAddr) -> Agent {
    Framed::new(
        TcpStream::connect(addr).await.unwrap(),
        AgentCodec::default(),
    )
}

/// Registers and returns the session, the agent's own record and the others.
async fn join(
    addr: std::net::SocketAddr,
    m: &Master,
    host: &Ed25519KeyPair,
    last: u8,
) -> (Agent, SignedRecord, Vec<MemberInfo>) {
    let mut agent = connect(addr).await;
    agent.send(register(m.cluster, host, last)).await.unwrap();
    match next(&mut agent).await {
        BrokerMessage::Welcome {
            you,
            members,
            more: false,
            ..
        } => (agent, you, members),
        other => panic!("expected Welcome, got {other:?}"),
    }
}

/// After an error the broker closes: the stream ends.
async fn expect_error_then_close(agent: &mut Agent, code: ErrorCode) -> String {
    let message = match next(agent).await {
        BrokerMessage::Error { code: c, message } => {
            assert_eq!(c, code, "{message}");
            assert!(!message.is_empty());
            message
        }
        other => panic!("expected Error, got {other:?}"),
    };
    let end = timeout(Duration::from_secs(5), agent.next())
        .await
        .expect("closed within 5 s");
    assert!(
        end.is_none(),
        "connection closed after the error, got {end:?}"
    );
    message
}

#[tokio::test]
async fn admitted_members_learn_about_each_other_and_relay_messages() {
    let (broker, addr) = start(Limits::default()).await;
    let m = Master::new();
    let (ka, kb) = (keypair(), keypair());
    let (ra, rb) = (m.record("a", 1, &ka), m.record("b", 2, &kb));
    assert_eq!(
        m.publish(addr, m.publication(vec![ra.clone(), rb.clone()]))
            .await,
        BrokerMessage::Published { records: 2 }
    );

    let (mut a, you, seen) = join(addr, &m, &ka, 1).await;
    assert_eq!(you, ra, "the broker hands an agent its own record");
    assert!(seen.is_empty());
    let (mut b, _, seen) = join(addr, &m, &kb, 2).await;
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].record, ra);
    assert_eq!(seen[0].addresses, vec![Ipv4Addr::new(198, 18, 0, 1)]);
    match next(&mut a).await {
        BrokerMessage::Joined(info) => assert_eq!(info.record, rb),
        other => panic!("{other:?}"),
    }
    assert_eq!(broker.members(&m.cluster), 2);

    // Relayed both ways; the broker names the sender by its session.
    a.send(AgentMessage::Relay {
        to: Ipv4Addr::new(240, 0, 0, 2),
        payload: vec![1, 2, 3],
    })
    .await
    .unwrap();
    assert_eq!(
        next(&mut b).await,
        BrokerMessage::Relayed {
            from: Ipv4Addr::new(240, 0, 0, 1),
            payload: vec![1, 2, 3]
        }
    );
    a.send(AgentMessage::Relay {
        to: Ipv4Addr::new(240, 0, 0, 9),
        payload: vec![],
    })
    .await
    .unwrap();
    assert_eq!(
        next(&mut a).await,
        BrokerMessage::Undeliverable {
            to: Ipv4Addr::new(240, 0, 0, 9)
        }
    );

    b.send(AgentMessage::Ping { nonce: 7 }).await.unwrap();
    assert_eq!(next(&mut b).await, BrokerMessage::Pong { nonce: 7 });

    // A lost session and a clean departure are told apart.
    drop(b);
    assert_eq!(
        next(&mut a).await,
        BrokerMessage::Left {
            virtual_ip: Ipv4Addr::new(240, 0, 0, 2),
            clean: false
        }
    );
    let (mut b, _, _) = join(addr, &m, &kb, 2).await;
    assert!(matches!(next(&mut a).await, BrokerMessage::Joined(_)));
    b.send(AgentMessage::Leave).await.unwrap();
    assert_eq!(
        next(&mut a).await,
        BrokerMessage::Left {
            virtual_ip: Ipv4Addr::new(240, 0, 0, 2),
            clean: true
        }
    );
}

#[tokio::test]
async fn only_admitted_host_keys_register() {
    let (_broker, addr) = start(Limits::default()).await;
    let m = Master::new();
    let ka = keypair();

    // Nothing published for this cluster yet.
    let mut early = connect(addr).await;
    early.send(register(m.cluster, &ka, 1)).await.unwrap();
    expect_error_then_close(&mut early, ErrorCode::UnknownCluster).await;

    m.publish(addr, m.publication(vec![m.record("a", 1, &ka)]))
        .await;
    let mut stranger = connect(addr).await;
    stranger
        .send(register(m.cluster, &keypair(), 5))
        .await
        .unwrap();
    let why = expect_error_then_close(&mut stranger, ErrorCode::NotAdmitted).await;
    assert!(why.contains("pvc master admit"), "{why}");

    // A registration signed by another key than the one it names.
    let mut forged = Registration::new(
        m.cluster,
        &keypair(),
        vec![Ipv4Addr::new(198, 18, 0, 1)],
        "x".into(),
    );
    forged.host_key = PublicKey::of(&ka);
    let mut imposter = connect(addr).await;
    imposter.send(AgentMessage::Register(forged)).await.unwrap();
    expect_error_then_close(&mut imposter, ErrorCode::InvalidRegistration).await;

    // The same member registering again (its agent restarted) wins.
    let (mut a1, _, _) = join(addr, &m, &ka, 1).await;
    let (_a2, _, _) = join(addr, &m, &ka, 1).await;
    expect_error_then_close(&mut a1, ErrorCode::Replaced).await;
}

#[tokio::test]
async fn publications_that_do_not_verify_are_refused() {
    let (_broker, addr) = start(Limits::default()).await;
    let m = Master::new();
    let other = Master::new();
    // A record signed by another master, published under m's key.
    let foreign = other.record("x", 1, &keypair());
    let mut s = connect(addr).await;
    s.send(AgentMessage::Publish(m.publication(vec![foreign])))
        .await
        .unwrap();
    expect_error_then_close(&mut s, ErrorCode::BadPublication).await;
    // An altered record.
    let mut altered = m.record("y", 2, &keypair());
    altered.body[4] ^= 1;
    let mut s = connect(addr).await;
    s.send(AgentMessage::Publish(m.publication(vec![altered])))
        .await
        .unwrap();
    expect_error_then_close(&mut s, ErrorCode::BadPublication).await;
}

#[tokio::test]
async fn revocation_is_pushed_and_closes_the_revoked_session() {
    let (_broker, addr) = start(Limits::default()).await;
    let m = Master::new();
    let (ka, kb) = (keypair(), keypair());
    m.publish(
        addr,
        m.publication(vec![m.record("a", 1, &ka), m.record("b", 2, &kb)]),
    )
    .await;
    let (mut a, _, _) = join(addr, &m, &ka, 1).await;
    let (mut b, _, _) = join(addr, &m, &kb, 2).await;
    assert!(matches!(next(&mut a).await, BrokerMessage::Joined(_)));

    let list = Revocations {
        cluster: m.cluster,
        version: 1,
        issued_at: unix_now(),
        serials: vec![2],
    };
    let mut p = m.publication(vec![]);
    p.revocations = Some(SignedRevocations::sign(&list, &m.key));
    m.publish(addr, p).await;
    assert!(matches!(next(&mut a).await, BrokerMessage::Revocations(_)));
    assert!(matches!(next(&mut b).await, BrokerMessage::Revocations(_)));
    expect_error_then_close(&mut b, ErrorCode::NotAdmitted).await;
    assert_eq!(
        next(&mut a).await,
        BrokerMessage::Left {
            virtual_ip: Ipv4Addr::new(240, 0, 0, 2),
            clean: false
        }
    );

    let mut again = connect(addr).await;
    again.send(register(m.cluster, &kb, 2)).await.unwrap();
    let why = expect_error_then_close(&mut again, ErrorCode::NotAdmitted).await;
    assert!(why.contains("revoked"), "{why}");
}

#[tokio::test]
async fn publications_survive_a_broker_restart_with_a_state_file() {
    let dir = std::env::temp_dir().join(format!("pvc-broker-store-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("state.redb");
    let m = Master::new();
    let ka = keypair();
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let broker = Broker::with_store("b1", Limits::default(), &path).unwrap();
        let task = tokio::spawn(Arc::clone(&broker).serve(listener));
        m.publish(addr, m.publication(vec![m.record("a", 1, &ka)]))
            .await;
        task.abort();
        let _ = task.await;
        // The database closes with the last session holding the broker.
        while Arc::strong_count(&broker) > 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let broker = Broker::with_store("b2", Limits::default(), &path).unwrap();
    tokio::spawn(Arc::clone(&broker).serve(listener));
    let (_a, you, _) = join(addr, &m, &ka, 1).await;
    // Ed25519 signatures are deterministic: the same record signs the same.
    assert_eq!(you, m.record("a", 1, &ka));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Raw bytes: the broker must answer with an error frame and close, whatever
/// arrives, and keep serving everyone else.
async fn raw_exchange(addr: std::net::SocketAddr, bytes: &[u8]) -> Agent {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    Framed::new(stream, AgentCodec::default())
}

#[tokio::test]
async fn malformed_frames_get_an_error_and_a_closed_connection() {
    let (broker, addr) = start(Limits::default()).await;
    let m = Master::new();
    let (ka, kb) = (keypair(), keypair());
    m.publish(
        addr,
        m.publication(vec![m.record("a", 1, &ka), m.record("b", 2, &kb)]),
    )
    .await;
    let (_a, _, _) = join(addr, &m, &ka, 1).await;
    let v = pvc_proto::VERSION;

    let mut http = raw_exchange(addr, b"GET / HTTP/1.1\r\n\r\n").await;
    expect_error_then_close(&mut http, ErrorCode::MalformedFrame).await;

    let mut newer = raw_exchange(addr, b"PVC\x09\x00\x00\x00\x00").await;
    expect_error_then_close(&mut newer, ErrorCode::UnsupportedVersion).await;

    let mut huge = raw_exchange(addr, &[b'P', b'V', b'C', v, 0xff, 0xff, 0xff, 0xff]).await;
    expect_error_then_close(&mut huge, ErrorCode::FrameTooLarge).await;

    let mut garbage = raw_exchange(
        addr,
        &[b'P', b'V', b'C', v, 0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff],
    )
    .await;
    expect_error_then_close(&mut garbage, ErrorCode::MalformedFrame).await;

    // A registered member sending garbage is dropped, and others see it leave.
    let (mut b, _, _) = join(addr, &m, &kb, 2).await;
    b.get_mut()
        .write_all(&[b'P', b'V', b'C', v, 0, 0, 0, 2, 7, 7])
        .await
        .unwrap();
    expect_error_then_close(&mut b, ErrorCode::MalformedFrame).await;

    // A member may not publish.
    let (mut b, _, _) = join(addr, &m, &kb, 2).await;
    b.send(AgentMessage::Publish(m.publication(vec![])))
        .await
        .unwrap();
    expect_error_then_close(&mut b, ErrorCode::NotRegistered).await;

    // The broker still serves.
    let (_b, _, seen) = join(addr, &m, &kb, 2).await;
    assert_eq!(seen.len(), 1);
    assert_eq!(broker.members(&m.cluster), 2);
}

#[tokio::test]
async fn silent_agents_time_out() {
    let limits = Limits {
        register_timeout: Duration::from_millis(200),
        idle_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let (broker, addr) = start(limits).await;
    let m = Master::new();
    let ka = keypair();
    m.publish(addr, m.publication(vec![m.record("a", 1, &ka)]))
        .await;
    let mut mute = connect(addr).await;
    expect_error_then_close(&mut mute, ErrorCode::Timeout).await;

    let (mut a, _, _) = join(addr, &m, &ka, 1).await;
    expect_error_then_close(&mut a, ErrorCode::Timeout).await;
    assert_eq!(broker.members(&m.cluster), 0);
}

#[tokio::test]
async fn a_half_sent_frame_does_not_block_the_broker() {
    let (_broker, addr) = start(Limits::default()).await;
    let m = Master::new();
    let ka = keypair();
    m.publish(addr, m.publication(vec![m.record("a", 1, &ka)]))
        .await;
    let mut partial = TcpStream::connect(addr).await.unwrap();
    partial
        .write_all(&[b'P', b'V', b'C', pvc_proto::VERSION, 0, 0, 0x10, 0, 1, 2, 3])
        .await
        .unwrap();
    let (_a, _, _) = join(addr, &m, &ka, 1).await;
    drop(partial);
    let mut buf = [0u8; 1];
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.shutdown().await.unwrap();
    // Closing without a frame is not an error worth answering.
    assert_eq!(
        timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap(),
        0
    );
}
