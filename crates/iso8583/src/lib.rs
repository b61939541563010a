//! ISO 8583 messages, sans-IO: a [`Profile`] (data, usually TOML) describes the dialect;
//! [`encode`] and [`decode`] turn a [`Message`] into bytes and back; [`frame`] finds complete
//! frames in a byte stream and builds them; [`mac_block`] gives the bytes a MAC covers and
//! [`encode_with_mac`] / [`verify_mac`] place and check it with a MAC function the caller
//! supplies (keys stay in the security module).
//!
//! Pure: no IO, no clock, no async; depends on nothing in the workspace.
//!
//! Invariants (tests in `tests/codec.rs`):
//! - `decode(encode(m)) == m` for every message the profile accepts (property test).
//! - Decoding never panics and never reads past its input; every error names the field, the
//!   byte offset and the reason.
//! - Values are checked against the profile when encoding: a value that does not fit its field
//!   is an error, never truncated.
//! - The CUPS POS profile decodes the real captured 0200 of spec 5.4 and its MAC verifies.

pub mod frame;
pub mod profile;

use std::fmt;

pub use profile::{
    BitmapEncoding, DigitEncoding, FieldSpec, FieldType, Length, MacAlgorithm, MtiEncoding,
    OddDigits, Profile, ProfileError,
};

/// One message: its type and its fields' values.
///
/// Values are logical: for n fields the ASCII digits (`b"000000001234"`), for z fields digits
/// and `=`, for an/ans fields the text's bytes, for b fields the raw bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Message {
    /// The message type indicator as four digits, e.g. `*b"0200"`.
    pub mti: [u8; 4],
    /// Sorted by field number.
    fields: Vec<(u8, Vec<u8>)>,
}

impl Message {
    pub fn new(mti: &str) -> Message {
        let mut m = [b'0'; 4];
        for (d, s) in m.iter_mut().zip(mti.bytes()) {
            *d = s;
        }
        Message {
            mti: m,
            fields: Vec::new(),
        }
    }

    pub fn mti_str(&self) -> &str {
        std::str::from_utf8(&self.mti).unwrap_or("????")
    }

    /// Sets a field (2 to 128); checked against the profile when encoding.
    pub fn set(&mut self, field: u8, value: impl Into<Vec<u8>>) -> &mut Message {
        let value = value.into();
        match self.fields.binary_search_by_key(&field, |(n, _)| *n) {
            Ok(i) => self.fields[i].1 = value,
            Err(i) => self.fields.insert(i, (field, value)),
        }
        self
    }

    pub fn with(mut self, field: u8, value: impl Into<Vec<u8>>) -> Message {
        self.set(field, value);
        self
    }

    pub fn remove(&mut self, field: u8) -> Option<Vec<u8>> {
        match self.fields.binary_search_by_key(&field, |(n, _)| *n) {
            Ok(i) => Some(self.fields.remove(i).1),
            Err(_) => None,
        }
    }

    pub fn get(&self, field: u8) -> Option<&[u8]> {
        self.fields
            .binary_search_by_key(&field, |(n, _)| *n)
            .ok()
            .map(|i| self.fields[i].1.as_slice())
    }

    /// A text field's value as text (n, an, ans, z).
    pub fn text(&self, field: u8) -> Option<&str> {
        self.get(field).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The fields present, in order.
    pub fn fields(&self) -> impl Iterator<Item = (u8, &[u8])> {
        self.fields.iter().map(|(k, v)| (*k, v.as_slice()))
    }

    fn last_field(&self) -> Option<u8> {
        self.fields.last().map(|(n, _)| *n)
    }
}

/// Why bytes are not a message of the profile: where, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeError {
    /// The field being read, if the error is inside one (0: the MTI, 1: the bitmaps).
    pub field: Option<u8>,
    /// Byte offset in the message (from the MTI).
    pub offset: usize,
    pub reason: String,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.field {
            Some(0) => write!(f, "MTI at byte {}: {}", self.offset, self.reason),
            Some(1) => write!(f, "bitmap at byte {}: {}", self.offset, self.reason),
            Some(n) => write!(f, "field {n} at byte {}: {}", self.offset, self.reason),
            None => write!(f, "at byte {}: {}", self.offset, self.reason),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Why a message cannot be encoded with the profile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodeError {
    pub field: Option<u8>,
    pub reason: String,
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.field {
            Some(n) => write!(f, "field {n}: {}", self.reason),
            None => f.write_str(&self.reason),
        }
    }
}

impl std::error::Error for EncodeError {}

fn enc_err(field: u8, reason: impl Into<String>) -> EncodeError {
    EncodeError {
        field: Some(field),
        reason: reason.into(),
    }
}

/// Packs digits (and `=` as `D` for track data) into BCD nibbles.
fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'=' | b'D' | b'd' => Some(0xD),
        _ => None,
    }
}

fn pack_bcd(digits: &[u8], odd: OddDigits, out: &mut Vec<u8>) {
    let lead = digits.len() % 2 == 1 && odd == OddDigits::Right;
    let mut it = digits.iter().map(|&c| nibble(c).unwrap_or(0));
    if lead {
        out.push(it.next().unwrap_or(0));
    }
    while let Some(hi) = it.next() {
        out.push((hi << 4) | it.next().unwrap_or(0));
    }
}

fn unpack_bcd(bytes: &[u8], digits: usize, odd: OddDigits, track: bool) -> Result<Vec<u8>, String> {
    let skip = usize::from(digits % 2 == 1 && odd == OddDigits::Right);
    let mut out = Vec::with_capacity(digits);
    for i in skip..skip + digits {
        let b = bytes[i / 2];
        let n = if i % 2 == 0 { b >> 4 } else { b & 0xF };
        out.push(match n {
            0..=9 => b'0' + n,
            0xD if track => b'=',
            _ => return Err(format!("nibble {n:X} is not a digit")),
        });
    }
    Ok(out)
}

/// The byte length of `count` units of a field (digits for n/z packed as BCD).
fn data_bytes(profile: &Profile, kind: FieldType, count: usize) -> usize {
    match kind {
        FieldType::N if profile.numeric == DigitEncoding::Ascii => count,
        FieldType::N | FieldType::Z => count.div_ceil(2),
        _ => count,
    }
}

fn write_length(profile: &Profile, digits: usize, value: usize, out: &mut Vec<u8>) {
    let mut text = [b'0'; 3];
    let mut v = value;
    for d in text[..digits].iter_mut().rev() {
        *d = b'0' + (v % 10) as u8;
        v /= 10;
    }
    match profile.length_digits {
        DigitEncoding::Ascii => out.extend_from_slice(&text[..digits]),
        DigitEncoding::Bcd => pack_bcd(&text[..digits], OddDigits::Right, out),
    }
}

fn encode_field(
    profile: &Profile,
    spec: &FieldSpec,
    value: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    let n = spec.number;
    let check_chars = |ok: fn(u8) -> bool, what: &str| -> Result<(), EncodeError> {
        match value.iter().position(|&c| !ok(c)) {
            Some(i) => Err(enc_err(
                n,
                format!("byte {i} ({:#04x}) is not {what}", value[i]),
            )),
            None => Ok(()),
        }
    };
    match spec.kind {
        FieldType::N => check_chars(|c| c.is_ascii_digit(), "a digit")?,
        FieldType::Z => check_chars(|c| c.is_ascii_digit() || c == b'=', "a digit or =")?,
        FieldType::An => check_chars(
            |c| c.is_ascii_alphanumeric() || c == b' ',
            "a letter or digit",
        )?,
        FieldType::Ans => check_chars(|c| (0x20..0x7f).contains(&c), "printable ASCII")?,
        FieldType::B => {}
    }
    let (count, odd) = match spec.length {
        Length::Fixed(len) => {
            if value.len() > len {
                return Err(enc_err(
                    n,
                    format!("{} long; the field holds {len}", value.len()),
                ));
            }
            if value.len() < len
                && !matches!(spec.kind, FieldType::N | FieldType::An | FieldType::Ans)
            {
                return Err(enc_err(
                    n,
                    format!("{} long; the field is exactly {len}", value.len()),
                ));
            }
            (len, profile.odd_fixed)
        }
        Length::LlVar(max) | Length::LllVar(max) => {
            if value.len() > max {
                return Err(enc_err(n, format!("{} long; at most {max}", value.len())));
            }
            let digits = if matches!(spec.length, Length::LlVar(_)) {
                2
            } else {
                3
            };
            write_length(profile, digits, value.len(), out);
            (value.len(), profile.odd_variable)
        }
    };
    match spec.kind {
        FieldType::N if value.len() == count => match profile.numeric {
            DigitEncoding::Ascii => out.extend_from_slice(value),
            DigitEncoding::Bcd => pack_bcd(value, odd, out),
        },
        FieldType::N => {
            // Fixed numbers shorter than the field are right-justified with zeros.
            let mut digits = vec![b'0'; count - value.len()];
            digits.extend_from_slice(value);
            match profile.numeric {
                DigitEncoding::Ascii => out.extend_from_slice(&digits),
                DigitEncoding::Bcd => pack_bcd(&digits, odd, out),
            }
        }
        FieldType::Z => pack_bcd(value, odd, out),
        FieldType::An | FieldType::Ans => {
            out.extend_from_slice(value);
            out.resize(out.len() + (count - value.len()), b' ');
        }
        FieldType::B => out.extend_from_slice(value),
    }
    Ok(())
}

/// Encodes the MTI, the bitmap(s) and the fields: the message without its frame.
pub fn encode(profile: &Profile, message: &Message) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::with_capacity(256);
    encode_into(profile, message, &mut out)?;
    Ok(out)
}

/// [`encode`] into a buffer (appended), for callers that reuse one.
pub fn encode_into(
    profile: &Profile,
    message: &Message,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    encode_with(profile, message, None, out)
}

/// Encodes `message` plus, when given, one more field after all of its fields (the MAC).
fn encode_with(
    profile: &Profile,
    message: &Message,
    extra: Option<(u8, &[u8])>,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    if !message.mti.iter().all(u8::is_ascii_digit) {
        return Err(EncodeError {
            field: Some(0),
            reason: format!("MTI {:?} is not four digits", message.mti_str()),
        });
    }
    match profile.mti {
        MtiEncoding::Ascii => out.extend_from_slice(&message.mti),
        MtiEncoding::Bcd => pack_bcd(&message.mti, OddDigits::Right, out),
    }
    let mut bitmap = [0u8; 16];
    let mut secondary = false;
    let extra_field = extra.map(|(n, _)| n);
    for n in message.fields.iter().map(|(n, _)| *n).chain(extra_field) {
        if !(2..=128).contains(&n) {
            return Err(enc_err(n, "field numbers are 2 to 128"));
        }
        if profile.field(n).is_none() {
            return Err(enc_err(
                n,
                format!("the {} profile has no field {n}", profile.name),
            ));
        }
        let i = usize::from(n - 1);
        bitmap[i / 8] |= 0x80 >> (i % 8);
        secondary |= n > 64;
    }
    if secondary {
        bitmap[0] |= 0x80;
    }
    let bitmap = if secondary { &bitmap[..] } else { &bitmap[..8] };
    match profile.bitmap {
        BitmapEncoding::Binary => out.extend_from_slice(bitmap),
        BitmapEncoding::Hex => {
            for b in bitmap {
                out.extend_from_slice(format!("{b:02X}").as_bytes());
            }
        }
    }
    for (n, value) in message
        .fields
        .iter()
        .map(|(n, v)| (*n, v.as_slice()))
        .chain(extra)
    {
        let spec = profile.field(n).expect("checked above");
        encode_field(profile, spec, value, out)?;
    }
    Ok(())
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: Option<u8>, what: &str) -> Result<&'a [u8], DecodeError> {
        let left = self.bytes.len() - self.at;
        if n > left {
            return Err(DecodeError {
                field,
                offset: self.at,
                reason: format!("{what} needs {n} bytes, {left} left"),
            });
        }
        let s = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
}

fn read_digits(
    profile: &Profile,
    r: &mut Reader<'_>,
    field: u8,
    digits: usize,
) -> Result<usize, DecodeError> {
    let at = r.at;
    let text = match profile.length_digits {
        DigitEncoding::Ascii => r.take(digits, Some(field), "the length prefix")?.to_vec(),
        DigitEncoding::Bcd => {
            let raw = r.take(digits.div_ceil(2), Some(field), "the length prefix")?;
            unpack_bcd(raw, digits, OddDigits::Right, false).map_err(|reason| DecodeError {
                field: Some(field),
                offset: at,
                reason: format!("length prefix: {reason}"),
            })?
        }
    };
    std::str::from_utf8(&text)
        .ok()
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| DecodeError {
            field: Some(field),
            offset: at,
            reason: format!(
                "length prefix {:?} is not a number",
                String::from_utf8_lossy(&text)
            ),
        })
}

fn decode_field(
    profile: &Profile,
    spec: &FieldSpec,
    r: &mut Reader<'_>,
) -> Result<Vec<u8>, DecodeError> {
    let n = spec.number;
    let start = r.at;
    let (count, odd) = match spec.length {
        Length::Fixed(len) => (len, profile.odd_fixed),
        Length::LlVar(max) | Length::LllVar(max) => {
            let digits = if matches!(spec.length, Length::LlVar(_)) {
                2
            } else {
                3
            };
            let len = read_digits(profile, r, n, digits)?;
            if len > max {
                return Err(DecodeError {
                    field: Some(n),
                    offset: start,
                    reason: format!("length {len} is more than the field's {max}"),
                });
            }
            (len, profile.odd_variable)
        }
    };
    let at = r.at;
    let raw = r.take(data_bytes(profile, spec.kind, count), Some(n), "the value")?;
    let bad = |reason: String| DecodeError {
        field: Some(n),
        offset: at,
        reason,
    };
    match spec.kind {
        FieldType::N if profile.numeric == DigitEncoding::Ascii => {
            if let Some(i) = raw.iter().position(|c| !c.is_ascii_digit()) {
                return Err(bad(format!("byte {i} ({:#04x}) is not a digit", raw[i])));
            }
            Ok(raw.to_vec())
        }
        FieldType::N => unpack_bcd(raw, count, odd, false).map_err(bad),
        FieldType::Z => unpack_bcd(raw, count, odd, true).map_err(bad),
        FieldType::An | FieldType::Ans | FieldType::B => Ok(raw.to_vec()),
    }
}

/// Decodes a message (MTI, bitmaps, fields) that fills `bytes` exactly.
pub fn decode(profile: &Profile, bytes: &[u8]) -> Result<Message, DecodeError> {
    let mut r = Reader { bytes, at: 0 };
    let mti: [u8; 4] = match profile.mti {
        MtiEncoding::Ascii => {
            let raw = r.take(4, Some(0), "the MTI")?;
            raw.try_into().expect("4 bytes")
        }
        MtiEncoding::Bcd => {
            let raw = r.take(2, Some(0), "the MTI")?;
            unpack_bcd(raw, 4, OddDigits::Right, false)
                .map_err(|reason| DecodeError {
                    field: Some(0),
                    offset: 0,
                    reason,
                })?
                .try_into()
                .expect("4 digits")
        }
    };
    if !mti.iter().all(u8::is_ascii_digit) {
        return Err(DecodeError {
            field: Some(0),
            offset: 0,
            reason: format!("MTI {:?} is not four digits", String::from_utf8_lossy(&mti)),
        });
    }
    let read_bitmap = |r: &mut Reader<'_>| -> Result<[u8; 8], DecodeError> {
        let at = r.at;
        match profile.bitmap {
            BitmapEncoding::Binary => Ok(r.take(8, Some(1), "the bitmap")?.try_into().expect("8")),
            BitmapEncoding::Hex => {
                let text = r.take(16, Some(1), "the bitmap")?;
                let mut out = [0u8; 8];
                for (i, pair) in text.chunks(2).enumerate() {
                    let s = std::str::from_utf8(pair).ok();
                    out[i] = s
                        .and_then(|s| u8::from_str_radix(s, 16).ok())
                        .ok_or_else(|| DecodeError {
                            field: Some(1),
                            offset: at + 2 * i,
                            reason: "not hexadecimal".into(),
                        })?;
                }
                Ok(out)
            }
        }
    };
    let mut bitmap = [0u8; 16];
    bitmap[..8].copy_from_slice(&read_bitmap(&mut r)?);
    if bitmap[0] & 0x80 != 0 {
        bitmap[8..].copy_from_slice(&read_bitmap(&mut r)?);
    }
    let mut message = Message {
        mti,
        fields: Vec::with_capacity(16),
    };
    for n in 2..=128u8 {
        let i = usize::from(n - 1);
        if bitmap[i / 8] & (0x80 >> (i % 8)) == 0 {
            continue;
        }
        let spec = profile.field(n).ok_or_else(|| DecodeError {
            field: Some(n),
            offset: r.at,
            reason: format!(
                "the bitmap has field {n}, which the {} profile does not describe",
                profile.name
            ),
        })?;
        let value = decode_field(profile, spec, &mut r)?;
        message.fields.push((n, value));
    }
    if r.at != bytes.len() {
        return Err(DecodeError {
            field: None,
            offset: r.at,
            reason: format!("{} bytes after the last field", bytes.len() - r.at),
        });
    }
    Ok(message)
}

/// The bytes the MAC covers in an encoded message that ends with its MAC field: from the MTI
/// up to the MAC field (spec 3.8). An error if the profile has no MAC or the message does not
/// end with one.
pub fn mac_block<'a>(profile: &Profile, encoded: &'a [u8]) -> Result<&'a [u8], DecodeError> {
    let field = profile.mac_field.ok_or_else(|| DecodeError {
        field: None,
        offset: 0,
        reason: format!("the {} profile has no MAC", profile.name),
    })?;
    let message = decode(profile, encoded)?;
    match message.last_field() {
        Some(last) if last == field => Ok(&encoded[..encoded.len() - 8]),
        _ => Err(DecodeError {
            field: Some(field),
            offset: encoded.len(),
            reason: "the message does not end with its MAC field".into(),
        }),
    }
}

/// Encodes `message` with its MAC: the MAC field is added after the message's fields (any
/// value the message has for it is ignored), and `mac` is given the profile's algorithm and
/// the bytes the MAC covers and returns the 8 bytes to put there.
pub fn encode_with_mac(
    profile: &Profile,
    message: &Message,
    mac: impl FnOnce(MacAlgorithm, &[u8]) -> [u8; 8],
) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::with_capacity(256);
    encode_with_mac_into(profile, message, mac, &mut out)?;
    Ok(out)
}

/// [`encode_with_mac`] into a buffer (appended).
pub fn encode_with_mac_into(
    profile: &Profile,
    message: &Message,
    mac: impl FnOnce(MacAlgorithm, &[u8]) -> [u8; 8],
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    let (Some(field), Some(algorithm)) = (profile.mac_field, profile.mac_algorithm) else {
        return Err(EncodeError {
            field: None,
            reason: format!("the {} profile has no MAC", profile.name),
        });
    };
    if message.fields.iter().any(|(n, _)| *n > field) {
        return Err(enc_err(field, "a field after the MAC field is set"));
    }
    let start = out.len();
    if message.get(field).is_some() {
        let mut m = message.clone();
        m.remove(field);
        encode_with(profile, &m, Some((field, &[0u8; 8])), out)?;
    } else {
        encode_with(profile, message, Some((field, &[0u8; 8])), out)?;
    }
    let end = out.len() - 8;
    let code = mac(algorithm, &out[start..end]);
    out[end..].copy_from_slice(&code);
    Ok(())
}

/// What [`decode_verified`] found of the MAC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MacCheck {
    Valid,
    Invalid,
    /// The message has no MAC field (or does not end with it).
    Absent,
}

/// Decodes a message and checks its MAC in one pass: `mac` is called only when the message
/// ends with the profile's MAC field. All 8 bytes are compared, with no early exit.
pub fn decode_verified(
    profile: &Profile,
    encoded: &[u8],
    mac: impl FnOnce(MacAlgorithm, &[u8]) -> [u8; 8],
) -> Result<(Message, MacCheck), DecodeError> {
    let message = decode(profile, encoded)?;
    let check = match (profile.mac_field, profile.mac_algorithm) {
        (Some(field), Some(algorithm)) if message.last_field() == Some(field) => {
            let end = encoded.len() - 8;
            let expected = mac(algorithm, &encoded[..end]);
            let diff = expected
                .iter()
                .zip(&encoded[end..])
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if diff == 0 {
                MacCheck::Valid
            } else {
                MacCheck::Invalid
            }
        }
        _ => MacCheck::Absent,
    };
    Ok((message, check))
}

/// Checks the MAC of an encoded message with `mac`. An error if the message does not decode
/// or does not end with its MAC field.
pub fn verify_mac(
    profile: &Profile,
    encoded: &[u8],
    mac: impl FnOnce(MacAlgorithm, &[u8]) -> [u8; 8],
) -> Result<bool, DecodeError> {
    match decode_verified(profile, encoded, mac)? {
        (_, MacCheck::Valid) => Ok(true),
        (_, MacCheck::Invalid) => Ok(false),
        (_, MacCheck::Absent) => Err(DecodeError {
            field: profile.mac_field,
            offset: encoded.len(),
            reason: "the message does not end with its MAC field".into(),
        }),
    }
}
