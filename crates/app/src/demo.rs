//! Demo data: a living campus so that a new user sees the whole system with one command.
//!
//! Built through the same use cases the card desk uses: card stock received, initialised and
//! partly voided; cardholders in a dozen departments imported from a generated CSV with a card
//! each; cash and bank top-ups, loads, canteen purchases, a print job with a fee (linked), an
//! open hold; and cards in every state (lost, frozen, replaced, cancelled). Everything is
//! derived from a fixed seed, and a database that has cardholders already is left alone.

use ledger::{AccountId, AccountKind, Fen, Transfer, TransferId, TransferKind};

use crate::access::{Actor, Role};
use crate::cardholders::{self, ImportOptions};
use crate::cards;
use crate::{App, code, stock};

/// What the demo created.
#[derive(Debug, Default)]
pub struct DemoSummary {
    pub cardholders: usize,
    pub cards: usize,
    pub transfers: usize,
    /// False when the database had cardholders already.
    pub created: bool,
}

const MERCHANTS: [&str; 5] = [
    "merchant:canteen-1",
    "merchant:canteen-2",
    "merchant:shop",
    "merchant:print-centre",
    "merchant:library",
];

const DEPARTMENTS: [&str; 12] = [
    "计算机学院",
    "数学科学学院",
    "物理学院",
    "化学与分子工程学院",
    "生命科学学院",
    "经济学院",
    "法学院",
    "外国语学院",
    "新闻与传播学院",
    "医学部",
    "后勤保障部",
    "图书馆",
];

const SURNAMES: [&str; 24] = [
    "王", "李", "张", "刘", "陈", "杨", "黄", "赵", "吴", "周", "徐", "孙", "马", "朱", "胡", "郭",
    "何", "高", "林", "罗", "郑", "梁", "谢", "宋",
];
const GIVEN: [&str; 30] = [
    "伟", "芳", "娜", "敏", "静", "丽", "强", "磊", "军", "洋", "勇", "艳", "杰", "娟", "涛", "明",
    "超", "秀英", "霞", "平", "刚", "桂英", "浩然", "子涵", "雨桐", "欣怡", "梓轩", "思远", "一诺",
    "嘉怡",
];

/// The first ASN of the demo's card stock.
pub const DEMO_FIRST_ASN: u128 = 20_261_128_000_000_000_001;

/// A deterministic generator (xorshift): the same campus every time.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// A CSV of `n` made-up cardholders (header included): students, staff and a few temporary
/// cardholders, with identity and phone numbers. Numbers start at `first_number`.
pub fn cardholders_csv(n: usize, first_number: u64, seed: u64) -> String {
    let mut rng = Rng(seed | 1);
    let mut out = String::from("number,name,kind,department,id_number,phone\n");
    for i in 0..n as u64 {
        let number = first_number + i;
        let name = format!(
            "{}{}",
            SURNAMES[rng.below(SURNAMES.len() as u64) as usize],
            GIVEN[rng.below(GIVEN.len() as u64) as usize]
        );
        let (kind, dept) = match rng.below(100) {
            0..=79 => ("student", DEPARTMENTS[rng.below(10) as usize]),
            80..=96 => ("staff", DEPARTMENTS[rng.below(12) as usize]),
            _ => ("temporary", "访客"),
        };
        let birth_year = if kind == "student" {
            2000 + rng.below(8)
        } else {
            1965 + rng.below(35)
        };
        let id_number = format!(
            "{:06}{birth_year}{:02}{:02}{:04}",
            110_101 + rng.below(800_000),
            1 + rng.below(12),
            1 + rng.below(28),
            rng.below(10_000)
        );
        let phone = format!("1{}{:09}", 3 + rng.below(6), rng.below(1_000_000_000));
        out.push_str(&format!(
            "{number},{name},{kind},{dept},{id_number},{phone}\n"
        ));
    }
    out
}

/// Deterministic transfer ids: the demo's namespace in the high bits, a counter in the low.
fn demo_id(n: u64) -> TransferId {
    TransferId::new(0xde30_0000_0000_0000_0000_0000_0000_0000 | u128::from(n)).expect("non-zero")
}

/// Creates the demo campus with `cardholders` cardholders, unless the database has
/// cardholders already.
pub async fn seed(app: &App, cardholders: usize) -> anyhow::Result<DemoSummary> {
    let existing = app
        .store()
        .query_opt("SELECT count(*) FROM cardholders", &[])
        .await?
        .map_or(0, |r| r.int(0).unwrap_or(0));
    if existing > 0 {
        return Ok(DemoSummary::default());
    }
    let stocked_already = app
        .store()
        .query_opt("SELECT count(*) FROM card_stock", &[])
        .await?
        .map_or(0, |r| r.int(0).unwrap_or(0));
    anyhow::ensure!(
        stocked_already == 0,
        "this database has card stock but no cardholders: a demo run stopped halfway, or the \
         database is in use. The demo needs an empty database (for SQLite, a new --data-dir)"
    );
    let actor = Actor {
        name: "demo".into(),
        ..Actor::system()
    };
    let mut summary = DemoSummary {
        created: true,
        ..DemoSummary::default()
    };
    // Stock: every demo card plus spares; a few spares initialised, ten voided.
    let first = stock::format_asn(DEMO_FIRST_ASN);
    let stocked = cardholders as u64 + 200;
    stock::receive(app, &actor, &first, stocked, "demo delivery 2026-09").await?;
    stock::initialise(app, &actor, &first, cardholders as u64 + 150).await?;
    let void_first = stock::format_asn(DEMO_FIRST_ASN + u128::from(stocked) - 10);
    stock::void(app, &actor, &void_first, 10, "damaged in transport").await?;

    // System accounts and merchants.
    let bank = named(app, AccountKind::BankClearing, "bank:demo-bank").await?;
    for (kind, name) in [
        (AccountKind::SubsidyFund, "subsidy-fund"),
        (AccountKind::Suspense, "suspense"),
        (AccountKind::FeeIncome, crate::system_account::FEE_INCOME),
    ] {
        named(app, kind, name).await?;
    }
    let mut merchants = Vec::new();
    for m in MERCHANTS {
        merchants.push(named(app, AccountKind::MerchantPayable, m).await?);
    }
    let fees = named(
        app,
        AccountKind::FeeIncome,
        crate::system_account::FEE_INCOME,
    )
    .await?;

    // Cardholders with a card each, through the CSV import.
    let csv = cardholders_csv(cardholders, 2_026_000_001, 20_261_128);
    let report = cardholders::import_csv(
        app,
        &actor,
        csv.as_bytes(),
        ImportOptions {
            issue_cards: true,
            progress: None,
        },
    )
    .await?;
    anyhow::ensure!(
        report.errors.is_empty(),
        "demo import refused rows: {:?}",
        &report.errors[..report.errors.len().min(3)]
    );
    summary.cardholders = report.imported;
    summary.cards = report.cards_issued;

    // Their accounts: (cardholder id, online, purse).
    let holders: Vec<(i64, AccountId, AccountId)> = app
        .store()
        .query(
            "SELECT h.id, h.online_account_id, c.purse_account_id FROM cardholders h \
             JOIN cards c ON c.cardholder_id = h.id ORDER BY h.id",
            &[],
        )
        .await?
        .iter()
        .map(|r| {
            Ok((
                r.int(0)?,
                AccountId::new(r.int(1)?).ok_or_else(|| anyhow::anyhow!("bad id"))?,
                AccountId::new(r.int(2)?).ok_or_else(|| anyhow::anyhow!("bad id"))?,
            ))
        })
        .collect::<anyhow::Result<_>>()?;

    // Money: top-ups (a third in cash at the desk, the rest from the bank), loads, purchases.
    let mut n = 0u64;
    let mut next = |debit, credit, fen: i64, code: u16| {
        n += 1;
        Transfer {
            id: demo_id(n),
            debit,
            credit,
            amount: Fen::new(fen),
            kind: TransferKind::Single,
            linked: false,
            code,
        }
    };
    let mut batch = Vec::new();
    for (i, &(holder, online, purse)) in holders.iter().enumerate() {
        let i = i as i64;
        let top_up = 20_000 + (i * 1_537) % 30_000;
        if i % 3 == 0 {
            crate::online::cash_top_up(app, &actor, &format!("demo-{holder}"), holder, top_up)
                .await?;
        } else {
            batch.push(next(bank, online, top_up, code::BANK_TOP_UP));
        }
        let load = 5_000 + (i * 911) % 10_000;
        batch.push(next(online, purse, load, code::LOAD));
        for k in 0..(i % 4) {
            let merchant = merchants[((i + k) % 2) as usize];
            batch.push(next(
                purse,
                merchant,
                650 + (i * 37 + k * 113) % 900,
                code::PURCHASE,
            ));
        }
        if i % 10 == 0 {
            // A print job with a 0.10 yuan fee: both legs or neither.
            let mut print = next(online, merchants[3], 120, code::PURCHASE);
            print.linked = true;
            batch.push(print);
            batch.push(next(online, fees, 10, code::FEE));
        }
    }
    if let Some(&(_, online, _)) = holders.first() {
        // A shop purchase authorised but not yet confirmed: a hold for an hour.
        let mut hold = next(online, merchants[2], 1_500, code::PURCHASE);
        hold.kind = TransferKind::Pending { timeout_s: 3_600 };
        batch.push(hold);
    }
    for chunk in chunk_at_chain_ends(&batch, 1_000) {
        let outcomes = app.submit(chunk.to_vec()).await?;
        if let Some((t, r)) = chunk
            .iter()
            .zip(&outcomes)
            .find_map(|(t, o)| o.err().map(|r| (t, r)))
        {
            anyhow::bail!("demo transfer {} was rejected: {r}", t.id);
        }
        summary.transfers += chunk.len();
    }

    // Cards in every state: a few lost, frozen, replaced and cancelled.
    let card_of = |holder: i64| async move {
        app.store()
            .query_opt(
                "SELECT id FROM cards WHERE cardholder_id = $1 AND status IN (0, 1, 2)",
                store::params![holder],
            )
            .await
            .map(|r| r.and_then(|r| r.int(0).ok()))
    };
    let desk = Actor {
        role: Role::Administrator,
        ..actor.clone()
    };
    for (i, &(holder, _, _)) in holders.iter().enumerate().skip(1).step_by(97).take(40) {
        let Some(card) = card_of(holder).await? else {
            continue;
        };
        match i % 4 {
            0 => {
                cards::report_loss(app, &desk, card).await?;
            }
            1 => {
                cards::freeze(app, &desk, card, "unpaid library fines").await?;
            }
            2 => {
                cards::report_loss(app, &desk, card).await?;
                cards::replace(app, &desk, card, cards::ReplaceRequest::default()).await?;
            }
            _ => {
                cards::cancel(app, &desk, card).await?;
            }
        }
    }
    // A POS at each canteen window, the shop and the print centre, and a kiosk.
    for (i, (merchant, place)) in [
        (0, "第一食堂 一楼 3号窗口"),
        (0, "第一食堂 二楼 1号窗口"),
        (1, "第二食堂 清真窗口"),
        (2, "校园超市 收银台"),
        (3, "文印中心"),
    ]
    .into_iter()
    .enumerate()
    {
        crate::terminals::register(
            app,
            &actor,
            crate::terminals::NewTerminal {
                terminal_no: format!("{:012}", i + 1),
                kind: crate::terminals::TerminalKind::Pos,
                merchant_account_id: Some(merchants[merchant].get()),
                location: place.to_owned(),
                psam_serial: Some(format!("{:020}", 99 + i)),
                gateway_no: None,
            },
        )
        .await?;
    }
    crate::terminals::register(
        app,
        &actor,
        crate::terminals::NewTerminal {
            terminal_no: "000000000101".into(),
            kind: crate::terminals::TerminalKind::Kiosk,
            merchant_account_id: None,
            location: "图书馆 自助圈存机".into(),
            psam_serial: None,
            gateway_no: None,
        },
    )
    .await?;
    // Operators for every role, so that the API and its roles can be tried at once.
    for (username, role) in DEMO_OPERATORS {
        let new = crate::operators::NewOperator {
            username: username.to_owned(),
            display_name: None,
            role,
            merchant_account: (role == Role::MerchantOperator).then_some(merchants[4]),
            password: crate::operators::Password::new(DEMO_PASSWORD),
        };
        crate::operators::create(app, &Actor::cli(), new).await?;
    }
    Ok(summary)
}

/// The demo's operators, one per role; they share [`DEMO_PASSWORD`].
pub const DEMO_OPERATORS: [(&str, Role); 5] = [
    ("admin", Role::Administrator),
    ("desk", Role::CardDesk),
    ("finance", Role::Finance),
    ("auditor", Role::Auditor),
    ("library", Role::MerchantOperator),
];

/// The demo operators' password. A demo database is for trying onecard, never for money.
pub const DEMO_PASSWORD: &str = "onecard-demo";

async fn named(app: &App, kind: AccountKind, name: &str) -> anyhow::Result<AccountId> {
    if let Some(a) = app.store().account_by_name(name).await? {
        return Ok(a.account.id);
    }
    Ok(app.create_account(kind, Some(name)).await?.account.id)
}

/// Splits transfers into slices of about `size`, never inside a linked chain.
fn chunk_at_chain_ends(transfers: &[Transfer], size: usize) -> Vec<&[Transfer]> {
    let mut chunks = Vec::new();
    let mut start = 0;
    while start < transfers.len() {
        let mut end = (start + size).min(transfers.len());
        while end < transfers.len() && transfers[end - 1].linked {
            end += 1;
        }
        chunks.push(&transfers[start..end]);
        start = end;
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generated_csv_is_valid_and_deterministic() {
        let a = cardholders_csv(500, 1, 7);
        assert_eq!(a, cardholders_csv(500, 1, 7));
        assert_eq!(a.lines().count(), 501);
        for line in a.lines().skip(1) {
            let f: Vec<&str> = line.split(',').collect();
            let new = cardholders::NewCardholder {
                number: f[0].into(),
                name: f[1].into(),
                kind: cardholders::CardholderKind::parse(f[2]).unwrap(),
                department: f[3].into(),
                id_number: Some(f[4].into()),
                phone: Some(f[5].into()),
            };
            cardholders::validate(&new).unwrap();
            assert_eq!(f[4].len(), 18, "{line}");
        }
    }
}
