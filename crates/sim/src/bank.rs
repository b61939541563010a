//! The bank simulator (`onecard sim bank`): a TCP server that speaks the bank's side of the
//! bank link's profile, so the campus side can be tested and run with no bank.
//!
//! Accounts (PAN, PIN, balance) live in memory. Sign-in (0800 / `003`) makes a fresh PIN key
//! and MAC key and sends them under the bank master key with their check values (F62, 40
//! bytes); echo and sign-off; a transfer (0200) checks the MAC (`A0`), the card (`14`), the
//! PIN from F52 under the day's PIN key (`55`; a transfer with F22 `012` carries no PIN: the
//! cardholder's standing authorisation), a repeated trace (`94`) and the balance (`51`), then
//! debits and answers F15 (the settlement date), F37 and F38; a reversal (0400, F61 = original
//! batch ‖ trace) credits back once (`00` again for a repeat, `25` for an unknown original).
//!
//! Faults ([`BankFault`]), set for transfers and for reversals separately, for the next `n`
//! messages or until cleared: no answer, a late answer, a dropped connection (each after the
//! bank did the work: the answer is what is lost), a duplicate answer, a wrong or missing MAC,
//! and a declined code (nothing moves). [`BankSim::reconciliation_file`] writes the day's file
//! in the format of docs/bank.md section 3.4.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use card::crypto::{DesKey, PinBlock, Tdes2Key, cups_ecb_mac, x9_9_mac, x9_19_mac};
use iso8583::{MacAlgorithm, MacCheck, Message, Profile};

/// A bank account the simulator holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BankAccount {
    pub pan: String,
    pub pin: String,
    pub balance_fen: i64,
}

struct Transfer {
    pan: String,
    amount_fen: i64,
    reversed: bool,
    settle_date: String,
    reference: String,
    terminal: String,
    campus_account: String,
    at: String,
}

/// A fault the simulated bank can be told to show on its financial answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BankFault {
    /// Answers MACed with a wrong key.
    WrongMac,
    /// Answers without a MAC.
    NoMac,
    /// Does the work and sends no answer.
    NoAnswer,
    /// Does the work and answers after this many milliseconds.
    Late(u64),
    /// Does the work and closes the connection without answering.
    Drop,
    /// Does the work and sends its answer twice.
    Duplicate,
    /// Refuses with this code (MACed); nothing moves.
    Decline(String),
}

impl BankFault {
    /// Parses `wrong-mac`, `no-mac`, `no-answer`, `late:MS`, `drop`, `duplicate`,
    /// `decline:CODE`.
    pub fn parse(s: &str) -> Result<BankFault, String> {
        Ok(match s.split_once(':') {
            None => match s {
                "wrong-mac" => BankFault::WrongMac,
                "no-mac" => BankFault::NoMac,
                "no-answer" => BankFault::NoAnswer,
                "drop" => BankFault::Drop,
                "duplicate" => BankFault::Duplicate,
                _ => {
                    return Err(format!(
                        "unknown fault {s:?}: one of wrong-mac, no-mac, no-answer, late:MS, drop, duplicate, decline:CODE"
                    ));
                }
            },
            Some(("late", ms)) => BankFault::Late(
                ms.parse()
                    .map_err(|_| format!("late:{ms}: milliseconds must be a whole number"))?,
            ),
            Some(("decline", code))
                if code.len() == 2 && code.bytes().all(|b| b.is_ascii_alphanumeric()) =>
            {
                BankFault::Decline(code.to_owned())
            }
            _ => return Err(format!("unknown fault {s:?}")),
        })
    }
}

/// A fault and how many more messages it applies to (`None`: until cleared).
#[derive(Clone, Debug, Default)]
struct Armed {
    fault: Option<BankFault>,
    left: Option<u32>,
}

impl Armed {
    /// The fault for this message (and one fewer left).
    fn take(&mut self) -> Option<BankFault> {
        let f = self.fault.clone()?;
        if let Some(n) = self.left.as_mut() {
            *n -= 1;
            if *n == 0 {
                self.fault = None;
                self.left = None;
            }
        }
        Some(f)
    }
}

/// A Luhn-valid simulated bank card number: `62220202` then `i` in 10 digits, then the check
/// digit (19 digits).
pub fn pan(i: u64) -> String {
    let body = format!("62220202{i:010}");
    let sum: u32 = body
        .bytes()
        .rev()
        .enumerate()
        .map(|(k, b)| {
            let d = u32::from(b - b'0');
            if k % 2 == 0 {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                d
            }
        })
        .sum();
    format!("{body}{}", (10 - sum % 10) % 10)
}

/// The day's MAC key: single-length (CUPS ECB, X9.9) or double-length (X9.19).
#[derive(Clone)]
enum MacKey {
    Single(DesKey),
    Double(Tdes2Key),
}

impl MacKey {
    fn mac(&self, algorithm: MacAlgorithm, data: &[u8]) -> [u8; 8] {
        match (self, algorithm) {
            (MacKey::Double(k), _) => x9_19_mac(k, [0; 8], data),
            (MacKey::Single(k), MacAlgorithm::X9_9) => x9_9_mac(k, [0; 8], data),
            (MacKey::Single(k), _) => cups_ecb_mac(k, data),
        }
    }
}

struct State {
    transfer_fault: Armed,
    reversal_fault: Armed,
    settle_date: String,
    accounts: HashMap<String, BankAccount>,
    keys: Option<(Tdes2Key, MacKey)>,
    transfers: HashMap<(String, String), Transfer>,
    batch: String,
    next_reference: u64,
}

/// The simulated bank; clones share its state.
#[derive(Clone)]
pub struct BankSim {
    /// The bank's code and the directory its reconciliation file is written to at each
    /// sign-off (`onecard sim bank --reconciliation-dir`).
    files: Option<(String, std::path::PathBuf)>,
    bmk: Arc<Tdes2Key>,
    profile: Arc<Profile>,
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for BankSim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BankSim")
    }
}

impl BankSim {
    /// A bank sharing `bmk` (the bank master key for this campus) with these accounts.
    pub fn new(bmk: Tdes2Key, accounts: Vec<BankAccount>) -> BankSim {
        BankSim {
            files: None,
            bmk: Arc::new(bmk),
            profile: Arc::new(Profile::cups_pos()),
            state: Arc::new(Mutex::new(State {
                transfer_fault: Armed::default(),
                reversal_fault: Armed::default(),
                settle_date: utc_date(),
                accounts: accounts.into_iter().map(|a| (a.pan.clone(), a)).collect(),
                keys: None,
                transfers: HashMap::new(),
                batch: "000001".into(),
                next_reference: 1,
            })),
        }
    }

    /// Speaks `profile` (its MAC algorithm too: for X9.19 the sign-in sends a double-length
    /// MAC key, all 16 bytes of its slot, spec 7.4).
    pub fn with_profile(mut self, profile: Profile) -> BankSim {
        self.profile = Arc::new(profile);
        self
    }

    /// Writes the day's reconciliation file for `bank_id` into `dir` at each sign-off
    /// (`BANK<bank id><YYYYMMDD>.txt`, replaced whole).
    pub fn with_reconciliation_dir(mut self, bank_id: &str, dir: std::path::PathBuf) -> BankSim {
        self.files = Some((bank_id.to_owned(), dir));
        self
    }

    /// Writes the reconciliation file of the current settlement date now (when a directory
    /// was given); returns its path.
    pub fn write_reconciliation_file(&self) -> anyhow::Result<Option<std::path::PathBuf>> {
        let Some((bank_id, dir)) = &self.files else {
            return Ok(None);
        };
        let date = self.state.lock().expect("bank state").settle_date.clone();
        let text = self.reconciliation_file(bank_id, &date);
        let path = dir.join(format!("BANK{bank_id}{date}.txt"));
        let tmp = dir.join(format!(".BANK{bank_id}{date}.txt.tmp"));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &path)?;
        Ok(Some(path))
    }

    /// Shows `fault` on transfers (0200) from now on (`None`: none).
    pub fn set_fault(&self, fault: Option<BankFault>) {
        self.state.lock().expect("bank state").transfer_fault = Armed { fault, left: None };
    }

    /// Shows `fault` on the next `n` transfers only.
    pub fn set_fault_times(&self, fault: BankFault, n: u32) {
        self.state.lock().expect("bank state").transfer_fault = Armed {
            fault: Some(fault),
            left: Some(n.max(1)),
        };
    }

    /// Shows `fault` on reversals (0400) from now on (`None`: none).
    pub fn set_reversal_fault(&self, fault: Option<BankFault>) {
        self.state.lock().expect("bank state").reversal_fault = Armed { fault, left: None };
    }

    /// Shows `fault` on the next `n` reversals only.
    pub fn set_reversal_fault_times(&self, fault: BankFault, n: u32) {
        self.state.lock().expect("bank state").reversal_fault = Armed {
            fault: Some(fault),
            left: Some(n.max(1)),
        };
    }

    /// The settlement date (`YYYYMMDD`) of the transfers from now on (default: today, UTC).
    pub fn set_settle_date(&self, date: &str) {
        date.clone_into(&mut self.state.lock().expect("bank state").settle_date);
    }

    /// The day's reconciliation file (docs/bank.md section 3.4): one `LOAD` line for each
    /// transfer the bank approved with that settlement date, `REVERSED` when a reversal undid
    /// it, in the order of the campus serial.
    pub fn reconciliation_file(&self, bank_id: &str, date: &str) -> String {
        let st = self.state.lock().expect("bank state");
        let mut lines: Vec<(&(String, String), &Transfer)> = st
            .transfers
            .iter()
            .filter(|(_, t)| t.settle_date == date)
            .collect();
        lines.sort_by(|a, b| a.0.cmp(b.0));
        let total: i64 = lines
            .iter()
            .filter(|(_, t)| !t.reversed)
            .map(|(_, t)| t.amount_fen)
            .sum();
        let mut out = format!("H|{bank_id}|{date}|{}|{total}\n", lines.len());
        for ((batch, stan), t) in &lines {
            let masked = app::bindings::mask_pan(&t.pan);
            out.push_str(&format!(
                "D|{date}|{}|{batch}{stan}|{}|{masked}|{}|{}|LOAD|{}|{}\n",
                t.reference,
                t.terminal,
                t.campus_account,
                t.amount_fen,
                t.at,
                if t.reversed { "REVERSED" } else { "OK" }
            ));
        }
        out.push_str(&format!("T|{}|{total}\n", lines.len()));
        out
    }

    /// The balance of an account.
    pub fn balance(&self, pan: &str) -> Option<i64> {
        self.state
            .lock()
            .expect("bank state")
            .accounts
            .get(pan)
            .map(|a| a.balance_fen)
    }

    fn answer(&self, request: &[u8]) -> anyhow::Result<Option<posp::Reply>> {
        let m = iso8583::decode(&self.profile, request).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut a = Message::new(&posp::reply_mti(m.mti_str()));
        for f in [2, 3, 4, 11, 41, 42, 49, 60] {
            if let Some(v) = m.get(f) {
                a.set(f, v.to_vec());
            }
        }
        let plain = |a: &Message| {
            iso8583::encode(&self.profile, a)
                .map(|b| Some(posp::Reply::Now(b)))
                .map_err(|e| anyhow::anyhow!("{e}"))
        };
        let network = m.text(60).and_then(|t| t.get(8..11)).unwrap_or("");
        let mut st = self.state.lock().expect("bank state");
        match (m.mti_str(), network) {
            ("0800", "003") => {
                let mut pik = [0u8; 16];
                let mut mak = [0u8; 8];
                getrandom::fill(&mut pik).map_err(|e| anyhow::anyhow!("randomness: {e}"))?;
                getrandom::fill(&mut mak).map_err(|e| anyhow::anyhow!("randomness: {e}"))?;
                let pik = Tdes2Key::from_bytes(pik);
                let mut f62 = Vec::with_capacity(40);
                f62.extend_from_slice(&self.bmk.wrap_tdes_key(&pik));
                f62.extend_from_slice(&pik.check_value());
                let mak = if self.profile.mac_algorithm == Some(MacAlgorithm::X9_19) {
                    let mut double = [0u8; 16];
                    getrandom::fill(&mut double).map_err(|e| anyhow::anyhow!("randomness: {e}"))?;
                    let k = Tdes2Key::from_bytes(double);
                    f62.extend_from_slice(&self.bmk.wrap_tdes_key(&k));
                    f62.extend_from_slice(&k.check_value());
                    MacKey::Double(k)
                } else {
                    let k = DesKey::from_bytes(mak);
                    f62.extend_from_slice(&self.bmk.wrap_des_key(&k));
                    f62.extend_from_slice(&[0; 8]);
                    f62.extend_from_slice(&k.check_value());
                    MacKey::Single(k)
                };
                st.keys = Some((pik, mak));
                a.set(60, format!("00{}003", st.batch));
                a.set(62, f62);
                a.set(39, "00");
                plain(&a)
            }
            ("0820", "301") => {
                a.set(39, "00");
                plain(&a)
            }
            ("0820", "002") => {
                st.keys = None;
                drop(st);
                if let Err(e) = self.write_reconciliation_file() {
                    tracing::warn!(error = %e, "writing the reconciliation file");
                }
                a.set(39, "00");
                plain(&a)
            }
            ("0200", _) | ("0400", _) => {
                let Some((pik, mak)) = st.keys.clone() else {
                    a.set(39, "77");
                    return plain(&a);
                };
                let check =
                    iso8583::decode_verified(&self.profile, request, |alg, mab| mak.mac(alg, mab))
                        .map_err(|e| anyhow::anyhow!("{e}"))?
                        .1;
                if check != MacCheck::Valid {
                    a.set(39, "A0");
                    return plain(&a);
                }
                let transfer = m.mti_str() == "0200";
                let fault = if transfer {
                    st.transfer_fault.take()
                } else {
                    st.reversal_fault.take()
                };
                let code = match &fault {
                    Some(BankFault::Decline(code)) => code.clone(),
                    _ if transfer => {
                        let r = st.next_reference;
                        Self::transfer(&mut st, &m, &pik, r).to_owned()
                    }
                    _ => Self::reversal(&mut st, &m).to_owned(),
                };
                if code == "00" && transfer {
                    let r = st.next_reference;
                    st.next_reference += 1;
                    a.set(37, format!("{r:012}"));
                    a.set(38, format!("{:06}", r % 1_000_000));
                    a.set(15, st.settle_date[4..8].to_owned());
                }
                a.set(39, code);
                drop(st);
                let maced = |key: &MacKey| {
                    iso8583::encode_with_mac(&self.profile, &a, |alg, mab| key.mac(alg, mab))
                        .map_err(|e| anyhow::anyhow!("{e}"))
                };
                let body = match fault {
                    Some(BankFault::NoMac) => {
                        iso8583::encode(&self.profile, &a).map_err(|e| anyhow::anyhow!("{e}"))?
                    }
                    Some(BankFault::WrongMac) => maced(&match mak {
                        MacKey::Single(_) => MacKey::Single(DesKey::from_bytes([0x5A; 8])),
                        MacKey::Double(_) => MacKey::Double(Tdes2Key::from_bytes([0x5A; 16])),
                    })?,
                    _ => maced(&mak)?,
                };
                Ok(match fault {
                    Some(BankFault::NoAnswer) => None,
                    Some(BankFault::Drop) => {
                        anyhow::bail!("the simulated bank drops the connection (fault)")
                    }
                    Some(BankFault::Duplicate) => Some(posp::Reply::Twice(body)),
                    Some(BankFault::Late(ms)) => {
                        let (tx, rx) = tokio::sync::oneshot::channel();
                        tokio::spawn(async move {
                            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                            let _ = tx.send(body);
                        });
                        Some(posp::Reply::Later(rx))
                    }
                    _ => Some(posp::Reply::Now(body)),
                })
            }
            _ => {
                a.set(39, "12");
                plain(&a)
            }
        }
    }

    fn transfer(st: &mut State, m: &Message, pik: &Tdes2Key, reference: u64) -> &'static str {
        let pan = m.text(2).unwrap_or("").to_owned();
        let amount = m.text(4).and_then(|a| a.parse::<i64>().ok()).unwrap_or(0);
        let key = (
            m.text(60)
                .and_then(|t| t.get(2..8))
                .unwrap_or("")
                .to_owned(),
            m.text(11).unwrap_or("").to_owned(),
        );
        if st.transfers.contains_key(&key) {
            return "94";
        }
        let Some(account) = st.accounts.get_mut(&pan) else {
            return "14";
        };
        // F22 `012`: no PIN, under the cardholder's standing authorisation.
        if m.text(22) != Some("012") {
            let Some(block) = m.get(52).and_then(|b| <[u8; 8]>::try_from(b).ok()) else {
                return "55";
            };
            let expected = card::crypto::Pin::parse(&account.pin).map(|p| p.to_verify_bcd());
            let pin_ok = PinBlock::decrypt(pik, block)
                .pin(&pan)
                .is_ok_and(|p| expected.as_ref().is_ok_and(|e| *e == p.to_verify_bcd()));
            if !pin_ok {
                return "55";
            }
        }
        if amount <= 0 {
            return "13";
        }
        if amount > account.balance_fen {
            return "51";
        }
        account.balance_fen -= amount;
        st.transfers.insert(
            key,
            Transfer {
                pan,
                amount_fen: amount,
                reversed: false,
                settle_date: st.settle_date.clone(),
                reference: format!("{reference:012}"),
                terminal: m.text(41).unwrap_or("").to_owned(),
                campus_account: m.text(48).unwrap_or("").to_owned(),
                at: utc_now_digits(),
            },
        );
        "00"
    }

    fn reversal(st: &mut State, m: &Message) -> &'static str {
        let f61 = m.text(61).unwrap_or("");
        let key = (
            f61.get(..6).unwrap_or("").to_owned(),
            f61.get(6..12).unwrap_or("").to_owned(),
        );
        let Some(t) = st.transfers.get_mut(&key) else {
            return "25";
        };
        if !t.reversed {
            t.reversed = true;
            let (pan, amount) = (t.pan.clone(), t.amount_fen);
            if let Some(a) = st.accounts.get_mut(&pan) {
                a.balance_fen += amount;
            }
        }
        "00"
    }
}

impl posp::Handler for BankSim {
    type Connection = ();

    async fn handle<'a>(
        &'a self,
        message: &'a [u8],
        _peer: &'a str,
        _connection: &'a mut (),
    ) -> anyhow::Result<Option<posp::Reply>> {
        self.answer(message)
    }
}

/// Today's date in UTC, `YYYYMMDD`.
fn utc_date() -> String {
    utc_now_digits()[..8].to_owned()
}

/// Now in UTC, `YYYYMMDDhhmmss`.
pub(crate) fn utc_now_digits() -> String {
    crate::tx_time(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64),
    )
}
