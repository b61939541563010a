//! Who may do what: operator roles, the permissions each role grants, and the [`Actor`] every
//! use case is given (for the permission check and the audit log).
//!
//! Every use case that reads or changes something checks its permission first, so the JSON
//! API, the console and the CLI enforce the same rules. The CLI acts as the local system
//! administrator (`cli:<user>`): whoever can run the binary on the database can change it.

use ledger::AccountId;

use crate::error::AppError;

/// An operator's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Administrator,
    CardDesk,
    Finance,
    Auditor,
    MerchantOperator,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Administrator,
        Role::CardDesk,
        Role::Finance,
        Role::Auditor,
        Role::MerchantOperator,
    ];

    pub fn code(self) -> i64 {
        match self {
            Role::Administrator => 1,
            Role::CardDesk => 2,
            Role::Finance => 3,
            Role::Auditor => 4,
            Role::MerchantOperator => 5,
        }
    }

    pub fn from_code(code: i64) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.code() == code)
    }

    pub fn name(self) -> &'static str {
        match self {
            Role::Administrator => "administrator",
            Role::CardDesk => "card_desk",
            Role::Finance => "finance",
            Role::Auditor => "auditor",
            Role::MerchantOperator => "merchant_operator",
        }
    }

    pub fn parse(s: &str) -> Result<Role, AppError> {
        Role::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| {
                AppError::invalid(
                    "invalid_role",
                    format!(
                        "unknown role {s:?}; one of {}",
                        Role::ALL.map(Role::name).join(", ")
                    ),
                )
            })
    }

    /// Whether this role grants `p`.
    pub fn allows(self, p: Permission) -> bool {
        use Permission::*;
        match self {
            // Taking payments belongs to a merchant: an administrator has no till.
            Role::Administrator => p != Payments,
            Role::CardDesk => matches!(
                p,
                CardholdersRead
                    | CardholdersWrite
                    | CardsRead
                    | CardsWrite
                    | StockRead
                    | StockWrite
                    | CashDesk
                    | BankRead
                    | BankBindings
            ),
            Role::Finance => matches!(
                p,
                CardholdersRead
                    | CardsRead
                    | StockRead
                    | LedgerRead
                    | CashDesk
                    | TerminalsRead
                    | BankRead
                    | BankResolve
            ),
            Role::Auditor => matches!(
                p,
                CardholdersRead
                    | CardsRead
                    | StockRead
                    | LedgerRead
                    | AuditRead
                    | TerminalsRead
                    | BankRead
            ),
            Role::MerchantOperator => matches!(p, Payments),
        }
    }
}

/// What a use case needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Permission {
    /// Read cardholders (identity and phone numbers masked in lists).
    CardholdersRead,
    /// Create, edit and import cardholders.
    CardholdersWrite,
    CardsRead,
    /// Issue, report loss, unlock, freeze, replace and cancel cards.
    CardsWrite,
    StockRead,
    /// Receive, initialise and void blank cards.
    StockWrite,
    /// Cash top-ups and refunds at the card desk.
    CashDesk,
    /// Charge a cardholder's online account for the operator's merchant.
    Payments,
    /// Ledger accounts and transfers.
    LedgerRead,
    AuditRead,
    /// Create, change and disable operators.
    OperatorsManage,
    /// Terminals, their offline records, quarantine and purse anomalies.
    TerminalsRead,
    /// Register terminals, bind PSAMs, enable and disable them.
    TerminalsManage,
    /// Bank top-ups, bank bindings, reversals and reconciliation results.
    BankRead,
    /// Bank card bindings and their files (account opening, card production, cancellation).
    BankBindings,
    /// Resolve reconciliation differences and reversals left to an operator: these post
    /// through the ledger.
    BankResolve,
}

impl Permission {
    pub const ALL: [Permission; 16] = [
        Permission::CardholdersRead,
        Permission::CardholdersWrite,
        Permission::CardsRead,
        Permission::CardsWrite,
        Permission::StockRead,
        Permission::StockWrite,
        Permission::CashDesk,
        Permission::Payments,
        Permission::LedgerRead,
        Permission::AuditRead,
        Permission::OperatorsManage,
        Permission::TerminalsRead,
        Permission::TerminalsManage,
        Permission::BankRead,
        Permission::BankBindings,
        Permission::BankResolve,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Permission::CardholdersRead => "cardholders.read",
            Permission::CardholdersWrite => "cardholders.write",
            Permission::CardsRead => "cards.read",
            Permission::CardsWrite => "cards.write",
            Permission::StockRead => "stock.read",
            Permission::StockWrite => "stock.write",
            Permission::CashDesk => "cash_desk",
            Permission::Payments => "payments",
            Permission::LedgerRead => "ledger.read",
            Permission::AuditRead => "audit.read",
            Permission::OperatorsManage => "operators.manage",
            Permission::TerminalsRead => "terminals.read",
            Permission::TerminalsManage => "terminals.manage",
            Permission::BankRead => "bank.read",
            Permission::BankBindings => "bank.bindings",
            Permission::BankResolve => "bank.resolve",
        }
    }
}

/// Who is acting, from where: given to every use case, written to the audit log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Actor {
    /// The operator's id; `None` for the CLI and the system itself.
    pub operator_id: Option<i64>,
    /// `operator:<username>`, `cli:<user>` or `system`.
    pub name: String,
    /// Where the request came from: the client's IP address, `local` for the CLI.
    pub source: String,
    pub role: Role,
    /// The merchant a merchant operator acts for.
    pub merchant_account: Option<AccountId>,
}

impl Actor {
    /// The local command line, acting as an administrator.
    pub fn cli() -> Actor {
        let user = ["USER", "LOGNAME"]
            .iter()
            .find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()))
            .unwrap_or_else(|| "unknown".into());
        Actor {
            operator_id: None,
            name: format!("cli:{user}"),
            source: "local".into(),
            role: Role::Administrator,
            merchant_account: None,
        }
    }

    /// onecard itself (scheduled work such as moving a replaced card's purse balance).
    pub fn system() -> Actor {
        Actor {
            operator_id: None,
            name: "system".into(),
            source: "local".into(),
            role: Role::Administrator,
            merchant_account: None,
        }
    }

    /// Fails with `Forbidden` unless the actor's role grants `p`.
    pub fn require(&self, p: Permission) -> Result<(), AppError> {
        if self.role.allows(p) {
            Ok(())
        } else {
            Err(AppError::Forbidden(format!(
                "{} ({}) may not do this: it needs {}",
                self.name,
                self.role.name(),
                p.name()
            )))
        }
    }
}
