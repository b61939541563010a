//! Frames around messages, sans-IO: `length | TPDU | header | message` for the CUPS POS
//! dialect. [`split`] looks at the bytes received so far and says whether a whole frame is
//! there (it never parses a partial one); [`build`] makes one.

use crate::profile::{FRAME_BYTES_MAX, LengthPrefix, Profile};

/// One frame's parts, borrowed from the buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    /// `60` + destination (2) + source (2), when the profile has a TPDU.
    pub tpdu: Option<[u8; 5]>,
    pub header: &'a [u8],
    /// The message: MTI, bitmap(s), fields.
    pub message: &'a [u8],
}

impl Frame<'_> {
    /// The TPDU of an answer: destination and source swapped (spec 3.2).
    pub fn reply_tpdu(&self) -> Option<[u8; 5]> {
        self.tpdu.map(|t| [t[0], t[3], t[4], t[1], t[2]])
    }
}

/// Why bytes are not a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameError(pub String);

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "bad frame: {}", self.0)
    }
}

impl std::error::Error for FrameError {}

fn prefix_bytes(profile: &Profile) -> usize {
    match profile.length_prefix {
        LengthPrefix::Binary2 => 2,
        LengthPrefix::Ascii4 => 4,
    }
}

/// A whole frame at the start of `buf` and the bytes it takes, or `None` when more bytes are
/// needed. A length that cannot hold the TPDU and header, or is not a number, is an error:
/// the connection should be closed, since the stream cannot be resynchronised.
pub fn split<'a>(
    profile: &Profile,
    buf: &'a [u8],
) -> Result<Option<(Frame<'a>, usize)>, FrameError> {
    let p = prefix_bytes(profile);
    if buf.len() < p {
        return Ok(None);
    }
    let len = match profile.length_prefix {
        LengthPrefix::Binary2 => usize::from(u16::from_be_bytes([buf[0], buf[1]])),
        LengthPrefix::Ascii4 => std::str::from_utf8(&buf[..4])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                FrameError(format!(
                    "length {:?} is not 4 digits",
                    String::from_utf8_lossy(&buf[..4])
                ))
            })?,
    };
    let fixed = usize::from(profile.tpdu) * 5 + profile.header_bytes;
    if len < fixed + 2 {
        return Err(FrameError(format!(
            "length {len} cannot hold the TPDU, the header and an MTI ({} bytes at least)",
            fixed + 2
        )));
    }
    if buf.len() < p + len {
        return Ok(None);
    }
    let body = &buf[p..p + len];
    let (tpdu, rest) = if profile.tpdu {
        (
            Some(<[u8; 5]>::try_from(&body[..5]).expect("5 bytes")),
            &body[5..],
        )
    } else {
        (None, body)
    };
    let (header, message) = rest.split_at(profile.header_bytes);
    Ok(Some((
        Frame {
            tpdu,
            header,
            message,
        },
        p + len,
    )))
}

/// Builds a frame: length, TPDU, header, message.
pub fn build(
    profile: &Profile,
    tpdu: Option<[u8; 5]>,
    header: &[u8],
    message: &[u8],
) -> Result<Vec<u8>, FrameError> {
    if profile.tpdu != tpdu.is_some() {
        return Err(FrameError(format!(
            "the {} profile {} a TPDU",
            profile.name,
            if profile.tpdu { "needs" } else { "has no" }
        )));
    }
    if header.len() != profile.header_bytes {
        return Err(FrameError(format!(
            "the header is {} bytes; the {} profile's is {}",
            header.len(),
            profile.name,
            profile.header_bytes
        )));
    }
    let len = tpdu.map_or(0, |_| 5) + header.len() + message.len();
    let max = match profile.length_prefix {
        LengthPrefix::Binary2 => FRAME_BYTES_MAX,
        LengthPrefix::Ascii4 => 9_999,
    };
    if len > max {
        return Err(FrameError(format!(
            "{len} bytes; a frame holds at most {max}"
        )));
    }
    let mut out = Vec::with_capacity(prefix_bytes(profile) + len);
    match profile.length_prefix {
        LengthPrefix::Binary2 => out.extend_from_slice(&(len as u16).to_be_bytes()),
        LengthPrefix::Ascii4 => out.extend_from_slice(format!("{len:04}").as_bytes()),
    }
    if let Some(t) = tpdu {
        out.extend_from_slice(&t);
    }
    out.extend_from_slice(header);
    out.extend_from_slice(message);
    Ok(out)
}
