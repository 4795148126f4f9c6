//! Connection setup and round-trip timing for the benchmark: `serve PORT`
//! accepts and closes connections (backlog 4096, so that no SYN waits for a
//! full queue); `connect ADDR PORT COUNT` times COUNT sequential connect()s;
//! `echo PORT` echoes every byte back; `rtt ADDR PORT COUNT` times COUNT
//! one-byte round trips over one connection; `first ADDR PORT COUNT` times
//! COUNT sequential connections to an echo server up to their first byte
//! back (what a relayed connect() hides: its connect() returns when the
//! local agent accepts); `rtt-pairs ADDR1 PORT1 ADDR2 PORT2 BLOCK BLOCKS`
//! holds one connection to each echo server and times BLOCKS pairs of
//! BLOCK round trips (each block's median), the blocks alternating
//! between the two. Durations
//! are printed in microseconds, as JSON.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    time::Instant,
};

use anyhow::{Context as _, bail};
use socket2::{Domain, Socket, Type};

fn listen(port: u16) -> anyhow::Result<TcpListener> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port).into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

fn serve(port: u16) -> anyhow::Result<()> {
    for stream in listen(port)?.incoming() {
        drop(stream?);
    }
    Ok(())
}

/// One connection at a time: the benchmark's round trips are sequential.
fn echo(port: u16) -> anyhow::Result<()> {
    for stream in listen(port)?.incoming() {
        let mut s = stream?;
        s.set_nodelay(true)?;
        let mut buf = [0u8; 1];
        while let Ok(1) = s.read(&mut buf) {
            if s.write_all(&buf).is_err() {
                break;
            }
        }
    }
    Ok(())
}

fn rtt(addr: Ipv4Addr, port: u16, count: usize) -> anyhow::Result<()> {
    let mut s =
        TcpStream::connect((addr, port)).with_context(|| format!("connect to {addr}:{port}"))?;
    s.set_nodelay(true)?;
    let mut us = Vec::with_capacity(count);
    let mut buf = [0u8; 1];
    for _ in 0..count {
        let t = Instant::now();
        s.write_all(b"x")?;
        s.read_exact(&mut buf).context("the echo server closed")?;
        us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    println!("{}", serde_json::json!({ "us": us }));
    Ok(())
}

fn echo_connection(addr: Ipv4Addr, port: u16) -> anyhow::Result<TcpStream> {
    let s =
        TcpStream::connect((addr, port)).with_context(|| format!("connect to {addr}:{port}"))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Median µs of `count` one-byte round trips on `s`: a block's mean would
/// follow the one round trip a preemption stretched.
fn block(s: &mut TcpStream, count: usize) -> anyhow::Result<f64> {
    let mut buf = [0u8; 1];
    let mut us = Vec::with_capacity(count);
    for _ in 0..count {
        let t = Instant::now();
        s.write_all(b"x")?;
        s.read_exact(&mut buf).context("the echo server closed")?;
        us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    us.sort_by(f64::total_cmp);
    Ok(us[us.len() / 2])
}

/// Both paths from one process, back to back: a block on one right after a
/// block on the other sees the same machine (frequency, idle states,
/// neighbours), which separate runs do not. Strictly alternating (one, two,
/// one, two, ..., one), each block of `two` paired with the mean of the
/// blocks of `one` on either side of it, so that a drift of the machine
/// cancels. (Alternating the order per pair instead, ABBA, ran two blocks
/// on one connection in a row at every pair's boundary, and here the
/// second of those was 3x slower whichever path it was.)
fn rtt_pairs(
    one: (Ipv4Addr, u16),
    two: (Ipv4Addr, u16),
    count: usize,
    blocks: usize,
) -> anyhow::Result<()> {
    let mut conns = [
        echo_connection(one.0, one.1)?,
        echo_connection(two.0, two.1)?,
    ];
    for c in &mut conns {
        block(c, count.min(500))?;
    }
    let mut before = block(&mut conns[0], count)?;
    let mut pairs = Vec::with_capacity(blocks);
    for _ in 0..blocks {
        let second = block(&mut conns[1], count)?;
        let after = block(&mut conns[0], count)?;
        pairs.push([(before + after) / 2.0, second]);
        before = after;
    }
    println!("{}", serde_json::json!({ "pairs": pairs }));
    Ok(())
}

fn connect(addr: Ipv4Addr, port: u16, count: usize) -> anyhow::Result<()> {
    let mut us = Vec::with_capacity(count);
    for _ in 0..count {
        let t = Instant::now();
        let s = TcpStream::connect((addr, port))
            .with_context(|| format!("connect to {addr}:{port}"))?;
        us.push(t.elapsed().as_secs_f64() * 1e6);
        // Closing first on this side leaves TIME_WAIT here, not on the server.
        drop(s);
    }
    println!("{}", serde_json::json!({ "us": us }));
    Ok(())
}

fn first(addr: Ipv4Addr, port: u16, count: usize) -> anyhow::Result<()> {
    let mut us = Vec::with_capacity(count);
    let mut buf = [0u8; 1];
    for _ in 0..count {
        let t = Instant::now();
        let mut s = TcpStream::connect((addr, port))
            .with_context(|| format!("connect to {addr}:{port}"))?;
        s.set_nodelay(true)?;
        s.write_all(b"x")?;
        s.read_exact(&mut buf).context("the echo server closed")?;
        us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    println!("{}", serde_json::json!({ "us": us }));
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("serve") => serve(args.get(2).context("port")?.parse()?),
        Some("echo") => echo(args.get(2).context("port")?.parse()?),
        Some(mode @ ("connect" | "rtt" | "first")) => {
            let addr = args.get(2).context("address")?.parse()?;
            let port = args.get(3).context("port")?.parse()?;
            let count = args.get(4).context("count")?.parse()?;
            match mode {
                "connect" => connect(addr, port, count),
                "rtt" => rtt(addr, port, count),
                _ => first(addr, port, count),
            }
        }
        Some("rtt-pairs") => {
            let arg = |i: usize| {
                args.get(i)
                    .context("rtt-pairs ADDR1 PORT1 ADDR2 PORT2 BLOCK BLOCKS")
            };
            rtt_pairs(
                (arg(2)?.parse()?, arg(3)?.parse()?),
                (arg(4)?.parse()?, arg(5)?.parse()?),
                arg(6)?.parse()?,
                arg(7)?.parse()?,
            )
        }
        _ => bail!(
            "usage: connect-bench serve PORT | connect ADDR PORT COUNT | echo PORT | \
             rtt ADDR PORT COUNT | first ADDR PORT COUNT | \
             rtt-pairs ADDR1 PORT1 ADDR2 PORT2 BLOCK BLOCKS"
        ),
    }
}
