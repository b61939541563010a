//! The vsmartcard virtual reader protocol: a software card plugged into pcsc-lite.
//!
//! pcscd, with the vsmartcard-vpcd driver, listens on TCP port [`VPCD_PORT`] for a virtual
//! card. The card connects and then answers what the driver sends. Every message, either way,
//! is a 2-byte big-endian length and that many bytes. A 1-byte message from the driver is a
//! control: `00` power off, `01` power on, `02` reset, `04` "send your ATR" (answered with the
//! ATR). Any longer message is a command APDU, answered with the response APDU.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use card::random::RandomSource;
use card::soft_card::SoftCard;

/// The port the vpcd driver listens on for its first virtual reader.
pub const VPCD_PORT: u16 = 35963;
/// How often a served card looks at its stop flag while the driver is silent.
pub const STOP_POLL_MS: u64 = 100;
/// Longest message accepted from the driver: a short APDU is at most 261 bytes.
pub const MESSAGE_BYTES_MAX: usize = 261;

const POWER_OFF: u8 = 0x00;
const POWER_ON: u8 = 0x01;
const RESET: u8 = 0x02;
const GET_ATR: u8 = 0x04;

/// Connects to the vpcd driver at `addr`, retrying for up to `wait` while pcscd starts.
pub fn connect(addr: SocketAddr, wait: Duration) -> io::Result<TcpStream> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            Ok(s) => return Ok(s),
            Err(e) if std::time::Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Answers the driver for `card` until `stop` is set, the driver closes the connection, or the
/// card loses power mid-command (a tear: the driver then sees the card vanish). Returns the
/// number of APDUs answered.
///
/// `persist` runs after each command and *before* its response is sent: a terminal never holds
/// a response (a TAC, a new balance) that the saved card does not. If it fails, the response
/// is not sent and serving stops with that error.
pub fn serve(
    card: &mut SoftCard,
    rng: &mut dyn RandomSource,
    mut stream: TcpStream,
    stop: &AtomicBool,
    mut persist: impl FnMut(&SoftCard) -> io::Result<()>,
) -> io::Result<u64> {
    stream.set_read_timeout(Some(Duration::from_millis(STOP_POLL_MS)))?;
    stream.set_nodelay(true)?;
    let mut answered = 0;
    loop {
        let Some(message) = read_message(&mut stream, stop)? else {
            return Ok(answered);
        };
        match message.as_slice() {
            [POWER_OFF] | [POWER_ON] | [RESET] => card.reset(),
            [GET_ATR] => write_message(&mut stream, card.atr())?,
            [other] => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unknown vpcd control byte {other:02X}"),
                ));
            }
            apdu => match card.transmit(apdu, rng) {
                Ok(response) => {
                    persist(card)?;
                    write_message(&mut stream, &response.to_bytes())?;
                    answered += 1;
                }
                Err(_torn) => {
                    persist(card)?;
                    return Ok(answered);
                }
            },
        }
    }
}

/// Reads one message; `None` when the driver closed the connection or `stop` was set.
fn read_message(stream: &mut TcpStream, stop: &AtomicBool) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    if !read_exact_or_stop(stream, &mut len, stop)? {
        return Ok(None);
    }
    let len = usize::from(u16::from_be_bytes(len));
    if len == 0 || len > MESSAGE_BYTES_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("vpcd message of {len} bytes (1 to {MESSAGE_BYTES_MAX} expected)"),
        ));
    }
    let mut body = vec![0u8; len];
    if !read_exact_or_stop(stream, &mut body, stop)? {
        return Ok(None);
    }
    Ok(Some(body))
}

/// Fills `buf`; false if the peer closed first or `stop` was set while waiting.
fn read_exact_or_stop(
    stream: &mut TcpStream,
    buf: &mut [u8],
    stop: &AtomicBool,
) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        if stop.load(Ordering::Relaxed) {
            return Ok(false);
        }
        match stream.read(&mut buf[filled..]) {
            Ok(0) => return Ok(false),
            Ok(n) => filled += n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn write_message(stream: &mut TcpStream, body: &[u8]) -> io::Result<()> {
    let len = u16::try_from(body.len()).expect("responses are short");
    let mut out = Vec::with_capacity(2 + body.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body);
    stream.write_all(&out)
}
