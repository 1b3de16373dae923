//! The TCP socket under a session's stream, for what tokio's streams do not offer: the receive
//! low-water mark, and reading what has arrived without waiting for the runtime to say so.
//!
//! A client answers each QoS 1 delivery with a PUBACK: 4 bytes, or a TLS record of 26 under TLS
//! 1.3. Read as they come, those answers wake the hub's thread once per delivery, as often as the
//! messages themselves. With `SO_RCVLOWAT` at the bytes of the answers a session is owed plus one,
//! the kernel wakes the hub only for something more: any other packet, or the connection ending.
//! The session reads the answers itself, with [`Socket::read_arrived`], before it next writes to
//! the client, or once they have waited a while.
//!
//! A client that sends something else while it still owes answers may leave the mark unreached
//! (TLS answers sharing a record take fewer bytes than counted); the session's wait bounds that.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// The most read at once: a client that sends faster is read again at its next wake-up.
const MOST_AT_ONCE: usize = 64 * 1024;

/// A PUBACK (or PUBREC, PUBREL, PUBCOMP): fixed header and packet id (MQTT 3.1.1 §3.4).
const ACK_BYTES: usize = 4;

/// What [`Socket::read_arrived`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrived {
    /// Bytes appended to the buffer.
    pub read: usize,
    /// The client closed the connection.
    pub closed: bool,
}

/// A session's stream: a TCP socket, or TLS over one.
pub trait Socket: AsyncRead + AsyncWrite + Unpin {
    /// The least bytes one acknowledgement from the client takes on the wire.
    fn ack_bytes(&self) -> usize;

    /// The TCP socket.
    fn fd(&self) -> RawFd;

    /// Appends to `buf` what the client has sent and the socket holds now, without waiting.
    fn read_arrived(&mut self, buf: &mut BytesMut) -> io::Result<Arrived>;

    /// Sets the bytes that must wait in the socket before the runtime is told it is readable
    /// (1: any). The end of the connection is told whatever the mark.
    fn set_low_water(&self, bytes: usize) -> io::Result<()> {
        let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        // SAFETY: the descriptor is the stream's own, open while `self` lives, and the option's
        // value is a c_int of the size given.
        let done = unsafe {
            libc::setsockopt(
                self.fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&raw const value).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        match done {
            0 => Ok(()),
            _ => Err(io::Error::last_os_error()),
        }
    }
}

/// Reads a socket without waiting: `Err(WouldBlock)` when nothing is there.
struct Now {
    fd: RawFd,
    /// A read returned less than asked: the socket held no more.
    emptied: bool,
}

impl Now {
    fn new(fd: RawFd) -> Now {
        Now { fd, emptied: false }
    }
}

impl Now {
    /// Receives at most `len` bytes at `at`, without waiting.
    ///
    /// # Safety
    /// `at` must be valid for writes of `len` bytes (initialised or not: only the kernel writes).
    unsafe fn recv(&mut self, at: *mut u8, len: usize) -> io::Result<usize> {
        loop {
            // SAFETY: the caller's promise for the buffer; the descriptor is open (see
            // `Socket::set_low_water`).
            let n = unsafe { libc::recv(self.fd, at.cast(), len, libc::MSG_DONTWAIT) };
            match usize::try_from(n) {
                Ok(n) => {
                    self.emptied = n < len;
                    return Ok(n);
                }
                Err(_) => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// Receives at most `most` bytes onto the end of `buf`, into its spare room as it is: no byte
    /// is zeroed first.
    fn recv_onto(&mut self, buf: &mut BytesMut, most: usize) -> io::Result<usize> {
        buf.reserve(most);
        let spare = buf.spare_capacity_mut();
        // SAFETY: `spare` is the buffer's own room past its length, at least `most` bytes.
        let n = unsafe { self.recv(spare.as_mut_ptr().cast(), most) }?;
        // SAFETY: the kernel wrote the first `n` bytes of that room.
        unsafe { buf.set_len(buf.len() + n) };
        Ok(n)
    }
}

impl Read for Now {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: the slice is valid for writes of its length.
        unsafe { self.recv(buf.as_mut_ptr(), buf.len()) }
    }
}

/// Reads from `from` (at most `CHUNK` bytes onto the end of the buffer at a time) until it has no
/// more (a read short of what was asked, or one that would block), it ends, or [`MOST_AT_ONCE`]
/// bytes.
fn read_onto(
    mut from: impl FnMut(&mut BytesMut, usize) -> io::Result<usize>,
    buf: &mut BytesMut,
    arrived: &mut Arrived,
) -> io::Result<()> {
    const CHUNK: usize = 1024;
    while arrived.read < MOST_AT_ONCE {
        match from(buf, CHUNK) {
            Ok(0) => {
                arrived.closed = true;
                break;
            }
            Ok(n) if n < CHUNK => {
                arrived.read += n;
                break;
            }
            Ok(n) => arrived.read += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads at most `most` bytes from `from` onto the end of `buf` (a `Read` wants its room zeroed).
fn read_zeroed(from: &mut impl Read, buf: &mut BytesMut, most: usize) -> io::Result<usize> {
    let start = buf.len();
    buf.resize(start + most, 0);
    let read = from.read(&mut buf[start..]);
    buf.truncate(start + *read.as_ref().unwrap_or(&0));
    read
}

impl Socket for TcpStream {
    fn ack_bytes(&self) -> usize {
        ACK_BYTES
    }

    fn fd(&self) -> RawFd {
        self.as_raw_fd()
    }

    fn read_arrived(&mut self, buf: &mut BytesMut) -> io::Result<Arrived> {
        let mut arrived = Arrived { read: 0, closed: false };
        let mut raw = Now::new(self.as_raw_fd());
        read_onto(|buf, most| raw.recv_onto(buf, most), buf, &mut arrived)?;
        Ok(arrived)
    }
}

impl Socket for tokio_rustls::server::TlsStream<TcpStream> {
    fn ack_bytes(&self) -> usize {
        match self.get_ref().1.protocol_version() {
            // Record header, the packet, its content type and the AEAD tag.
            Some(rustls::ProtocolVersion::TLSv1_3) => 5 + ACK_BYTES + 1 + 16,
            // The least of TLS 1.2's suites: ChaCha20-Poly1305, without an explicit nonce.
            _ => 5 + ACK_BYTES + 16,
        }
    }

    fn fd(&self) -> RawFd {
        self.get_ref().0.as_raw_fd()
    }

    fn read_arrived(&mut self, buf: &mut BytesMut) -> io::Result<Arrived> {
        let (tcp, tls) = self.get_mut();
        let mut raw = Now::new(tcp.as_raw_fd());
        let mut arrived = Arrived { read: 0, closed: false };
        // Plaintext out, records in, in turns (rustls holds a bounded amount of either), until the
        // socket has no more.
        loop {
            let plaintext = |buf: &mut BytesMut, most| read_zeroed(&mut tls.reader(), buf, most);
            read_onto(plaintext, buf, &mut arrived).or_else(|e| match e.kind() {
                // The client closed without close_notify; what it sent before is kept.
                io::ErrorKind::UnexpectedEof => {
                    arrived.closed = true;
                    Ok(())
                }
                _ => Err(e),
            })?;
            if arrived.closed || raw.emptied || arrived.read >= MOST_AT_ONCE {
                return Ok(arrived);
            }
            match tls.read_tls(&mut raw) {
                Ok(0) => arrived.closed = true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(arrived),
                Err(e) => return Err(e),
            }
            // A bad record ends the connection, as it would through the stream.
            if let Err(e) = tls.process_new_packets() {
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// Bytes the kernel holds for the socket to read.
    fn queued(fd: RawFd) -> usize {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one c_int.
        assert_eq!(unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) }, 0);
        usize::try_from(n).unwrap()
    }

    /// Whether poll(2) says the socket is readable now.
    fn readable(fd: RawFd) -> bool {
        let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        assert!(unsafe { libc::poll(&mut p, 1, 0) } >= 0);
        p.revents & libc::POLLIN != 0
    }

    async fn until_queued(fd: RawFd, n: usize) {
        while queued(fd) < n {
            tokio::task::yield_now().await;
        }
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        (listener.accept().await.unwrap().0, client)
    }

    #[tokio::test]
    async fn below_the_mark_nothing_is_readable_and_everything_can_be_read() {
        let (mut hub, mut client) = pair().await;
        hub.set_low_water(2 * ACK_BYTES + 1).unwrap();
        client.write_all(&[0x40, 2, 0, 1, 0x40, 2, 0, 2]).await.unwrap();
        until_queued(hub.fd(), 8).await;
        assert!(!readable(hub.fd()), "two answers owed: not readable");
        let mut buf = BytesMut::new();
        assert_eq!(hub.read_arrived(&mut buf).unwrap(), Arrived { read: 8, closed: false });
        assert_eq!(&buf[..], &[0x40, 2, 0, 1, 0x40, 2, 0, 2]);
        // Anything beyond the answers owed crosses the mark: a PINGREQ.
        client.write_all(&[0x40, 2, 0, 3, 0x40, 2, 0, 4, 0xc0, 0]).await.unwrap();
        until_queued(hub.fd(), 10).await;
        assert!(readable(hub.fd()));
        // Lowering the mark under what waits tells the runtime at once.
        hub.set_low_water(64).unwrap();
        assert!(!readable(hub.fd()));
        hub.set_low_water(1).unwrap();
        assert!(readable(hub.fd()));
        buf.clear();
        assert_eq!(hub.read_arrived(&mut buf).unwrap(), Arrived { read: 10, closed: false });
        assert_eq!(hub.read_arrived(&mut buf).unwrap(), Arrived { read: 0, closed: false });
    }

    #[tokio::test]
    async fn the_end_of_the_connection_is_told_whatever_the_mark() {
        let (mut hub, mut client) = pair().await;
        hub.set_low_water(1_000).unwrap();
        client.write_all(&[0x40, 2, 0, 1]).await.unwrap();
        drop(client);
        // The readiness wait resolves, with the answer still there to read.
        hub.readable().await.unwrap();
        let mut buf = BytesMut::new();
        assert_eq!(hub.read_arrived(&mut buf).unwrap(), Arrived { read: 4, closed: false });
        assert_eq!(hub.read_arrived(&mut buf).unwrap(), Arrived { read: 0, closed: true });
    }
}
