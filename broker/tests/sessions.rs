//! The broker over real TCP on loopback: membership, conflicts, and every
//! kind of bad input ending in an error frame and a closed connection.

use std::{net::Ipv4Addr, sync::Arc, time::Duration};

use broker::{Broker, Limits};
use futures::{SinkExt as _, StreamExt as _};
use pvc_proto::{AgentCodec, AgentMessage, BrokerMessage, ErrorCode, Member, Registration};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    time::timeout,
};
use tokio_util::codec::Framed;

type Agent = Framed<TcpStream, AgentCodec>;

async fn start(limits: Limits) -> (Arc<Broker>, std::net::SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let broker = Broker::new("test-broker", limits);
    tokio::spawn(Arc::clone(&broker).serve(listener));
    (broker, addr)
}

fn member(name: &str, last: u8) -> Member {
    Member {
        name: name.into(),
        virtual_ip: Ipv4Addr::new(240, 0, 0, last),
        addresses: vec![Ipv4Addr::new(198, 18, 0, last)],
    }
}

fn register(cluster: &str, m: Member) -> AgentMessage {
    AgentMessage::Register(Registration {
        cluster: cluster.into(),
        member: m,
        software: "test".into(),
    })
}

async fn next(agent: &mut Agent) -> BrokerMessage {
    timeout(Duration::from_secs(5), agent.next())
        .await
        .expect("broker answers within 5 s")
        .expect("connection open")
        .expect("well-formed frame")
}

async fn join(addr: std::net::SocketAddr, cluster: &str, m: Member) -> (Agent, Vec<Member>) {
    let mut agent = Framed::new(
        TcpStream::connect(addr).await.unwrap(),
        AgentCodec::default(),
    );
    agent.send(register(cluster, m)).await.unwrap();
    match next(&mut agent).await {
        BrokerMessage::Welcome {
            members,
            more: false,
            ..
        } => (agent, members),
        other => panic!("expected Welcome, got {other:?}"),
    }
}

/// After an error the broker closes: the stream ends.
async fn expect_error_then_close(agent: &mut Agent, code: ErrorCode) {
    match next(agent).await {
        BrokerMessage::Error { code: c, message } => {
            assert_eq!(c, code, "{message}");
            assert!(!message.is_empty());
        }
        other => panic!("expected Error, got {other:?}"),
    }
    let end = timeout(Duration::from_secs(5), agent.next())
        .await
        .expect("closed within 5 s");
    assert!(
        end.is_none(),
        "connection closed after the error, got {end:?}"
    );
}

#[tokio::test]
async fn members_learn_about_each_other_as_they_come_and_go() {
    let (broker, addr) = start(Limits::default()).await;
    let (mut a, seen) = join(addr, "lab", member("a", 1)).await;
    assert!(seen.is_empty());
    let (mut b, seen) = join(addr, "lab", member("b", 2)).await;
    assert_eq!(seen, vec![member("a", 1)]);
    assert_eq!(next(&mut a).await, BrokerMessage::Joined(member("b", 2)));

    // Another cluster is invisible.
    let (_other, seen) = join(addr, "elsewhere", member("c", 3)).await;
    assert!(seen.is_empty());
    assert_eq!(broker.members("lab"), 2);

    b.send(AgentMessage::Ping { nonce: 7 }).await.unwrap();
    assert_eq!(next(&mut b).await, BrokerMessage::Pong { nonce: 7 });

    // A lost session and a clean departure are told apart.
    drop(b);
    assert_eq!(
        next(&mut a).await,
        BrokerMessage::Left {
            name: "b".into(),
            virtual_ip: Ipv4Addr::new(240, 0, 0, 2),
            clean: false,
        }
    );
    let (mut d, _) = join(addr, "lab", member("d", 4)).await;
    assert_eq!(next(&mut a).await, BrokerMessage::Joined(member("d", 4)));
    d.send(AgentMessage::Leave).await.unwrap();
    assert_eq!(
        next(&mut a).await,
        BrokerMessage::Left {
            name: "d".into(),
            virtual_ip: Ipv4Addr::new(240, 0, 0, 4),
            clean: true,
        }
    );
}

#[tokio::test]
async fn a_taken_address_or_name_is_refused_and_a_restart_replaces_the_session() {
    let (_broker, addr) = start(Limits::default()).await;
    let (mut a, _) = join(addr, "lab", member("a", 1)).await;

    let mut imposter = Framed::new(
        TcpStream::connect(addr).await.unwrap(),
        AgentCodec::default(),
    );
    imposter
        .send(register("lab", member("z", 1)))
        .await
        .unwrap();
    expect_error_then_close(&mut imposter, ErrorCode::Conflict).await;

    let mut renamed = Framed::new(
        TcpStream::connect(addr).await.unwrap(),
        AgentCodec::default(),
    );
    renamed.send(register("lab", member("a", 9))).await.unwrap();
    expect_error_then_close(&mut renamed, ErrorCode::Conflict).await;

    // The same member registering again (its agent restarted) wins.
    let (_a2, _) = join(addr, "lab", member("a", 1)).await;
    expect_error_then_close(&mut a, ErrorCode::Replaced).await;
}

#[tokio::test]
async fn invalid_registrations_are_refused_with_the_reason() {
    let (_broker, addr) = start(Limits::default()).await;
    let mut agent = Framed::new(
        TcpStream::connect(addr).await.unwrap(),
        AgentCodec::default(),
    );
    let mut m = member("a", 1);
    m.virtual_ip = Ipv4Addr::new(198, 18, 0, 1);
    agent.send(register("lab", m)).await.unwrap();
    expect_error_then_close(&mut agent, ErrorCode::InvalidRegistration).await;
}

#[tokio::test]
async fn ping_before_register_is_refused() {
    let (_broker, addr) = start(Limits::default()).await;
    let mut agent = Framed::new(
        TcpStream::connect(addr).await.unwrap(),
        AgentCodec::default(),
    );
    agent.send(AgentMessage::Ping { nonce: 1 }).await.unwrap();
    expect_error_then_close(&mut agent, ErrorCode::NotRegistered).await;
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
    let (_a, _) = join(addr, "lab", member("a", 1)).await;

    let mut http = raw_exchange(addr, b"GET / HTTP/1.1\r\n\r\n").await;
    expect_error_then_close(&mut http, ErrorCode::MalformedFrame).await;

    let mut newer = raw_exchange(addr, b"PVC\x09\x00\x00\x00\x00").await;
    expect_error_then_close(&mut newer, ErrorCode::UnsupportedVersion).await;

    let mut huge = raw_exchange(addr, b"PVC\x01\xff\xff\xff\xff").await;
    expect_error_then_close(&mut huge, ErrorCode::FrameTooLarge).await;

    let mut garbage = raw_exchange(addr, b"PVC\x01\x00\x00\x00\x04\xff\xff\xff\xff").await;
    expect_error_then_close(&mut garbage, ErrorCode::MalformedFrame).await;

    // A registered member sending garbage is dropped, and others see it leave.
    let (mut b, _) = join(addr, "lab", member("b", 2)).await;
    b.get_mut()
        .write_all(b"PVC\x01\x00\x00\x00\x02\x07\x07")
        .await
        .unwrap();
    expect_error_then_close(&mut b, ErrorCode::MalformedFrame).await;

    // The broker still serves.
    let (_c, seen) = join(addr, "lab", member("c", 3)).await;
    assert_eq!(seen, vec![member("a", 1)]);
    assert_eq!(broker.members("lab"), 2);
}

#[tokio::test]
async fn silent_agents_time_out() {
    let limits = Limits {
        register_timeout: Duration::from_millis(200),
        idle_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let (broker, addr) = start(limits).await;
    let mut mute = Framed::new(
        TcpStream::connect(addr).await.unwrap(),
        AgentCodec::default(),
    );
    expect_error_then_close(&mut mute, ErrorCode::Timeout).await;

    let (mut a, _) = join(addr, "lab", member("a", 1)).await;
    expect_error_then_close(&mut a, ErrorCode::Timeout).await;
    assert_eq!(broker.members("lab"), 0);
}

#[tokio::test]
async fn a_half_sent_frame_does_not_block_the_broker() {
    let (_broker, addr) = start(Limits::default()).await;
    let mut partial = TcpStream::connect(addr).await.unwrap();
    partial
        .write_all(b"PVC\x01\x00\x00\x10\x00abc")
        .await
        .unwrap();
    let (_a, _) = join(addr, "lab", member("a", 1)).await;
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
