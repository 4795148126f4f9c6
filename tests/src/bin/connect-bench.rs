//! Connection setup timing for the benchmark: `serve PORT` accepts and
//! closes connections (backlog 4096, so that no SYN waits for a full
//! queue); `connect ADDR PORT COUNT` times COUNT sequential connect()s and
//! prints their durations in microseconds, as JSON.

use std::{
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    time::Instant,
};

use anyhow::{Context as _, bail};
use socket2::{Domain, Socket, Type};

fn serve(port: u16) -> anyhow::Result<()> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port).into())?;
    socket.listen(4096)?;
    let listener: TcpListener = socket.into();
    for stream in listener.incoming() {
        drop(stream?);
    }
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

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("serve") => serve(args.get(2).context("port")?.parse()?),
        Some("connect") => connect(
            args.get(2).context("address")?.parse()?,
            args.get(3).context("port")?.parse()?,
            args.get(4).context("count")?.parse()?,
        ),
        _ => bail!("usage: connect-bench serve PORT | connect ADDR PORT COUNT"),
    }
}
