//! Moving a relayed flow's bytes: between two TCP sockets with splice(2)
//! through a pipe, so that neither the broker nor the agents copy payload
//! into userspace. Each direction ends with a half-close, as TCP would.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
};

use tokio::{io::Interest, net::TcpStream};

/// How much one splice call may move.
const CHUNK: usize = 1 << 20;
/// Pipe capacity asked for (the default 64 KiB costs throughput; the
/// kernel caps it at fs.pipe-max-size).
const PIPE_SIZE: libc::c_int = 1 << 20;

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two descriptors into `fds`, which we own from here.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: a plain fcntl on our own descriptor; failure leaves the default size.
        unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
        Ok(Self { read, write })
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: splice between descriptors we hold open; null offsets (sockets
    // and pipes have none).
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Moves everything `from` sends to `to` until `from` half-closes, then
/// half-closes `to`. Returns the number of bytes moved.
pub async fn pump(from: &TcpStream, to: &TcpStream) -> io::Result<u64> {
    let pipe = Pipe::new()?;
    let mut total = 0u64;
    loop {
        let n = from
            .async_io(Interest::READABLE, || {
                splice(from.as_raw_fd(), pipe.write.as_raw_fd(), CHUNK)
            })
            .await?;
        if n == 0 {
            break;
        }
        let mut left = n;
        while left > 0 {
            let m = to
                .async_io(Interest::WRITABLE, || {
                    splice(pipe.read.as_raw_fd(), to.as_raw_fd(), left)
                })
                .await?;
            if m == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            left -= m;
        }
        total += n as u64;
    }
    // SAFETY: shutdown on a socket we hold open.
    unsafe { libc::shutdown(to.as_raw_fd(), libc::SHUT_WR) };
    Ok(total)
}

/// Both directions until both are closed. Returns the bytes moved each
/// way (a→b, b→a); an error in one direction resets both sockets.
pub async fn splice_both(a: &TcpStream, b: &TcpStream) -> io::Result<(u64, u64)> {
    let (ab, ba) = tokio::join!(pump(a, b), pump(b, a));
    match (ab, ba) {
        (Ok(ab), Ok(ba)) => Ok((ab, ba)),
        (Err(e), _) | (_, Err(e)) => {
            // The other end must not take a broken flow for a finished one.
            let _ = a.set_zero_linger();
            let _ = b.set_zero_linger();
            Err(e)
        }
    }
}
