//! Card and terminal cryptography on RustCrypto block ciphers: key wrappers, MAC modes, PBOC
//! purse keys and MACs, PIN blocks.
//!
//! Nothing here is a hand-written block cipher: DES, 3DES and SM4 come from the `des` and
//! `sm4` crates. What is ours are the modes (CBC-MAC with PBOC padding, retail MAC, the CUPS
//! "ECB" MAC), the PBOC key hierarchy and the byte layouts of MAC inputs. MACs received from
//! outside are compared in constant time ([`Mac4::verify`], [`mac_eq`]).

mod keys;
mod mac;
mod pboc;
mod pin;

pub use keys::{DesKey, KeyLengthError, Sm4Key, Tdes2Key};
pub use mac::{
    Mac4, cups_ecb_mac, mac_eq, pboc_mac_des, pboc_mac_sm4, pboc_mac_tdes, tdes_cbc_mac, x9_9_mac,
    x9_19_mac,
};
pub use pboc::{
    MacKey, PbocMac, PreparedMacKey, PreparedPurseKey, PurseAlgorithm, PurseKey, load_mac1,
    load_mac2, load_tac, purchase_mac1, purchase_mac2, purchase_tac,
};
pub use pin::{
    PAN_DIGITS_MAX, PAN_DIGITS_MIN, PIN_DIGITS_MAX, PIN_DIGITS_MIN, Pin, PinBlock, PinError,
};
