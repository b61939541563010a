//! Demo data: a small campus's ledger so that a new user sees a living system at once.
//!
//! The system accounts (bank clearing, cash, deposits, fees, subsidies, suspense), a few
//! merchants, and cardholders with online and purse accounts; bank and cash top-ups, a deposit
//! per card, canteen purchases, a purchase with a fee (linked), and one open hold. Every id is
//! derived from a fixed seed, so running it twice changes nothing the second time.

use ledger::{AccountId, AccountKind, Fen, Transfer, TransferId, TransferKind};

use crate::App;

/// Business codes used by the demo's transfers (the use cases of later issues define theirs).
pub mod code {
    pub const BANK_TOP_UP: u16 = 1;
    pub const CASH_TOP_UP: u16 = 2;
    pub const DEPOSIT: u16 = 3;
    pub const LOAD: u16 = 4;
    pub const PURCHASE: u16 = 5;
    pub const FEE: u16 = 6;
}

/// What the demo created.
#[derive(Debug, Default)]
pub struct DemoSummary {
    pub accounts: usize,
    pub transfers: usize,
    /// False when the demo data was there already.
    pub created: bool,
}

const MERCHANTS: [&str; 4] = [
    "merchant:canteen-1",
    "merchant:canteen-2",
    "merchant:shop",
    "merchant:print-centre",
];

/// Deterministic ids: the demo's namespace in the high bits, a counter in the low bits.
fn demo_id(n: u64) -> TransferId {
    TransferId::new(0xde30_0000_0000_0000_0000_0000_0000_0000 | u128::from(n)).expect("non-zero")
}

/// Seeds the ledger with `cardholders` cardholders and their money. Does nothing if the demo's
/// system accounts exist already.
pub async fn seed(app: &App, cardholders: usize) -> anyhow::Result<DemoSummary> {
    if app
        .store()
        .account_by_name("bank:demo-bank")
        .await?
        .is_some()
    {
        return Ok(DemoSummary::default());
    }
    let mut summary = DemoSummary {
        created: true,
        ..DemoSummary::default()
    };
    let system = [
        (AccountKind::BankClearing, "bank:demo-bank"),
        (AccountKind::Cash, "cash:card-desk"),
        (AccountKind::CardDeposit, "card-deposits"),
        (AccountKind::FeeIncome, "fee-income"),
        (AccountKind::SubsidyFund, "subsidy-fund"),
        (AccountKind::Suspense, "suspense"),
    ];
    let mut wanted: Vec<(AccountKind, Option<String>)> = system
        .iter()
        .map(|&(k, n)| (k, Some(n.to_owned())))
        .collect();
    wanted.extend(
        MERCHANTS
            .iter()
            .map(|m| (AccountKind::MerchantPayable, Some((*m).to_owned()))),
    );
    for _ in 0..cardholders {
        wanted.push((AccountKind::CardholderOnline, None));
        wanted.push((AccountKind::CardholderPurse, None));
    }
    let ids: Vec<AccountId> = app
        .store()
        .create_accounts(wanted, app.now())
        .await?
        .into_iter()
        .map(|r| r.account.id)
        .collect();
    summary.accounts = ids.len();
    let (bank, cash, deposits, fees) = (ids[0], ids[1], ids[2], ids[3]);
    let merchants = &ids[system.len()..system.len() + MERCHANTS.len()];
    let holders: Vec<(AccountId, AccountId)> = ids[system.len() + MERCHANTS.len()..]
        .chunks(2)
        .map(|pair| (pair[0], pair[1]))
        .collect();

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
    for (i, &(online, purse)) in holders.iter().enumerate() {
        let i = i as i64;
        let (source, top_up_code) = if i % 3 == 0 {
            (cash, code::CASH_TOP_UP)
        } else {
            (bank, code::BANK_TOP_UP)
        };
        let top_up = 20_000 + (i * 1_537) % 30_000;
        batch.push(next(source, online, top_up, top_up_code));
        batch.push(next(online, deposits, 2_000, code::DEPOSIT));
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
    if let Some(&(online, _)) = holders.first() {
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
    Ok(summary)
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
