//! The small binary format the software card and PSAM save their state in: a magic, a
//! version byte, fields in a fixed order, and a CRC-32 over everything before it.
//!
//! The CRC catches a truncated or damaged file; it is not a security measure (whoever can
//! write the file can recompute it, as whoever holds a real card's EEPROM could).

use std::fmt;

use zeroize::Zeroizing;

/// Why saved state bytes were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateError {
    /// The bytes end before the state does.
    Truncated,
    /// The bytes do not start with the expected magic: not a state of this kind.
    BadMagic,
    /// A version this code does not read.
    UnsupportedVersion(u8),
    /// The CRC-32 does not match: the bytes were damaged.
    ChecksumMismatch,
    /// Bytes are left after the state.
    TrailingBytes,
    /// A field holds a value the state cannot have.
    Invalid(&'static str),
}

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateError::Truncated => f.write_str("state is truncated"),
            StateError::BadMagic => f.write_str("not a saved state of this kind"),
            StateError::UnsupportedVersion(v) => write!(f, "unsupported state version {v}"),
            StateError::ChecksumMismatch => f.write_str("state checksum mismatch"),
            StateError::TrailingBytes => f.write_str("bytes after the end of the state"),
            StateError::Invalid(what) => write!(f, "invalid state: {what}"),
        }
    }
}

impl std::error::Error for StateError {}

/// Builds a saved state. The buffer zeroises on drop because states hold keys.
pub(crate) struct Writer {
    buf: Zeroizing<Vec<u8>>,
}

impl Writer {
    pub(crate) fn new(magic: &[u8; 4], version: u8) -> Writer {
        let mut buf = Zeroizing::new(Vec::with_capacity(1024));
        buf.extend_from_slice(magic);
        buf.push(version);
        Writer { buf }
    }

    pub(crate) fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }

    pub(crate) fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }

    pub(crate) fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }

    pub(crate) fn bytes(&mut self, v: &[u8]) {
        self.buf.extend_from_slice(v);
    }

    pub(crate) fn finish(mut self) -> Zeroizing<Vec<u8>> {
        let crc = crc32(&self.buf);
        self.buf.extend_from_slice(&crc.to_be_bytes());
        self.buf
    }
}

/// Reads a saved state after checking magic, version and checksum.
pub(crate) struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Checks the envelope and returns a reader over the fields.
    pub(crate) fn open(bytes: &'a [u8], magic: &[u8; 4], version: u8) -> Result<Self, StateError> {
        if !bytes.starts_with(&magic[..bytes.len().min(magic.len())]) {
            return Err(StateError::BadMagic);
        }
        // Magic, version, CRC: the shortest possible state.
        if bytes.len() < magic.len() + 1 + 4 {
            return Err(StateError::Truncated);
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        let crc: [u8; 4] = crc.try_into().expect("4 bytes");
        let found = body[magic.len()];
        let fields = &body[magic.len() + 1..];
        if found != version {
            return Err(StateError::UnsupportedVersion(found));
        }
        if crc32(body) != u32::from_be_bytes(crc) {
            return Err(StateError::ChecksumMismatch);
        }
        Ok(Reader { rest: fields })
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], StateError> {
        let (head, tail) = self
            .rest
            .split_first_chunk::<N>()
            .ok_or(StateError::Truncated)?;
        self.rest = tail;
        Ok(*head)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, StateError> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, StateError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, StateError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub(crate) fn finish(self) -> Result<(), StateError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(StateError::TrailingBytes)
        }
    }
}

/// CRC-32 (IEEE 802.3, reflected, as in zip and PNG), bit by bit: states are small.
pub(crate) fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_check_value() {
        // The standard check value of CRC-32/ISO-HDLC.
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn envelope_round_trip_and_damage() {
        let mut w = Writer::new(b"TEST", 1);
        w.u16(0x1234);
        w.bytes(b"abc");
        let bytes = w.finish();
        let mut r = Reader::open(&bytes, b"TEST", 1).unwrap();
        assert_eq!(r.u16().unwrap(), 0x1234);
        assert_eq!(&r.array::<3>().unwrap(), b"abc");
        r.finish().unwrap();

        let mut damaged = bytes.to_vec();
        damaged[6] ^= 1;
        assert_eq!(
            Reader::open(&damaged, b"TEST", 1).err(),
            Some(StateError::ChecksumMismatch)
        );
        assert_eq!(
            Reader::open(&bytes, b"TEST", 2).err(),
            Some(StateError::UnsupportedVersion(1))
        );
        assert_eq!(
            Reader::open(&bytes, b"NOPE", 1).err(),
            Some(StateError::BadMagic)
        );
        assert_eq!(
            Reader::open(&bytes[..3], b"TEST", 1).err(),
            Some(StateError::Truncated)
        );
    }
}
