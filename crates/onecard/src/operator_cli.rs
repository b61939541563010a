//! `onecard operator ...`: operator accounts from the command line. The CLI acts as
//! [`Actor::cli`] (a local administrator): whoever can run the binary on the database can
//! manage operators, which is how the first administrator is made.
//!
//! Passwords never come from a flag (command lines are visible to other local users and kept
//! in shell histories): they are read from `--password-file PATH` or from the
//! `ONECARD_OPERATOR_PASSWORD` environment variable.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use app::operators::{self, NewOperator, Operator, Password};
use app::{Actor, App, Role};
use clap::Subcommand;
use ledger::AccountId;

use crate::config::Config;

/// Where a password comes from when `--password-file` is not given.
pub const PASSWORD_ENV: &str = "ONECARD_OPERATOR_PASSWORD";

#[derive(Subcommand, Debug)]
pub enum OperatorCommand {
    /// Create an operator. The password is read from --password-file or
    /// ONECARD_OPERATOR_PASSWORD (at least 10 characters).
    Create {
        /// 3 to 32 characters from a-z, 0-9, '.', '_' and '-'.
        #[arg(long)]
        username: String,
        /// administrator, card_desk, finance, auditor or merchant_operator.
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// A name to show (default: the username).
        #[arg(long)]
        display_name: Option<String>,
        /// The merchant_payable account a merchant_operator acts for (required for that role).
        #[arg(long, value_name = "ACCOUNT_ID", value_parser = parse_account)]
        merchant: Option<AccountId>,
        /// A file holding the password (one trailing newline is ignored).
        #[arg(long, value_name = "PATH")]
        password_file: Option<PathBuf>,
    },
    /// List operators in id order.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Refuse the operator's logins and end its sessions.
    Disable { username: String },
    /// Let a disabled operator log in again.
    Enable { username: String },
    /// Set an operator's password (from --password-file or ONECARD_OPERATOR_PASSWORD); ends
    /// its sessions.
    Passwd {
        username: String,
        #[arg(long, value_name = "PATH")]
        password_file: Option<PathBuf>,
    },
    /// Give an operator another role.
    Role {
        username: String,
        #[arg(value_parser = parse_role)]
        role: Role,
        /// The merchant_payable account, for merchant_operator.
        #[arg(long, value_name = "ACCOUNT_ID", value_parser = parse_account)]
        merchant: Option<AccountId>,
    },
}

fn parse_role(s: &str) -> Result<Role, String> {
    Role::parse(&s.replace('-', "_")).map_err(|e| e.to_string())
}

fn parse_account(s: &str) -> Result<AccountId, String> {
    s.parse()
}

/// The password from the file, else from the environment; never from the command line.
fn read_password(file: Option<&Path>) -> anyhow::Result<Password> {
    match file {
        Some(path) => {
            let text = zeroize::Zeroizing::new(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading the password file {}", path.display()))?,
            );
            let text = text
                .strip_suffix('\n')
                .map(|t| t.strip_suffix('\r').unwrap_or(t))
                .unwrap_or(&text);
            Ok(Password::new(text))
        }
        None => match std::env::var(PASSWORD_ENV) {
            Ok(text) => Ok(Password::new(text)),
            Err(_) => anyhow::bail!(
                "no password given: use --password-file PATH or set {PASSWORD_ENV} (there is \
                 no --password flag: command lines are visible to other users)"
            ),
        },
    }
}

fn describe(o: &Operator) -> String {
    let merchant = o
        .merchant_account
        .map(|m| format!(", merchant account {m}"))
        .unwrap_or_default();
    format!(
        "operator {} {} ({}{merchant}{})",
        o.id,
        o.username,
        o.role.name(),
        if o.disabled { ", disabled" } else { "" }
    )
}

pub async fn run(config: &Config, cmd: OperatorCommand) -> anyhow::Result<()> {
    let app = crate::app(config, crate::open(config, false).await?);
    let cli = Actor::cli();
    match cmd {
        OperatorCommand::Create {
            username,
            role,
            display_name,
            merchant,
            password_file,
        } => {
            let password = read_password(password_file.as_deref())?;
            let new = NewOperator {
                username,
                display_name,
                role,
                merchant_account: merchant,
                password,
            };
            let op = operators::create(&app, &cli, new).await?;
            println!("created {}", describe(&op));
        }
        OperatorCommand::List { json } => {
            let list = operators::list(&app, &cli).await?;
            if json {
                let rows: Vec<serde_json::Value> = list
                    .iter()
                    .map(|o| {
                        serde_json::json!({
                            "id": o.id, "username": o.username, "display_name": o.display_name,
                            "role": o.role.name(),
                            "merchant_account_id": o.merchant_account.map(AccountId::get),
                            "disabled": o.disabled, "created_at_ms": o.created_at_ms,
                            "updated_at_ms": o.updated_at_ms,
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(rows));
            } else {
                print_table(&list);
            }
        }
        OperatorCommand::Disable { username } => {
            let op = find(&app, &cli, &username).await?;
            let op = operators::set_disabled(&app, &cli, op.id, true).await?;
            println!("disabled {}", describe(&op));
        }
        OperatorCommand::Enable { username } => {
            let op = find(&app, &cli, &username).await?;
            let op = operators::set_disabled(&app, &cli, op.id, false).await?;
            println!("enabled {}", describe(&op));
        }
        OperatorCommand::Passwd {
            username,
            password_file,
        } => {
            let password = read_password(password_file.as_deref())?;
            let op = find(&app, &cli, &username).await?;
            let op = operators::set_password(&app, &cli, op.id, password, None).await?;
            println!("password set for {}; its sessions ended", describe(&op));
        }
        OperatorCommand::Role {
            username,
            role,
            merchant,
        } => {
            let op = find(&app, &cli, &username).await?;
            let op = operators::set_role(&app, &cli, op.id, role, merchant).await?;
            println!("{}", describe(&op));
        }
    }
    Ok(())
}

async fn find(app: &App, cli: &Actor, username: &str) -> anyhow::Result<Operator> {
    Ok(operators::by_username(app, cli, username).await?)
}

fn print_table(list: &[Operator]) {
    let rows: Vec<[String; 6]> = list
        .iter()
        .map(|o| {
            [
                o.id.to_string(),
                o.username.clone(),
                o.role.name().to_owned(),
                o.merchant_account
                    .map(|m| m.to_string())
                    .unwrap_or_default(),
                if o.disabled { "disabled" } else { "enabled" }.to_owned(),
                o.display_name.clone(),
            ]
        })
        .collect();
    let header = [
        "ID",
        "USERNAME",
        "ROLE",
        "MERCHANT",
        "STATUS",
        "DISPLAY NAME",
    ];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 6]| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header);
    for row in &rows {
        line(row.each_ref().map(String::as_str));
    }
    if list.is_empty() {
        println!("(no operators: create one with `onecard operator create`)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_variable_is_a_known_one() {
        assert!(crate::config::ENV_VARS.contains(&PASSWORD_ENV));
    }

    #[test]
    fn roles_parse_with_dashes_or_underscores() {
        assert_eq!(parse_role("card-desk"), Ok(Role::CardDesk));
        assert_eq!(parse_role("merchant_operator"), Ok(Role::MerchantOperator));
        assert!(parse_role("boss").unwrap_err().contains("administrator"));
    }
}
