//! The security module: every card and bank master key lives behind [`SecurityModule`].
//!
//! The software implementation keeps master keys in the database wrapped (RFC 3394 AES key
//! wrap) under a key-encryption key (KEK) that is read from a file or an environment variable
//! and is never stored in the database. Keys are unwrapped into memory when the module opens,
//! zeroised when it is dropped, and never printed: `Debug` shows kinds, versions and check
//! values only. A hardware module can replace it behind the same trait.
//!
//! Keys have versions. A new version ("rotation") is added beside the old ones, so cards
//! personalised under an old version keep working; new cards use the newest.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;
use std::sync::Mutex;

use aes_kw::{KeyInit, KwAes256};
use anyhow::Context as _;
use card::crypto::{
    DesKey, Mac4, PreparedMacKey, PreparedPurseKey, PurseAlgorithm, PurseKey, Tdes2Key, load_mac1,
    load_mac2, load_tac, purchase_tac,
};
use card::purse::{Asn, TerminalId, TxDateTime, TxType};
use ledger::Timestamp;
use store::{Store, WrappedKey};
use zeroize::Zeroizing;

/// What a master key is for. The codes are stored: never renumber.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KeyKind {
    /// Master load key (MLK): cards' DLK, for MAC2 of loads.
    Load = 1,
    /// Master purchase key (MPK): cards' DPK; also loaded into PSAMs.
    Purchase = 2,
    /// Master TAC key (MTK): cards' DTK, for TAC checks of uploaded records.
    Tac = 3,
    /// Terminal master key (TMK): wraps terminals' daily PIN and MAC keys.
    TerminalMaster = 4,
    /// Bank master key (BMK): wraps a bank link's daily working keys.
    BankMaster = 5,
}

impl KeyKind {
    pub const ALL: [KeyKind; 5] = [
        KeyKind::Load,
        KeyKind::Purchase,
        KeyKind::Tac,
        KeyKind::TerminalMaster,
        KeyKind::BankMaster,
    ];

    pub const fn code(self) -> i16 {
        self as i16
    }

    pub fn from_code(code: i16) -> Option<KeyKind> {
        KeyKind::ALL.into_iter().find(|k| k.code() == code)
    }

    pub const fn name(self) -> &'static str {
        match self {
            KeyKind::Load => "load",
            KeyKind::Purchase => "purchase",
            KeyKind::Tac => "tac",
            KeyKind::TerminalMaster => "terminal-master",
            KeyKind::BankMaster => "bank-master",
        }
    }

    /// Card keys follow the purse algorithm chosen at the ceremony; terminal and bank master
    /// keys are 3DES, as the ISO 8583 profiles use them.
    const fn is_card_key(self) -> bool {
        matches!(self, KeyKind::Load | KeyKind::Purchase | KeyKind::Tac)
    }
}

impl std::str::FromStr for KeyKind {
    type Err = String;

    fn from_str(s: &str) -> Result<KeyKind, String> {
        KeyKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = KeyKind::ALL.iter().map(|k| k.name()).collect();
                format!(
                    "unknown key kind {s:?}: expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// Bytes in a key-encryption key (AES-256).
pub const KEK_BYTES: usize = 32;

/// The key-encryption key. Read from a file or an environment variable as 64 hex digits;
/// never stored in the database, never printed.
pub struct Kek(Zeroizing<[u8; KEK_BYTES]>);

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Kek(<redacted>)")
    }
}

impl Kek {
    /// Parses 64 hex digits (surrounding whitespace allowed). The error never repeats the text.
    pub fn from_hex(text: &str, source: &str) -> anyhow::Result<Kek> {
        let t = text.trim();
        anyhow::ensure!(
            t.len() == 2 * KEK_BYTES && t.bytes().all(|b| b.is_ascii_hexdigit()),
            "the key-encryption key from {source} must be {} hex digits (got {} characters)",
            2 * KEK_BYTES,
            t.len()
        );
        let mut bytes = Zeroizing::new([0u8; KEK_BYTES]);
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&t[2 * i..2 * i + 2], 16).expect("checked hex");
        }
        Ok(Kek(bytes))
    }

    /// Reads the KEK from `file` if given, else from the `ONECARD_KEK` value if given.
    pub fn load(file: Option<&Path>, env_value: Option<&str>) -> anyhow::Result<Kek> {
        match (file, env_value) {
            (Some(path), _) => {
                let text = Zeroizing::new(std::fs::read_to_string(path).with_context(|| {
                    format!("reading the key-encryption key file {}", path.display())
                })?);
                Kek::from_hex(&text, &path.display().to_string())
            }
            (None, Some(value)) => Kek::from_hex(value, "ONECARD_KEK"),
            (None, None) => anyhow::bail!(
                "no key-encryption key: set kek_file in the configuration, ONECARD_KEK_FILE, or \
                 ONECARD_KEK (64 hex digits; `onecard keys new-kek` makes one)"
            ),
        }
    }

    /// A fresh random KEK, as 64 hex digits, for the operator to store outside the database.
    pub fn generate_hex() -> anyhow::Result<Zeroizing<String>> {
        let mut bytes = Zeroizing::new([0u8; KEK_BYTES]);
        getrandom::fill(bytes.as_mut()).map_err(|e| anyhow::anyhow!("system randomness: {e}"))?;
        let mut hex = Zeroizing::new(String::with_capacity(2 * KEK_BYTES));
        for b in bytes.iter() {
            hex.push_str(&format!("{b:02x}"));
        }
        Ok(hex)
    }

    fn wrapper(&self) -> KwAes256 {
        KwAes256::new_from_slice(self.0.as_ref()).expect("32-byte AES-256 key")
    }

    fn wrap(&self, key: &[u8; 16]) -> Vec<u8> {
        let mut out = [0u8; 24];
        self.wrapper()
            .wrap_key(key, &mut out)
            .expect("24 bytes hold a wrapped 16-byte key");
        out.to_vec()
    }

    fn unwrap(&self, wrapped: &[u8]) -> anyhow::Result<Zeroizing<[u8; 16]>> {
        let mut out = Zeroizing::new([0u8; 16]);
        self.wrapper()
            .unwrap_key(wrapped, out.as_mut())
            .map_err(|_| {
                anyhow::anyhow!(
                    "the key-encryption key does not open the stored master keys (wrong KEK?)"
                )
            })?;
        Ok(out)
    }
}

/// A master key's public description: what to show instead of the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyInfo {
    pub kind: KeyKind,
    pub version: u8,
    pub algorithm: PurseAlgorithm,
    pub check_value: [u8; 4],
    pub created_at: Timestamp,
}

/// What the platform asks of its keys. Implemented in software here; a hardware module can
/// implement it too.
pub trait SecurityModule: Send + Sync + fmt::Debug {
    /// The newest version of a kind, which new cards are personalised under.
    fn current_version(&self, kind: KeyKind) -> Option<u8>;

    /// One of the card's keys (DLK, DPK or DTK for `Load`, `Purchase`, `Tac`) under master key
    /// `version`, for personalising the card. Card keys leave the module only towards the
    /// card being personalised.
    fn card_key(&self, kind: KeyKind, version: u8, asn: &Asn) -> anyhow::Result<PurseKey>;

    /// The card's three keys, all under master key `version`.
    fn card_keys(&self, version: u8, asn: &Asn) -> anyhow::Result<CardKeys> {
        Ok(CardKeys {
            load: self.card_key(KeyKind::Load, version, asn)?,
            purchase: self.card_key(KeyKind::Purchase, version, asn)?,
            tac: self.card_key(KeyKind::Tac, version, asn)?,
        })
    }

    /// The host side of a load (圈存): checks the card's MAC1 and, only if it is right, makes
    /// the MAC2 that lets the card credit its purse. `None`: MAC1 is wrong, nothing is made.
    /// The caller holds the money on the platform before asking (invariant 5).
    fn authorise_load(&self, version: u8, load: &LoadAuthorisation)
    -> anyhow::Result<Option<Mac4>>;

    /// Whether a load's TAC was made by the card with this ASN.
    fn verify_load_tac(&self, version: u8, load: &LoadTacInput) -> anyhow::Result<bool>;

    /// The purchase master key of `version`, for personalising a PSAM (which derives each
    /// card's DPK itself). It leaves the module only towards the PSAM being personalised.
    fn psam_purchase_master(&self, version: u8) -> anyhow::Result<PurseKey>;

    /// Whether an uploaded purchase record's TAC was made by the card with this ASN.
    fn verify_purchase_tac(&self, version: u8, record: &PurchaseTacInput) -> anyhow::Result<bool>;

    /// A terminal's master key (TMK): the terminal-master key of `version` diversified by the
    /// terminal number. It leaves the module only towards the terminal being installed.
    fn terminal_master(&self, version: u8, terminal: &TerminalId) -> anyhow::Result<Tdes2Key>;

    /// Fresh working keys for a terminal's sign-in (spec 3.6, 60.3 `003`): field 62 (a PIN
    /// key and the MAC key, each under the terminal's TMK, each with its check value) and the
    /// session that makes and checks the terminal's MACs until its next sign-in.
    fn terminal_sign_in(
        &self,
        version: u8,
        terminal: &TerminalId,
    ) -> anyhow::Result<(Vec<u8>, TerminalSession)>;

    /// The working MAC key of a terminal's `session`, wrapped under the TMK of the commerce
    /// gateway it is behind (8 bytes), then its check value (4 bytes): what the gateway needs
    /// to check and make that terminal's MACs (docs/protocol.md, sign-in through a gateway).
    fn delegate_session(
        &self,
        version: u8,
        gateway: &TerminalId,
        session: &TerminalSession,
    ) -> anyhow::Result<[u8; 12]>;

    /// The bank master key (BMK) of `version` shared with the bank `bank_id` (its
    /// institution code): the bank-master key diversified by the code. It leaves the module
    /// only towards the bank (at the key ceremony with the bank, or to the bank simulator).
    fn bank_master(&self, version: u8, bank_id: &str) -> anyhow::Result<Tdes2Key>;

    /// The campus side of a bank sign-in (spec 3.6, 60.3 `003`): the bank's field 62 (a PIN
    /// key and a MAC key under the BMK, each with its check value), checked, kept in a
    /// session. A key whose check value does not match refuses the sign-in.
    fn bank_sign_in(&self, version: u8, bank_id: &str, f62: &[u8]) -> anyhow::Result<BankSession>;

    /// Kinds, versions and check values: never keys.
    fn list(&self) -> Vec<KeyInfo>;

    /// PIN translation: a PIN block a terminal encrypted under its session's PIN key, for the
    /// bank card `pan`, re-encrypted under the bank's PIN key (field 52 towards the bank). The
    /// clear block exists only inside this call and is zeroised; a block that is not a valid
    /// ISO 9564 format-0 block for that card is refused (the kiosk used another key or card).
    fn translate_pin(
        &self,
        from: &TerminalSession,
        to: &BankSession,
        pan: &str,
        block: [u8; 8],
    ) -> anyhow::Result<[u8; 8]> {
        let pik = from
            .pik
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("this terminal session has no PIN key"))?;
        let clear = card::crypto::PinBlock::decrypt(pik, block);
        if clear.pin(pan).is_err() {
            anyhow::bail!("the PIN block is not a format-0 block for this card");
        }
        Ok(to.encrypt_pin_block(&clear))
    }
}

/// A bank link's working keys for one day, inside the module's process: the MAC key for
/// every financial message and the PIN key that bank PIN blocks are encrypted under.
pub struct BankSession {
    pik: Tdes2Key,
    mac: TerminalSession,
    /// The double-length MAC key, when the bank sent one (spec 7.4: all 16 bytes of the MAK
    /// slot), for X9.19.
    mac_double: Option<Tdes2Key>,
}

impl fmt::Debug for BankSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BankSession(<redacted>)")
    }
}

impl BankSession {
    /// The MAC of `data` with the day's MAC key, by the bank profile's algorithm. X9.19 needs
    /// the double-length key the bank sends for it.
    pub fn mac(&self, algorithm: iso8583::MacAlgorithm, data: &[u8]) -> anyhow::Result<[u8; 8]> {
        match (algorithm, &self.mac_double) {
            (iso8583::MacAlgorithm::X9_19, Some(k)) => Ok(card::crypto::x9_19_mac(k, [0; 8], data)),
            (iso8583::MacAlgorithm::X9_19, None) => anyhow::bail!(
                "X9.19 needs a double-length MAC key; the bank sent a single-length one"
            ),
            (_, Some(_)) => {
                anyhow::bail!("the bank sent a double-length MAC key; its profile must name X9.19")
            }
            _ => self.mac.mac(algorithm, data),
        }
    }

    /// A clear ISO 9564 format-0 PIN block encrypted under the bank's PIN key (field 52).
    /// Limit of this first slice: the clear block comes from the caller. The kiosk flow will
    /// translate the kiosk's encrypted block inside the module instead (PIN translation joins
    /// the trait then), so a PIN is never in clear outside it.
    pub fn encrypt_pin_block(&self, block: &card::crypto::PinBlock) -> [u8; 8] {
        block.encrypt(&self.pik)
    }
}

/// A signed-in terminal's working keys, inside the module's process: its MAC key and, for a
/// terminal that signed in at the centre, its PIN key (a kiosk's PIN blocks come under it). A
/// hardware module would keep the keys and hand out a reference; the front end only ever asks
/// for MACs and PIN translations.
pub struct TerminalSession {
    mak: DesKey,
    pik: Option<Tdes2Key>,
}

impl fmt::Debug for TerminalSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TerminalSession(<redacted>)")
    }
}

impl TerminalSession {
    /// A session with a MAC key received from the centre (a commerce gateway's copy of the
    /// key of a terminal behind it).
    pub fn from_key(mak: DesKey) -> TerminalSession {
        TerminalSession { mak, pik: None }
    }

    /// The MAC of `data` with the session's MAK, by the algorithm the profile names.
    pub fn mac(&self, algorithm: iso8583::MacAlgorithm, data: &[u8]) -> anyhow::Result<[u8; 8]> {
        match algorithm {
            iso8583::MacAlgorithm::CupsEcb => Ok(card::crypto::cups_ecb_mac(&self.mak, data)),
            iso8583::MacAlgorithm::X9_9 => Ok(card::crypto::x9_9_mac(&self.mak, [0; 8], data)),
            iso8583::MacAlgorithm::X9_19 => anyhow::bail!(
                "X9.19 needs a double-length MAC key; terminals sign in with a single-length one"
            ),
        }
    }
}

/// The diversified keys of one card.
pub struct CardKeys {
    pub load: PurseKey,
    pub purchase: PurseKey,
    pub tac: PurseKey,
}

impl fmt::Debug for CardKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CardKeys(<redacted>)")
    }
}

/// The fields of a purchase record that its TAC covers, and the TAC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PurchaseTacInput {
    pub asn: Asn,
    pub amount_fen: u32,
    pub terminal_id: TerminalId,
    pub ttc: u32,
    pub date_time: TxDateTime,
    pub tac: Mac4,
}

/// What the card answered to INITIALIZE FOR LOAD, and the load it asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadAuthorisation {
    pub asn: Asn,
    pub random: [u8; 4],
    pub online_counter: u16,
    pub old_balance_fen: u32,
    pub amount_fen: u32,
    pub terminal_id: TerminalId,
    pub date_time: TxDateTime,
    pub mac1: Mac4,
}

/// The fields a load's TAC covers, and the TAC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadTacInput {
    pub asn: Asn,
    pub new_balance_fen: u32,
    pub online_counter: u16,
    pub amount_fen: u32,
    pub terminal_id: TerminalId,
    pub date_time: TxDateTime,
    pub tac: Mac4,
}

/// The software security module: master keys unwrapped in memory from the database.
pub struct SoftwareSecurityModule {
    keys: BTreeMap<(KeyKind, u8), (PurseKey, KeyInfo)>,
    /// TAC master keys with their key schedules ready, by version.
    tac_masters: BTreeMap<u8, PreparedPurseKey>,
    /// Each card's prepared TAC key, by (version, ASN): uploads of one card then cost one
    /// MAC each instead of a key derivation. Cleared when it reaches [`TAC_KEY_CACHE_MAX`].
    tac_keys: Mutex<HashMap<(u8, Asn), PreparedMacKey>>,
}

/// Cards whose prepared TAC keys the module keeps (about 200 bytes each).
pub const TAC_KEY_CACHE_MAX: usize = 200_000;

impl fmt::Debug for SoftwareSecurityModule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown: Vec<String> = self
            .keys
            .values()
            .map(|(_, i)| {
                format!(
                    "{} v{} kcv {}",
                    i.kind.name(),
                    i.version,
                    hex(&i.check_value)
                )
            })
            .collect();
        write!(f, "SoftwareSecurityModule({})", shown.join(", "))
    }
}

/// Uppercase hex of bytes (check values, TACs, keys written for installation).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

/// The bytes of a hex text (either case); `None` if it is not whole hex pairs.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn random_key() -> anyhow::Result<Zeroizing<[u8; 16]>> {
    let mut key = Zeroizing::new([0u8; 16]);
    getrandom::fill(key.as_mut()).map_err(|e| anyhow::anyhow!("system randomness: {e}"))?;
    Ok(key)
}

impl SoftwareSecurityModule {
    /// Opens the module: unwraps every stored master key with `kek`. A wrong KEK, or a stored
    /// key whose check value does not match, is an error naming the key.
    pub async fn open(store: &Store, kek: &Kek) -> anyhow::Result<SoftwareSecurityModule> {
        let mut keys = BTreeMap::new();
        for w in store.master_keys().await? {
            let kind = KeyKind::from_code(w.kind)
                .with_context(|| format!("unknown master key kind {}", w.kind))?;
            let version = u8::try_from(w.version).context("master key version out of range")?;
            let algorithm = u8::try_from(w.algorithm)
                .ok()
                .and_then(PurseAlgorithm::from_code)
                .with_context(|| format!("unknown algorithm {} of {}", w.algorithm, kind.name()))?;
            let clear = kek.unwrap(&w.wrapped)?;
            let key = PurseKey::new(algorithm, *clear);
            let check_value = key.check_value();
            anyhow::ensure!(
                w.check_value == check_value,
                "master key {} version {version}: stored check value {} but the key gives {}",
                kind.name(),
                hex(&w.check_value),
                hex(&check_value)
            );
            let info = KeyInfo {
                kind,
                version,
                algorithm,
                check_value,
                created_at: w.created_at,
            };
            keys.insert((kind, version), (key, info));
        }
        let tac_masters = keys
            .iter()
            .filter(|((kind, _), _)| *kind == KeyKind::Tac)
            .map(|((_, version), (key, _))| (*version, key.prepare()))
            .collect();
        Ok(SoftwareSecurityModule {
            keys,
            tac_masters,
            tac_keys: Mutex::new(HashMap::new()),
        })
    }

    /// The key ceremony: makes version 1 of every kind from system randomness and stores them
    /// wrapped. Refused if any master key exists (add versions with [`Self::rotate`]).
    pub async fn ceremony(
        store: &Store,
        kek: &Kek,
        algorithm: PurseAlgorithm,
        now: Timestamp,
    ) -> anyhow::Result<Vec<KeyInfo>> {
        anyhow::ensure!(
            store.master_keys().await?.is_empty(),
            "master keys exist already: the ceremony runs once (use `onecard keys rotate`)"
        );
        Self::add_versions(store, kek, &KeyKind::ALL, algorithm, now).await
    }

    /// Adds a new version of each kind in `kinds`, beside the old ones.
    pub async fn rotate(
        store: &Store,
        kek: &Kek,
        kinds: &[KeyKind],
        algorithm: PurseAlgorithm,
        now: Timestamp,
    ) -> anyhow::Result<Vec<KeyInfo>> {
        // Opening first proves the KEK is right before anything is added under it.
        SoftwareSecurityModule::open(store, kek).await?;
        Self::add_versions(store, kek, kinds, algorithm, now).await
    }

    async fn add_versions(
        store: &Store,
        kek: &Kek,
        kinds: &[KeyKind],
        algorithm: PurseAlgorithm,
        now: Timestamp,
    ) -> anyhow::Result<Vec<KeyInfo>> {
        let existing = store.master_keys().await?;
        let mut wrapped = Vec::new();
        let mut infos = Vec::new();
        for &kind in kinds {
            let newest = existing
                .iter()
                .filter(|w| w.kind == kind.code())
                .map(|w| w.version)
                .max();
            let version = u8::try_from(newest.unwrap_or(0) + 1)
                .ok()
                .with_context(|| format!("{} has used all 255 key versions", kind.name()))?;
            let algorithm = if kind.is_card_key() {
                algorithm
            } else {
                PurseAlgorithm::Tdes
            };
            let clear = random_key()?;
            let key = PurseKey::new(algorithm, *clear);
            let check_value = key.check_value();
            wrapped.push(WrappedKey {
                kind: kind.code(),
                version: i16::from(version),
                algorithm: i16::from(algorithm as u8),
                wrapped: kek.wrap(&clear),
                check_value: check_value.to_vec(),
                created_at: now,
            });
            infos.push(KeyInfo {
                kind,
                version,
                algorithm,
                check_value,
                created_at: now,
            });
        }
        store.insert_master_keys(wrapped).await?;
        Ok(infos)
    }

    fn key(&self, kind: KeyKind, version: u8) -> anyhow::Result<&PurseKey> {
        self.keys
            .get(&(kind, version))
            .map(|(k, _)| k)
            .with_context(|| format!("no {} master key version {version}", kind.name()))
    }
}

impl SecurityModule for SoftwareSecurityModule {
    fn current_version(&self, kind: KeyKind) -> Option<u8> {
        self.keys
            .keys()
            .filter(|(k, _)| *k == kind)
            .map(|(_, v)| *v)
            .max()
    }

    fn card_key(&self, kind: KeyKind, version: u8, asn: &Asn) -> anyhow::Result<PurseKey> {
        anyhow::ensure!(kind.is_card_key(), "{} is not a card key", kind.name());
        Ok(self.key(kind, version)?.derive_card_key(&[], asn))
    }

    fn authorise_load(&self, version: u8, l: &LoadAuthorisation) -> anyhow::Result<Option<Mac4>> {
        let dlk = self
            .key(KeyKind::Load, version)?
            .derive_card_key(&[], &l.asn);
        let session = dlk.load_session_key(l.random, l.online_counter);
        let mac1 = load_mac1(
            &session,
            l.old_balance_fen,
            l.amount_fen,
            TxType::EpLoad,
            &l.terminal_id,
        );
        if !mac1.verify(&l.mac1) {
            return Ok(None);
        }
        Ok(Some(load_mac2(
            &session,
            l.amount_fen,
            TxType::EpLoad,
            &l.terminal_id,
            &l.date_time,
        )))
    }

    fn verify_load_tac(&self, version: u8, l: &LoadTacInput) -> anyhow::Result<bool> {
        let tac_key = self
            .key(KeyKind::Tac, version)?
            .derive_card_key(&[], &l.asn)
            .tac_key();
        let tac = load_tac(
            &tac_key,
            l.new_balance_fen,
            l.online_counter,
            l.amount_fen,
            TxType::EpLoad,
            &l.terminal_id,
            &l.date_time,
        );
        Ok(tac.verify(&l.tac))
    }

    fn psam_purchase_master(&self, version: u8) -> anyhow::Result<PurseKey> {
        Ok(self.key(KeyKind::Purchase, version)?.clone())
    }

    fn verify_purchase_tac(&self, version: u8, r: &PurchaseTacInput) -> anyhow::Result<bool> {
        let mut cache = self.tac_keys.lock().expect("TAC key cache lock");
        if !cache.contains_key(&(version, r.asn)) {
            let master = self
                .tac_masters
                .get(&version)
                .with_context(|| format!("no tac master key version {version}"))?;
            if cache.len() >= TAC_KEY_CACHE_MAX {
                cache.clear();
            }
            let key = master.derive_card_key(&[], &r.asn).tac_key().prepare();
            cache.insert((version, r.asn), key);
        }
        let key = &cache[&(version, r.asn)];
        let tac = purchase_tac(
            key,
            r.amount_fen,
            TxType::EpPurchase,
            &r.terminal_id,
            r.ttc,
            &r.date_time,
        );
        Ok(tac.verify(&r.tac))
    }

    fn terminal_master(&self, version: u8, terminal: &TerminalId) -> anyhow::Result<Tdes2Key> {
        let master = self.key(KeyKind::TerminalMaster, version)?;
        anyhow::ensure!(
            master.algorithm() == PurseAlgorithm::Tdes,
            "terminal master key version {version} is not 3DES; terminal keys are DES keys"
        );
        let t = terminal.to_bytes();
        // The terminal number, then "TM": the 8-byte diversification factor.
        let factor = [t[0], t[1], t[2], t[3], t[4], t[5], 0x54, 0x4D];
        let tmk = master.diversify(&factor);
        Ok(Tdes2Key::from_slice(tmk.expose_bytes()).expect("16 bytes"))
    }

    fn terminal_sign_in(
        &self,
        version: u8,
        terminal: &TerminalId,
    ) -> anyhow::Result<(Vec<u8>, TerminalSession)> {
        let tmk = self.terminal_master(version, terminal)?;
        let mut pik = Zeroizing::new([0u8; 16]);
        let mut mak = Zeroizing::new([0u8; 8]);
        getrandom::fill(pik.as_mut()).map_err(|e| anyhow::anyhow!("system randomness: {e}"))?;
        getrandom::fill(mak.as_mut()).map_err(|e| anyhow::anyhow!("system randomness: {e}"))?;
        let pik = Tdes2Key::from_slice(pik.as_ref()).expect("16 bytes");
        let mak = DesKey::from_slice(mak.as_ref()).expect("8 bytes");
        let mut f62 = Vec::with_capacity(40);
        f62.extend_from_slice(&tmk.wrap_tdes_key(&pik));
        f62.extend_from_slice(&pik.check_value());
        f62.extend_from_slice(&tmk.wrap_des_key(&mak));
        f62.extend_from_slice(&[0u8; 8]);
        f62.extend_from_slice(&mak.check_value());
        Ok((
            f62,
            TerminalSession {
                mak,
                pik: Some(pik),
            },
        ))
    }

    fn delegate_session(
        &self,
        version: u8,
        gateway: &TerminalId,
        session: &TerminalSession,
    ) -> anyhow::Result<[u8; 12]> {
        let tmk = self.terminal_master(version, gateway)?;
        let mut out = [0u8; 12];
        out[..8].copy_from_slice(&tmk.wrap_des_key(&session.mak));
        out[8..].copy_from_slice(&session.mak.check_value());
        Ok(out)
    }

    fn bank_master(&self, version: u8, bank_id: &str) -> anyhow::Result<Tdes2Key> {
        let master = self.key(KeyKind::BankMaster, version)?;
        anyhow::ensure!(
            master.algorithm() == PurseAlgorithm::Tdes,
            "bank master key version {version} is not 3DES; bank keys are DES keys"
        );
        let id = bank_id.trim();
        anyhow::ensure!(
            !id.is_empty() && id.len() <= 11 && id.bytes().all(|b| b.is_ascii_digit()),
            "bank institution code {id:?} must be 1 to 11 digits"
        );
        // The whole code as 12 BCD nibbles, F-padded on the left (so "0104" and "000104"
        // differ), then "BK": the 8-byte factor. Every code gets its own BMK.
        let padded = format!("{:F>12}", id);
        let mut factor = [0u8; 8];
        for (i, pair) in padded.as_bytes().chunks(2).enumerate() {
            let nibble = |c: u8| if c == b'F' { 0xF } else { c - b'0' };
            factor[i] = (nibble(pair[0]) << 4) | nibble(pair[1]);
        }
        factor[6] = 0x42;
        factor[7] = 0x4B;
        let bmk = master.diversify(&factor);
        Ok(Tdes2Key::from_slice(bmk.expose_bytes()).expect("16 bytes"))
    }

    fn bank_sign_in(&self, version: u8, bank_id: &str, f62: &[u8]) -> anyhow::Result<BankSession> {
        anyhow::ensure!(
            f62.len() == 40,
            "the bank's sign-in keys are {} bytes, not 40 (PIK 16 + 4, MAK 16 + 4)",
            f62.len()
        );
        let bmk = self.bank_master(version, bank_id)?;
        let pik = bmk.unwrap_tdes_key(f62[0..16].try_into().expect("16 bytes"));
        anyhow::ensure!(
            pik.check_value()[..] == f62[16..20],
            "the bank's PIN key does not match its check value"
        );
        // Spec 7.4: a single-length MAK fills the first 8 bytes of its slot and zeros follow;
        // a double-length one (X9.19) fills all 16.
        let double = f62[28..36] != [0u8; 8];
        let (mak, mac_double) = if double {
            let k = bmk.unwrap_tdes_key(f62[20..36].try_into().expect("16 bytes"));
            anyhow::ensure!(
                k.check_value()[..] == f62[36..40],
                "the bank's MAC key does not match its check value"
            );
            let left = DesKey::from_slice(&k.expose_bytes()[..8]).expect("8 bytes");
            (left, Some(k))
        } else {
            let mak = bmk.unwrap_des_key(f62[20..28].try_into().expect("8 bytes"));
            anyhow::ensure!(
                mak.check_value()[..] == f62[36..40],
                "the bank's MAC key does not match its check value"
            );
            (mak, None)
        };
        Ok(BankSession {
            pik,
            mac: TerminalSession { mak, pik: None },
            mac_double,
        })
    }

    fn list(&self) -> Vec<KeyInfo> {
        self.keys.values().map(|(_, i)| i.clone()).collect()
    }
}
