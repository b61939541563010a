//! Profiles: a dialect of ISO 8583 described as data (TOML). A profile says how the MTI and
//! the bitmap are written, how numbers and length prefixes are encoded, where odd digit counts
//! put their pad nibble, how frames are built, which field carries the MAC and with which
//! algorithm, and every field's type and length.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;

/// The built-in CUPS POS dialect (spec section 3).
pub const CUPS_POS_TOML: &str = include_str!("../profiles/cups-pos.toml");

/// Most bytes a frame's length prefix may announce.
pub const FRAME_BYTES_MAX: usize = 65_535;

/// How the MTI is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MtiEncoding {
    /// 2 bytes of packed BCD (`02 00`).
    Bcd,
    /// 4 ASCII digits (`"0200"`).
    Ascii,
}

/// How the bitmaps are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BitmapEncoding {
    /// 8 bytes each.
    Binary,
    /// 16 hex ASCII characters each.
    Hex,
}

/// How digits (n fields, length prefixes) are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DigitEncoding {
    /// Packed BCD, two digits a byte.
    Bcd,
    /// One ASCII digit a byte.
    Ascii,
}

/// Where an odd digit count puts its pad nibble (packed BCD only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OddDigits {
    /// Right-aligned: a leading `0` nibble.
    Right,
    /// Left-aligned: a trailing `0` nibble.
    Left,
}

/// A field's data type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldType {
    /// Digits.
    N,
    /// Letters and digits (ASCII).
    An,
    /// Letters, digits and specials (ASCII).
    Ans,
    /// Raw bytes.
    B,
    /// Track data: digits and the `=` separator, packed as BCD with `D` for `=`.
    Z,
}

/// A field's length rule. For n and z fields the length counts digits; otherwise bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Length {
    Fixed(usize),
    /// A 2-digit length prefix, up to the maximum.
    LlVar(usize),
    /// A 3-digit length prefix, up to the maximum.
    LllVar(usize),
}

/// One field of a profile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldSpec {
    pub number: u8,
    pub name: String,
    pub kind: FieldType,
    pub length: Length,
}

/// How frames are built around a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LengthPrefix {
    /// 2 bytes, big-endian binary.
    Binary2,
    /// 4 ASCII digits.
    Ascii4,
}

/// The MAC algorithms a profile may name. The computation is the caller's (keys live in the
/// security module); this crate says which one and over which bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MacAlgorithm {
    /// The CUPS POS "ECB" MAC (spec 3.8), single-length key.
    CupsEcb,
    /// ANSI X9.9 DES CBC-MAC, single-length key.
    X9_9,
    /// ANSI X9.19 / ISO 9797-1 algorithm 3, double-length key.
    X9_19,
}

/// A dialect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Profile {
    pub name: String,
    pub length_prefix: LengthPrefix,
    /// Whether a 5-byte TPDU follows the length.
    pub tpdu: bool,
    /// Bytes of header after the TPDU.
    pub header_bytes: usize,
    pub mti: MtiEncoding,
    pub bitmap: BitmapEncoding,
    pub numeric: DigitEncoding,
    pub length_digits: DigitEncoding,
    pub odd_fixed: OddDigits,
    pub odd_variable: OddDigits,
    /// The field that carries the MAC (64 or 128), if the dialect MACs messages.
    pub mac_field: Option<u8>,
    pub mac_algorithm: Option<MacAlgorithm>,
    fields: Vec<Option<FieldSpec>>,
}

/// Why a profile was refused: the key and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProfileError(pub String);

impl fmt::Display for ProfileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid ISO 8583 profile: {}", self.0)
    }
}

impl std::error::Error for ProfileError {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    name: String,
    framing: RawFraming,
    message: RawMessage,
    mac: Option<RawMac>,
    fields: BTreeMap<String, RawField>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFraming {
    length: String,
    tpdu: bool,
    header_bytes: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMessage {
    mti: String,
    bitmap: String,
    numeric: String,
    length_prefix: String,
    odd_fixed: String,
    odd_variable: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMac {
    field: u8,
    algorithm: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawField {
    #[serde(rename = "type")]
    kind: String,
    fixed: Option<usize>,
    ll: Option<usize>,
    lll: Option<usize>,
    #[serde(default)]
    name: String,
}

fn choose<T: Copy>(key: &str, value: &str, options: &[(&str, T)]) -> Result<T, ProfileError> {
    options
        .iter()
        .find(|(name, _)| *name == value)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            ProfileError(format!(
                "{key} = {value:?}; expected one of {}",
                options
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
}

impl Profile {
    /// The built-in CUPS POS dialect.
    pub fn cups_pos() -> Profile {
        Profile::from_toml(CUPS_POS_TOML).expect("the built-in profile is valid")
    }

    /// Reads a profile; the error names the key and what is wrong with it.
    pub fn from_toml(text: &str) -> Result<Profile, ProfileError> {
        let raw: RawProfile = toml::from_str(text).map_err(|e| ProfileError(e.to_string()))?;
        let length_prefix = choose(
            "framing.length",
            &raw.framing.length,
            &[
                ("binary2", LengthPrefix::Binary2),
                ("ascii4", LengthPrefix::Ascii4),
            ],
        )?;
        if raw.framing.header_bytes > 64 {
            return Err(ProfileError(format!(
                "framing.header_bytes = {} is more than 64",
                raw.framing.header_bytes
            )));
        }
        let m = &raw.message;
        let mti = choose(
            "message.mti",
            &m.mti,
            &[("bcd", MtiEncoding::Bcd), ("ascii", MtiEncoding::Ascii)],
        )?;
        let bitmap = choose(
            "message.bitmap",
            &m.bitmap,
            &[
                ("binary", BitmapEncoding::Binary),
                ("hex", BitmapEncoding::Hex),
            ],
        )?;
        let digits = [("bcd", DigitEncoding::Bcd), ("ascii", DigitEncoding::Ascii)];
        let numeric = choose("message.numeric", &m.numeric, &digits)?;
        let length_digits = choose("message.length_prefix", &m.length_prefix, &digits)?;
        let odd = [("right", OddDigits::Right), ("left", OddDigits::Left)];
        let odd_fixed = choose("message.odd_fixed", &m.odd_fixed, &odd)?;
        let odd_variable = choose("message.odd_variable", &m.odd_variable, &odd)?;
        let mut fields: Vec<Option<FieldSpec>> = vec![None; 129];
        for (key, f) in &raw.fields {
            let number: u8 = key
                .parse()
                .ok()
                .filter(|n| (2..=128).contains(n))
                .ok_or_else(|| ProfileError(format!("fields.{key}: a field number is 2 to 128")))?;
            let kind = choose(
                &format!("fields.{key}.type"),
                &f.kind,
                &[
                    ("n", FieldType::N),
                    ("an", FieldType::An),
                    ("ans", FieldType::Ans),
                    ("b", FieldType::B),
                    ("z", FieldType::Z),
                ],
            )?;
            let length = match (f.fixed, f.ll, f.lll) {
                (Some(n), None, None) if n >= 1 => Length::Fixed(n),
                (None, Some(n), None) if (1..=99).contains(&n) => Length::LlVar(n),
                (None, None, Some(n)) if (1..=999).contains(&n) => Length::LllVar(n),
                _ => {
                    return Err(ProfileError(format!(
                        "fields.{key}: give exactly one of fixed (1 or more), ll (1 to 99) or \
                         lll (1 to 999)"
                    )));
                }
            };
            fields[usize::from(number)] = Some(FieldSpec {
                number,
                name: if f.name.is_empty() {
                    format!("field {number}")
                } else {
                    f.name.clone()
                },
                kind,
                length,
            });
        }
        let (mac_field, mac_algorithm) = match &raw.mac {
            None => (None, None),
            Some(mac) => {
                let algorithm = choose(
                    "mac.algorithm",
                    &mac.algorithm,
                    &[
                        ("cups-ecb", Some(MacAlgorithm::CupsEcb)),
                        ("x9.9", Some(MacAlgorithm::X9_9)),
                        ("x9.19", Some(MacAlgorithm::X9_19)),
                        ("none", None),
                    ],
                )?;
                if !matches!(mac.field, 64 | 128) {
                    return Err(ProfileError(format!(
                        "mac.field = {}; the MAC is field 64 or 128",
                        mac.field
                    )));
                }
                let spec = fields[usize::from(mac.field)].as_ref();
                if !matches!(
                    spec,
                    Some(FieldSpec {
                        kind: FieldType::B,
                        length: Length::Fixed(8),
                        ..
                    })
                ) {
                    return Err(ProfileError(format!(
                        "mac.field = {0}, but fields.{0} is not b with fixed = 8",
                        mac.field
                    )));
                }
                (algorithm.map(|_| mac.field), algorithm)
            }
        };
        Ok(Profile {
            name: raw.name,
            length_prefix,
            tpdu: raw.framing.tpdu,
            header_bytes: raw.framing.header_bytes,
            mti,
            bitmap,
            numeric,
            length_digits,
            odd_fixed,
            odd_variable,
            mac_field,
            mac_algorithm,
            fields,
        })
    }

    /// The field's description, if the profile has it.
    pub fn field(&self, number: u8) -> Option<&FieldSpec> {
        self.fields
            .get(usize::from(number))
            .and_then(Option::as_ref)
    }

    /// Every field the profile describes, in number order.
    pub fn fields(&self) -> impl Iterator<Item = &FieldSpec> {
        self.fields.iter().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_profile_reads() {
        let p = Profile::cups_pos();
        assert_eq!(p.mac_field, Some(64));
        assert_eq!(p.field(4).unwrap().length, Length::Fixed(12));
        assert_eq!(p.field(62).unwrap().length, Length::LllVar(512));
        assert!(p.field(5).is_none());
    }

    #[test]
    fn bad_profiles_say_which_key() {
        let bad = |from: &str, to: &str| {
            Profile::from_toml(&CUPS_POS_TOML.replace(from, to))
                .unwrap_err()
                .to_string()
        };
        assert!(bad("mti = \"bcd\"", "mti = \"ebcdic\"").contains("message.mti = \"ebcdic\""));
        assert!(
            bad(
                "4 = { type = \"n\", fixed = 12",
                "4 = { type = \"n\", ll = 12, fixed = 12"
            )
            .contains("fields.4")
        );
        assert!(bad("field = 64", "field = 63").contains("mac.field = 63"));
        assert!(bad("\n3 = { type = \"n\"", "\n3 = { type = \"x\"").contains("fields.3.type"));
        assert!(bad("header_bytes = 6", "header_bytes = 6\ncolour = 1").contains("colour"));
    }
}
