//! A simulated self-service kiosk (圈存机): signs in to the terminal front end like any
//! terminal, then tops up a software card from a bank card with its PIN and writes the money
//! to the card (docs/protocol.md section 8):
//!
//! 1. `0200` / F3 `400000`: bank card (F2), amount, the card's ASN (F48), the PIN block under
//!    the kiosk's PIN key (F52) → `00` and the top-up's id (F37) once the bank approved and
//!    the campus credited;
//! 2. INITIALIZE FOR LOAD on the card, then `0200` / F3 `620000` with its answer (F55) →
//!    the MAC2 (F55); CREDIT FOR LOAD on the card → its TAC;
//! 3. `0220` / F3 `620000` with the new balance and the TAC → `00`: loaded;
//!
//! and at a tap, [`Kiosk::load_pending`]: `0200` / F3 `310000` gives the card's oldest pending
//! load (id, amount), written by steps 2 and 3, until none is left.
//!
//! The tests and `onecard bench topup` drive it; a real kiosk does the same over a reader.

use std::time::{Duration, Instant};

use card::commands::{self, LoadInitResponse};
use card::crypto::{DesKey, Mac4, Pin, PinBlock, Tdes2Key};
use card::purse::{Asn, IssuerData, TerminalId, TxDateTime};
use card::random::SeededRandom;
use card::soft_card::SoftCard;
use iso8583::{Message, Profile};
use tokio::net::TcpStream;

/// A kiosk signed in at the front end.
pub struct Kiosk {
    profile: Profile,
    stream: TcpStream,
    f41: String,
    terminal: TerminalId,
    mak: DesKey,
    pik: Tdes2Key,
    batch: String,
    stan: u32,
}

impl std::fmt::Debug for Kiosk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kiosk").field("f41", &self.f41).finish()
    }
}

/// What a top-up at the kiosk came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KioskOutcome {
    /// The front end's answer to the top-up (`00`: the campus holds the money).
    pub code: String,
    pub topup_id: Option<i64>,
    /// The answers of the loads written to the card (top-up id, code).
    pub loads: Vec<(i64, String)>,
    pub latency: Duration,
}

fn err<E: std::fmt::Debug>(what: &str) -> impl Fn(E) -> anyhow::Error + '_ {
    move |e| anyhow::anyhow!("{what}: {e:?}")
}

impl Kiosk {
    /// Signs in as terminal `terminal_no` with its bound PSAM `psam_serial`; the working
    /// keys come under `tmk`.
    pub async fn sign_in(
        address: &str,
        terminal_no: &str,
        psam_serial: &str,
        tmk: &Tdes2Key,
    ) -> anyhow::Result<Kiosk> {
        let profile = Profile::cups_pos();
        let mut stream = TcpStream::connect(address).await?;
        stream.set_nodelay(true)?;
        let f41 = terminal_no[4..].to_owned();
        let sign_in = Message::new("0800")
            .with(11, "000001")
            .with(41, f41.clone())
            .with(42, "000000000000001")
            .with(60, "00000000003")
            .with(62, psam_serial.as_bytes().to_vec());
        let (answer, _) = crate::exchange(&profile, &mut stream, &sign_in, None).await?;
        anyhow::ensure!(
            answer.text(39) == Some("00"),
            "kiosk {terminal_no}: sign-in refused ({:?})",
            answer.text(39)
        );
        let f62 = answer.get(62).unwrap_or_default().to_vec();
        anyhow::ensure!(f62.len() == 40, "sign-in keys of {} bytes", f62.len());
        let pik = tmk.unwrap_tdes_key(f62[..16].try_into()?);
        let mak = tmk.unwrap_des_key(f62[20..28].try_into()?);
        anyhow::ensure!(
            pik.check_value() == f62[16..20] && mak.check_value() == f62[36..40],
            "kiosk {terminal_no}: the working keys do not match their check values"
        );
        let batch = answer
            .text(60)
            .and_then(|t| t.get(2..8))
            .unwrap_or("000001")
            .to_owned();
        Ok(Kiosk {
            profile,
            stream,
            f41,
            terminal: app::terminals::terminal_id(terminal_no)
                .map_err(|e| anyhow::anyhow!("{e}"))?,
            mak,
            pik,
            batch,
            stan: 1,
        })
    }

    fn next_stan(&mut self) -> String {
        self.stan = self.stan % 999_999 + 1;
        format!("{:06}", self.stan)
    }

    /// The last trace used.
    pub fn trace(&self) -> u32 {
        self.stan
    }

    /// Sets the last trace used (a kiosk that restarts carries on from where it was).
    pub fn set_stan(&mut self, stan: u32) {
        self.stan = stan;
    }

    async fn send(&mut self, m: &Message) -> anyhow::Result<Message> {
        Ok(
            crate::exchange(&self.profile, &mut self.stream, m, Some(&self.mak))
                .await?
                .0,
        )
    }

    fn base(&mut self, mti: &str, f3: &str) -> Message {
        let stan = self.next_stan();
        Message::new(mti)
            .with(3, f3)
            .with(11, stan)
            .with(41, self.f41.clone())
            .with(42, "000000000000001")
            .with(60, format!("40{}", self.batch))
    }

    /// A top-up of `amount_fen` from bank card `pan` with `pin` to `card`, then its loads.
    pub async fn top_up(
        &mut self,
        card: &mut SoftCard,
        rng: &mut SeededRandom,
        pan: &str,
        pin: &str,
        amount_fen: u32,
    ) -> anyhow::Result<KioskOutcome> {
        let started = Instant::now();
        let asn = read_asn(card, rng)?;
        let pin = Pin::parse(pin).map_err(err("PIN"))?;
        let block = PinBlock::format0(&pin, pan)
            .map_err(err("PIN block"))?
            .encrypt(&self.pik);
        let m = self
            .base("0200", "400000")
            .with(2, pan.to_owned())
            .with(4, format!("{amount_fen:012}"))
            .with(22, "051")
            .with(25, "00")
            .with(48, asn.to_string())
            .with(49, "156")
            .with(52, block.to_vec())
            .with(53, "2600000000000000");
        let answer = self.send(&m).await?;
        let code = answer.text(39).unwrap_or("").to_owned();
        let topup_id = answer.text(37).and_then(|t| t.trim().parse().ok());
        // Approved: this top-up is written to the card at once (the answer named it); older
        // pending loads wait for [`Kiosk::load_pending`], which a kiosk runs at each tap.
        let loads = match topup_id {
            Some(id) if code == "00" => {
                vec![(id, self.load_one(card, rng, &asn, id, amount_fen).await?)]
            }
            _ => Vec::new(),
        };
        Ok(KioskOutcome {
            code,
            topup_id,
            loads,
            latency: started.elapsed(),
        })
    }

    /// Writes the card's pending loads to it, oldest first, until none is left or one is
    /// refused. Returns each (top-up id, answer).
    pub async fn load_pending(
        &mut self,
        card: &mut SoftCard,
        rng: &mut SeededRandom,
    ) -> anyhow::Result<Vec<(i64, String)>> {
        let asn = read_asn(card, rng)?;
        let mut done = Vec::new();
        for _ in 0..16 {
            let q = self.base("0200", "310000").with(48, asn.to_string());
            let a = self.send(&q).await?;
            if a.text(39) != Some("00") {
                break;
            }
            let (Some(id), Some(amount)) = (
                a.text(37).and_then(|t| t.trim().parse::<i64>().ok()),
                a.text(4).and_then(|t| t.parse::<u32>().ok()),
            ) else {
                anyhow::bail!("a pending-load answer without its top-up or amount");
            };
            let code = self.load_one(card, rng, &asn, id, amount).await?;
            let stop = code != "00";
            done.push((id, code));
            if stop {
                break;
            }
        }
        Ok(done)
    }

    async fn load_one(
        &mut self,
        card: &mut SoftCard,
        rng: &mut SeededRandom,
        asn: &Asn,
        id: i64,
        amount: u32,
    ) -> anyhow::Result<String> {
        let r = transmit(
            card,
            rng,
            &commands::initialize_for_load(app::personalise::KEY_INDEX, amount, &self.terminal),
        )?;
        anyhow::ensure!(r.is_ok(), "INITIALIZE FOR LOAD: {:?}", r.sw());
        let init_bytes = r.data().to_vec();
        let init = LoadInitResponse::parse(&init_bytes).map_err(err("INITIALIZE FOR LOAD"))?;
        let at = now_digits();
        let m = self
            .base("0200", "620000")
            .with(4, format!("{amount:012}"))
            .with(37, format!("{id:012}"))
            .with(48, format!("{asn}{at}"))
            .with(55, init_bytes);
        let a = self.send(&m).await?;
        let code = a.text(39).unwrap_or("").to_owned();
        if code != "00" {
            return Ok(code);
        }
        let mac2: [u8; 4] = a
            .get(55)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| anyhow::anyhow!("a load answer without its MAC2"))?;
        let dt = TxDateTime::parse_digits(&at).map_err(err("date"))?;
        let r = transmit(card, rng, &commands::credit_for_load(&dt, Mac4::new(mac2)))?;
        anyhow::ensure!(r.is_ok(), "CREDIT FOR LOAD: {:?}", r.sw());
        let tac: [u8; 4] = r
            .data()
            .try_into()
            .map_err(|_| anyhow::anyhow!("CREDIT FOR LOAD answered no TAC"))?;
        let balance = init.old_balance_fen + amount;
        let m = self
            .base("0220", "620000")
            .with(4, format!("{amount:012}"))
            .with(37, format!("{id:012}"))
            .with(48, format!("{asn}{balance:010}"))
            .with(55, tac.to_vec());
        let a = self.send(&m).await?;
        Ok(a.text(39).unwrap_or("").to_owned())
    }
}

fn transmit(
    card: &mut SoftCard,
    rng: &mut SeededRandom,
    apdu: &[u8],
) -> anyhow::Result<card::apdu::Response> {
    card.transmit(apdu, rng)
        .map_err(|_| anyhow::anyhow!("the card tore"))
}

/// Selects the purse and reads the card's ASN.
fn read_asn(card: &mut SoftCard, rng: &mut SeededRandom) -> anyhow::Result<Asn> {
    let r = transmit(card, rng, &commands::select_by_name(&commands::EP_ADF_AID))?;
    anyhow::ensure!(r.is_ok(), "SELECT: {:?}", r.sw());
    let r = transmit(card, rng, &commands::read_binary_sfi(0x15, 0, 30))?;
    Ok(IssuerData::parse(r.data()).map_err(err("EF15"))?.asn)
}

fn now_digits() -> String {
    crate::bank::utc_now_digits()
}

/// Kiosks and cardholders for top-up runs (tests, `onecard bench topup`, `onecard sim
/// kiosk`): kiosk terminals registered with their PSAM serials, cardholders each with an
/// issued, personalised software card and a bank card bound (the simulator's
/// [`crate::bank::pan`] numbering, from `first_pan`).
pub struct KioskPopulation {
    /// Each kiosk's terminal number, PSAM serial and TMK.
    pub kiosks: Vec<(String, String, Tdes2Key)>,
    /// Each cardholder's number, card and bound bank card.
    pub cards: Vec<(String, SoftCard, String)>,
}

impl std::fmt::Debug for KioskPopulation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KioskPopulation")
            .field("kiosks", &self.kiosks.len())
            .field("cards", &self.cards.len())
            .finish()
    }
}

/// Registers `kiosks` kiosks (terminal numbers from `first_kiosk`) and makes `cards`
/// cardholders with a card and a bank card of `bank_id` bound.
pub async fn setup(
    app: &app::App,
    module: &dyn app::security::SecurityModule,
    bank_id: &str,
    kiosks: usize,
    cards: usize,
    first_kiosk: u64,
) -> anyhow::Result<KioskPopulation> {
    use app::security::KeyKind;
    let actor = app::Actor::cli();
    let err = |e: app::AppError| anyhow::anyhow!("{e}");
    let version = module
        .current_version(KeyKind::TerminalMaster)
        .ok_or_else(|| anyhow::anyhow!("no terminal master key: run the key ceremony"))?;
    let mut out = KioskPopulation {
        kiosks: Vec::new(),
        cards: Vec::new(),
    };
    for k in 0..kiosks as u64 {
        let number = format!("{:012}", first_kiosk + k);
        let psam = format!("{:020}", first_kiosk + k);
        app::terminals::register(
            app,
            &actor,
            app::terminals::NewTerminal {
                terminal_no: number.clone(),
                kind: app::terminals::TerminalKind::Kiosk,
                merchant_account_id: None,
                location: format!("simulated kiosk {}", k + 1),
                psam_serial: Some(psam.clone()),
                gateway_no: None,
            },
        )
        .await
        .map_err(err)?;
        let tmk =
            module.terminal_master(version, &app::terminals::terminal_id(&number).map_err(err)?)?;
        out.kiosks.push((number, psam, tmk));
    }
    let first = app::stock::format_asn(1);
    app::stock::receive(app, &actor, &first, cards as u64, "simulator")
        .await
        .map_err(err)?;
    app::stock::initialise(app, &actor, &first, cards as u64)
        .await
        .map_err(err)?;
    let csv = app::demo::cardholders_csv(cards, 2_026_000_001, 7);
    app::cardholders::import_csv(
        app,
        &actor,
        csv.as_bytes(),
        app::cardholders::ImportOptions {
            issue_cards: false,
            progress: None,
        },
    )
    .await
    .map_err(err)?;
    let profile = app::personalise::CardProfile {
        issuer_id: *b"ONECARD1",
        start_date: "20260101".into(),
        expiry_date: "20301231".into(),
        balance_max_fen: 100_000_000,
        pin: "123456".into(),
    };
    for i in 0..cards {
        let number = (2_026_000_001 + i as u64).to_string();
        let holder = app::cardholders::by_number(app, &actor, &number)
            .await
            .map_err(err)?;
        let asn = app::stock::format_asn(1 + i as u128);
        app::cards::issue(
            app,
            &actor,
            app::cards::IssueRequest {
                cardholder_id: holder.id,
                asn: Some(asn.clone()),
                ..Default::default()
            },
        )
        .await
        .map_err(err)?;
        let pan = crate::bank::pan(1 + i as u64);
        app::bindings::bind(app, &actor, &number, bank_id, &pan)
            .await
            .map_err(err)?;
        let card = app::personalise::personalise_soft_card(
            module,
            Asn::parse_digits(&asn).map_err(|e| anyhow::anyhow!("ASN {asn}: {e:?}"))?,
            &profile,
        )?;
        out.cards.push((number, card, pan));
    }
    Ok(out)
}
