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
//! between the two; `sink PORT` reads and discards; `rate-pairs ADDR1
//! PORT1 ADDR2 PORT2 MBIT BLOCK_MS QUARTETS` holds one connection to each
//! sink and measures CPU 0's busy time per KiB sent at MBIT in QUARTETS
//! quartets of blocks of BLOCK_MS (one, two, two, one); `rate ADDR PORT MBIT
//! MS` sends at MBIT for MS once. Durations are printed in microseconds,
//! CPU per byte in ns per KiB, as JSON.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
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

/// One connection at a time, as `echo`.
fn sink(port: u16) -> anyhow::Result<()> {
    let mut buf = vec![0u8; 1 << 18];
    for stream in listen(port)?.incoming() {
        let mut s = stream?;
        while let Ok(1..) = s.read(&mut buf) {}
    }
    Ok(())
}

fn connect_to(addr: Ipv4Addr, port: u16) -> anyhow::Result<TcpStream> {
    TcpStream::connect((addr, port)).with_context(|| format!("connect to {addr}:{port}"))
}

fn rtt(addr: Ipv4Addr, port: u16, count: usize) -> anyhow::Result<()> {
    let mut s = echo_connection(addr, port)?;
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
    let s = connect_to(addr, port)?;
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

/// iperf3's TCP block: the size of one paced write.
const CHUNK: usize = 128 * 1024;

/// Sends for `ms` at `mbit`, one `CHUNK` write at each of evenly spaced
/// deadlines (as `iperf3 -b` paces), then waits until the peer has
/// acknowledged every byte, so that a block's work ends in that block.
/// Returns CPU 0's busy time meanwhile (ns) and the bytes sent. The caller
/// runs on CPU 0, as the sink does: veth delivers on the sending CPU, so
/// the whole transfer, softirqs included, is CPU 0's work, and CPU 0's
/// idle counter is exact when CPU 0 reads it.
fn paced(s: &mut TcpStream, mbit: f64, ms: u64) -> anyhow::Result<(f64, u64)> {
    let chunk = vec![0u8; CHUNK];
    let interval = Duration::from_secs_f64(CHUNK as f64 * 8.0 / (mbit * 1e6));
    let writes = (ms as f64 / 1e3 / interval.as_secs_f64()).round().max(1.0) as u32;
    let ((), busy_ns) = pvc_lab::cpu::busy_during(Some(0), || {
        let t0 = Instant::now();
        for i in 0..writes {
            if let Some(wait) = (t0 + interval * i).checked_duration_since(Instant::now()) {
                sleep(wait);
            }
            s.write_all(&chunk).context("the sink closed")?;
        }
        wait_acknowledged(s)
    })?;
    Ok((busy_ns, u64::from(writes) * CHUNK as u64))
}

fn wait_acknowledged(s: &TcpStream) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut unacked: libc::c_int = 0;
        // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int, the bytes in the
        // socket's send queue not yet acknowledged, to the pointer given.
        let rc = unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &mut unacked) };
        ensure!(rc == 0, "SIOCOUTQ: {}", std::io::Error::last_os_error());
        if unacked == 0 {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{unacked} bytes still unacknowledged after 10 s: is the sink reading?"
        );
        sleep(Duration::from_micros(100));
    }
}

/// CPU per byte on both paths from one process, in quartets of blocks
/// (one, two, two, one): each quartet gives each path's busy time over its
/// bytes in its two blocks, ns per KiB. On this machine, separate runs (an
/// iperf3 process and a new connection per run, 5 s each) spread by +-15%
/// for the same path: slow changes of the machine, which short blocks from
/// one process on held connections cancel. Each path gets one block right
/// after one of its own and one after two of the other's in every quartet,
/// so what the order does (a connection resuming after idling, a drift of
/// the machine within the quartet) falls on both paths alike; pairing one
/// block with its neighbours' mean instead made one path look 2% cheaper
/// than the same path.
fn rate_pairs(
    one: (Ipv4Addr, u16),
    two: (Ipv4Addr, u16),
    mbit: f64,
    ms: u64,
    quartets: usize,
) -> anyhow::Result<()> {
    let mut conns = [connect_to(one.0, one.1)?, connect_to(two.0, two.1)?];
    for c in &mut conns {
        paced(c, mbit, ms)?;
    }
    let per_kib =
        |(ns1, b1): (f64, u64), (ns2, b2): (f64, u64)| (ns1 + ns2) / ((b1 + b2) as f64 / 1024.0);
    let mut pairs = Vec::with_capacity(quartets);
    for _ in 0..quartets {
        let one1 = paced(&mut conns[0], mbit, ms)?;
        let two1 = paced(&mut conns[1], mbit, ms)?;
        let two2 = paced(&mut conns[1], mbit, ms)?;
        let one2 = paced(&mut conns[0], mbit, ms)?;
        pairs.push([per_kib(one1, one2), per_kib(two1, two2)]);
    }
    println!("{}", serde_json::json!({ "pairs": pairs }));
    Ok(())
}

fn rate(addr: Ipv4Addr, port: u16, mbit: f64, ms: u64) -> anyhow::Result<()> {
    let (busy_ns, bytes) = paced(&mut connect_to(addr, port)?, mbit, ms)?;
    println!(
        "{}",
        serde_json::json!({ "bytes": bytes, "busy_ns": busy_ns })
    );
    Ok(())
}

fn connect(addr: Ipv4Addr, port: u16, count: usize) -> anyhow::Result<()> {
    let mut us = Vec::with_capacity(count);
    for _ in 0..count {
        let t = Instant::now();
        let s = connect_to(addr, port)?;
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
        let mut s = echo_connection(addr, port)?;
        s.write_all(b"x")?;
        s.read_exact(&mut buf).context("the echo server closed")?;
        us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    println!("{}", serde_json::json!({ "us": us }));
    Ok(())
}

/// A mode's arguments, parsed one by one; a missing or bad one names the
/// mode's usage.
struct Args<'a> {
    args: &'a [String],
    usage: &'static str,
}

impl Args<'_> {
    fn get<T: std::str::FromStr>(&self, i: usize) -> anyhow::Result<T>
    where
        T::Err: std::error::Error + Send + Sync + 'static,
    {
        let arg = self
            .args
            .get(i)
            .with_context(|| format!("usage: {}", self.usage))?;
        arg.parse()
            .with_context(|| format!("{arg:?} (argument {i}); usage: {}", self.usage))
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let with = |usage| Args { args: &args, usage };
    match args.get(1).map(String::as_str) {
        Some("serve") => serve(with("serve PORT").get(2)?),
        Some("echo") => echo(with("echo PORT").get(2)?),
        Some("sink") => sink(with("sink PORT").get(2)?),
        Some(mode @ ("connect" | "rtt" | "first")) => {
            let a = with("connect|rtt|first ADDR PORT COUNT");
            let (addr, port, count) = (a.get(2)?, a.get(3)?, a.get(4)?);
            match mode {
                "connect" => connect(addr, port, count),
                "rtt" => rtt(addr, port, count),
                _ => first(addr, port, count),
            }
        }
        Some("rtt-pairs") => {
            let a = with("rtt-pairs ADDR1 PORT1 ADDR2 PORT2 BLOCK BLOCKS");
            rtt_pairs(
                (a.get(2)?, a.get(3)?),
                (a.get(4)?, a.get(5)?),
                a.get(6)?,
                a.get(7)?,
            )
        }
        Some("rate-pairs") => {
            let a = with("rate-pairs ADDR1 PORT1 ADDR2 PORT2 MBIT BLOCK_MS QUARTETS");
            rate_pairs(
                (a.get(2)?, a.get(3)?),
                (a.get(4)?, a.get(5)?),
                a.get(6)?,
                a.get(7)?,
                a.get(8)?,
            )
        }
        Some("rate") => {
            let a = with("rate ADDR PORT MBIT MS");
            rate(a.get(2)?, a.get(3)?, a.get(4)?, a.get(5)?)
        }
        _ => bail!(
            "usage: connect-bench serve PORT | connect ADDR PORT COUNT | echo PORT | \
             rtt ADDR PORT COUNT | first ADDR PORT COUNT | \
             rtt-pairs ADDR1 PORT1 ADDR2 PORT2 BLOCK BLOCKS | sink PORT | \
             rate-pairs ADDR1 PORT1 ADDR2 PORT2 MBIT BLOCK_MS QUARTETS | rate ADDR PORT MBIT MS"
        ),
    }
}
