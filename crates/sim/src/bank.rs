//! The bank simulator (`onecard sim bank`, first slice): a TCP server that speaks the bank's
//! side of the bank link's profile, so the campus side can be tested with no bank.
//!
//! Accounts (PAN, PIN, balance) live in memory. Sign-in (0800 / `003`) makes a fresh PIN key
//! and MAC key and sends them under the bank master key with their check values (F62, 40
//! bytes); echo and sign-off; a transfer (0200) checks the MAC (`A0`), the card (`14`), the
//! PIN from F52 under the day's PIN key (`55`), a repeated trace (`94`) and the balance
//! (`51`), then debits; a reversal (0400, F61 = original batch ‖ trace) credits back once
//! (`00` again for a repeat, `25` for an unknown original). Fault injection and the daily
//! reconciliation file come with the next slices of the bank issue.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use card::crypto::{DesKey, PinBlock, Tdes2Key, cups_ecb_mac};
use iso8583::{MacCheck, Message, Profile};

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
}

/// A fault the simulated bank can be told to show on its financial answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BankFault {
    /// Answers MACed with a wrong key.
    WrongMac,
    /// Answers without a MAC.
    NoMac,
}

struct State {
    fault: Option<BankFault>,
    accounts: HashMap<String, BankAccount>,
    keys: Option<(Tdes2Key, DesKey)>,
    transfers: HashMap<(String, String), Transfer>,
    batch: String,
    next_reference: u64,
}

/// The simulated bank; clones share its state.
#[derive(Clone)]
pub struct BankSim {
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
            bmk: Arc::new(bmk),
            profile: Arc::new(Profile::cups_pos()),
            state: Arc::new(Mutex::new(State {
                fault: None,
                accounts: accounts.into_iter().map(|a| (a.pan.clone(), a)).collect(),
                keys: None,
                transfers: HashMap::new(),
                batch: "000001".into(),
                next_reference: 1,
            })),
        }
    }

    /// Shows `fault` on the financial answers from now on (`None`: none).
    pub fn set_fault(&self, fault: Option<BankFault>) {
        self.state.lock().expect("bank state").fault = fault;
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

    fn answer(&self, request: &[u8]) -> anyhow::Result<Vec<u8>> {
        let m = iso8583::decode(&self.profile, request).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut a = Message::new(&posp::reply_mti(m.mti_str()));
        for f in [2, 3, 4, 11, 41, 42, 49, 60] {
            if let Some(v) = m.get(f) {
                a.set(f, v.to_vec());
            }
        }
        let plain =
            |a: &Message| iso8583::encode(&self.profile, a).map_err(|e| anyhow::anyhow!("{e}"));
        let network = m.text(60).and_then(|t| t.get(8..11)).unwrap_or("");
        let mut st = self.state.lock().expect("bank state");
        match (m.mti_str(), network) {
            ("0800", "003") => {
                let mut pik = [0u8; 16];
                let mut mak = [0u8; 8];
                getrandom::fill(&mut pik).map_err(|e| anyhow::anyhow!("randomness: {e}"))?;
                getrandom::fill(&mut mak).map_err(|e| anyhow::anyhow!("randomness: {e}"))?;
                let pik = Tdes2Key::from_bytes(pik);
                let mak = DesKey::from_bytes(mak);
                let mut f62 = Vec::with_capacity(40);
                f62.extend_from_slice(&self.bmk.wrap_tdes_key(&pik));
                f62.extend_from_slice(&pik.check_value());
                f62.extend_from_slice(&self.bmk.wrap_des_key(&mak));
                f62.extend_from_slice(&[0; 8]);
                f62.extend_from_slice(&mak.check_value());
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
                a.set(39, "00");
                plain(&a)
            }
            ("0200", _) | ("0400", _) => {
                let Some((pik, mak)) = st.keys.clone() else {
                    a.set(39, "77");
                    return plain(&a);
                };
                let check = iso8583::decode_verified(&self.profile, request, |_, mab| {
                    cups_ecb_mac(&mak, mab)
                })
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .1;
                if check != MacCheck::Valid {
                    a.set(39, "A0");
                    return plain(&a);
                }
                let code = if m.mti_str() == "0200" {
                    Self::transfer(&mut st, &m, &pik)
                } else {
                    Self::reversal(&mut st, &m)
                };
                if code == "00" {
                    let r = st.next_reference;
                    st.next_reference += 1;
                    a.set(37, format!("{r:012}"));
                    a.set(38, format!("{:06}", r % 1_000_000));
                }
                a.set(39, code);
                match st.fault {
                    Some(BankFault::NoMac) => plain(&a),
                    Some(BankFault::WrongMac) => {
                        let wrong = DesKey::from_bytes([0x5A; 8]);
                        iso8583::encode_with_mac(&self.profile, &a, |_, mab| {
                            cups_ecb_mac(&wrong, mab)
                        })
                        .map_err(|e| anyhow::anyhow!("{e}"))
                    }
                    None => iso8583::encode_with_mac(&self.profile, &a, |_, mab| {
                        cups_ecb_mac(&mak, mab)
                    })
                    .map_err(|e| anyhow::anyhow!("{e}")),
                }
            }
            _ => {
                a.set(39, "12");
                plain(&a)
            }
        }
    }

    fn transfer(st: &mut State, m: &Message, pik: &Tdes2Key) -> &'static str {
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
        Ok(Some(posp::Reply::Now(self.answer(message)?)))
    }
}
