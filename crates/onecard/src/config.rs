//! Configuration: defaults, then one TOML file, then `ONECARD_*` environment variables, then
//! command-line flags. Unknown keys and unknown `ONECARD_*` variables are errors, so a typo is
//! reported instead of silently ignored. Secrets have no defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::Deserialize;
use store::DatabaseUrl;

/// The configuration file read when `--config` is not given, if it exists.
pub const CONFIG_FILE_DEFAULT: &str = "onecard.toml";
pub const DATA_DIR_DEFAULT: &str = "onecard-data";
pub const HTTP_LISTEN_DEFAULT: &str = "127.0.0.1:8080";

/// Environment variables onecard reads; any other `ONECARD_*` variable is refused.
pub const ENV_VARS: [&str; 11] = [
    "ONECARD_CONFIG",
    "ONECARD_KEK",
    "ONECARD_KEK_FILE",
    "ONECARD_DATA_DIR",
    "ONECARD_DATABASE_URL",
    "ONECARD_HTTP_LISTEN",
    "ONECARD_POSP_LISTEN",
    "ONECARD_LOG",
    // The password for `onecard operator create|passwd` without --password-file.
    "ONECARD_OPERATOR_PASSWORD",
    // Used by tests and benchmarks only.
    "ONECARD_TEST_PG_URL",
    "ONECARD_BENCH_PG_URL",
];

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    database_url: Option<String>,
    kek_file: Option<PathBuf>,
    log: Option<String>,
    http: Option<HttpFile>,
    posp: Option<PospFile>,
    cards: Option<CardsFile>,
    topup: Option<TopUpFile>,
    /// `[[bank]]`: one table per bank the campus tops up from.
    #[serde(default)]
    bank: Vec<BankFile>,
    /// The campus's time zone, minutes east of UTC (480 for China).
    utc_offset_minutes: Option<i32>,
}

/// `[topup]`: bank top-up limits and times.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TopUpFile {
    amount_fen_max: Option<i64>,
    /// Hours credited money waits to be written to the card before it is returned.
    pending_load_hours: Option<u32>,
    /// Tries of a reversal before it goes to the manual queue.
    reversal_attempts: Option<i64>,
}

/// `[[bank]]`: one bank's link.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BankFile {
    /// The bank's institution code.
    id: String,
    /// The bank front end's `host:port`.
    address: String,
    /// onecard's terminal id (F41, 8 characters) and merchant id (F42, 15) at the bank.
    terminal_id: String,
    merchant_id: String,
    timeout_ms: Option<u64>,
    connections: Option<usize>,
    /// The bank's own ISO 8583 profile (TOML); the CUPS POS dialect when absent.
    profile: Option<PathBuf>,
    /// `HH:MM`, local time: the daily sign-off.
    sign_off_at: Option<String>,
    /// Where the bank's reconciliation files arrive.
    reconciliation_dir: Option<PathBuf>,
}

/// A configured bank.
#[derive(Debug, Clone)]
pub struct Bank {
    pub settings: banklink::BankSettings,
    pub reconciliation_dir: Option<PathBuf>,
}

/// `[cards]`: the card desk's policy.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CardsFile {
    deposit_fen: Option<i64>,
    valid_days: Option<u32>,
    replacement_fee_fen: Option<i64>,
    /// Days a replaced or cancelled card's purse balance waits for the card's last records.
    purse_wait_days: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpFile {
    listen: Option<String>,
}

/// `[posp]`: the terminal front end and the limits it applies.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PospFile {
    listen: Option<String>,
    /// What one card may be authorised for online in a business day.
    card_daily_limit_fen: Option<i64>,
    /// The largest purchase authorised online.
    purchase_max_fen: Option<i64>,
    /// The largest offline record posted; larger ones are quarantined.
    record_max_fen: Option<u32>,
}

/// The effective configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub database_url: DatabaseUrl,
    pub http_listen: SocketAddr,
    /// Where the terminal front end listens; off when unset (it needs the KEK).
    pub posp_listen: Option<SocketAddr>,
    pub log_filter: String,
    /// Where the key-encryption key is read from: a file, else the ONECARD_KEK value. No
    /// default: without one, commands that need master keys refuse to run.
    pub kek_file: Option<PathBuf>,
    pub kek_env: Option<secrecy::SecretString>,
    pub card_policy: app::CardPolicy,
    /// The terminal front end's limits (`[posp]`).
    pub authorisation: app::authorise::AuthorisationPolicy,
    pub ingest: app::ingest::IngestPolicy,
    /// Bank top-up (`[topup]`) and the banks (`[[bank]]`).
    pub topup: app::topup::TopUpPolicy,
    pub banks: Vec<Bank>,
}

/// Values given on the command line, which win over everything else.
#[derive(Debug, Default)]
pub struct Overrides {
    pub config_file: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
    pub database_url: Option<String>,
    pub http_listen: Option<String>,
}

impl Config {
    pub fn load(overrides: Overrides) -> anyhow::Result<Config> {
        Config::load_from(
            overrides,
            |k| std::env::var(k).ok(),
            std::env::vars().map(|(k, _)| k),
        )
    }

    /// `env` reads a variable; `env_names` lists the variables that are set.
    pub fn load_from(
        overrides: Overrides,
        env: impl Fn(&str) -> Option<String>,
        env_names: impl Iterator<Item = String>,
    ) -> anyhow::Result<Config> {
        for name in env_names.filter(|n| n.starts_with("ONECARD_")) {
            anyhow::ensure!(
                ENV_VARS.contains(&name.as_str()),
                "unknown environment variable {name}; onecard reads {}",
                ENV_VARS.join(", ")
            );
        }
        let file_path = overrides
            .config_file
            .clone()
            .or_else(|| env("ONECARD_CONFIG").map(PathBuf::from));
        let file = match &file_path {
            Some(p) => read_file(p)?,
            None if Path::new(CONFIG_FILE_DEFAULT).is_file() => {
                read_file(Path::new(CONFIG_FILE_DEFAULT))?
            }
            None => FileConfig::default(),
        };
        let data_dir = overrides
            .data_dir
            .or_else(|| env("ONECARD_DATA_DIR").map(PathBuf::from))
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from(DATA_DIR_DEFAULT));
        let url_text = overrides
            .database_url
            .map(|u| ("--database-url", u))
            .or_else(|| env("ONECARD_DATABASE_URL").map(|u| ("ONECARD_DATABASE_URL", u)))
            .or(file
                .database_url
                .map(|u| ("database_url in the config file", u)));
        let database_url = match url_text {
            Some((from, text)) => {
                DatabaseUrl::parse(&text).with_context(|| format!("reading {from}"))?
            }
            None => DatabaseUrl::Sqlite(data_dir.join("onecard.db")),
        };
        let listen_text = overrides
            .http_listen
            .or_else(|| env("ONECARD_HTTP_LISTEN"))
            .or(file.http.and_then(|h| h.listen))
            .unwrap_or_else(|| HTTP_LISTEN_DEFAULT.to_owned());
        let http_listen = listen_text.parse().map_err(|_| {
            anyhow::anyhow!("invalid HTTP listen address {listen_text:?}: expected IP:PORT such as {HTTP_LISTEN_DEFAULT}")
        })?;
        let posp_file = file.posp.unwrap_or_default();
        let mut authorisation = app::authorise::AuthorisationPolicy::default();
        let mut ingest = app::ingest::IngestPolicy::default();
        let money = |name: &str, v: i64| {
            anyhow::ensure!(
                (1..=100_000_000).contains(&v),
                "[posp] {name} = {v} must be 1 to 100000000 fen"
            );
            Ok(v)
        };
        if let Some(v) = posp_file.card_daily_limit_fen {
            authorisation.daily_limit_fen = money("card_daily_limit_fen", v)?;
        }
        if let Some(v) = posp_file.purchase_max_fen {
            authorisation.amount_fen_max = money("purchase_max_fen", v)?;
        }
        if let Some(v) = posp_file.record_max_fen {
            ingest.record_amount_fen_max = money("record_max_fen", i64::from(v))? as u32;
        }
        let posp_listen = match env("ONECARD_POSP_LISTEN").or(posp_file.listen) {
            Some(text) => Some(text.parse().map_err(|_| {
                anyhow::anyhow!("invalid terminal front end address {text:?}: expected IP:PORT such as 127.0.0.1:9000")
            })?),
            None => None,
        };
        let log_filter = env("ONECARD_LOG")
            .or(file.log)
            .unwrap_or_else(|| "info".to_owned());
        let kek_file = env("ONECARD_KEK_FILE").map(PathBuf::from).or(file.kek_file);
        let kek_env = env("ONECARD_KEK").map(secrecy::SecretString::from);
        let mut card_policy = app::CardPolicy::default();
        if let Some(m) = file.utc_offset_minutes {
            anyhow::ensure!(
                (-720..=840).contains(&m),
                "utc_offset_minutes = {m} must be -720 to 840 (minutes east of UTC)"
            );
            card_policy.utc_offset_minutes = m;
        }
        if let Some(c) = file.cards {
            let fen = |name: &str, v: i64| {
                anyhow::ensure!(
                    (0..=app::cards::DEPOSIT_FEN_MAX).contains(&v),
                    "[cards] {name} = {v} must be 0 to {} fen",
                    app::cards::DEPOSIT_FEN_MAX
                );
                Ok(v)
            };
            if let Some(v) = c.deposit_fen {
                card_policy.deposit_fen = fen("deposit_fen", v)?;
            }
            if let Some(v) = c.replacement_fee_fen {
                card_policy.replacement_fee_fen = fen("replacement_fee_fen", v)?;
            }
            if let Some(v) = c.valid_days {
                anyhow::ensure!(
                    (1..=36_500).contains(&v),
                    "[cards] valid_days = {v} must be 1 to 36500"
                );
                card_policy.valid_days = v;
            }
            if let Some(v) = c.purse_wait_days {
                anyhow::ensure!(v <= 365, "[cards] purse_wait_days = {v} must be 0 to 365");
                card_policy.purse_wait_ms = i64::from(v) * 86_400_000;
            }
        }
        let mut topup = app::topup::TopUpPolicy::default();
        if let Some(t) = file.topup {
            if let Some(v) = t.amount_fen_max {
                topup.amount_fen_max = money("amount_fen_max", v).map_err(|e| {
                    anyhow::anyhow!("{}", e.to_string().replace("[posp]", "[topup]"))
                })?;
            }
            if let Some(v) = t.pending_load_hours {
                anyhow::ensure!(
                    (1..=24 * 366).contains(&v),
                    "[topup] pending_load_hours = {v} must be 1 to 8784"
                );
                topup.pending_load_ms = i64::from(v) * 3_600_000;
            }
            if let Some(v) = t.reversal_attempts {
                anyhow::ensure!(
                    (1..=100).contains(&v),
                    "[topup] reversal_attempts = {v} must be 1 to 100"
                );
                topup.reversal_attempts_max = v;
            }
        }
        let mut banks = Vec::new();
        for (i, b) in file.bank.into_iter().enumerate() {
            let at = format!("[[bank]] number {} (id {:?})", i + 1, b.id);
            anyhow::ensure!(
                (1..=11).contains(&b.id.len()) && b.id.bytes().all(|c| c.is_ascii_digit()),
                "{at}: id must be the bank's institution code, 1 to 11 digits"
            );
            anyhow::ensure!(
                !banks.iter().any(|x: &Bank| x.settings.link.bank_id == b.id),
                "{at}: bank {} is configured twice",
                b.id
            );
            anyhow::ensure!(
                b.terminal_id.len() == 8 && b.merchant_id.len() == 15,
                "{at}: terminal_id must be 8 characters and merchant_id 15"
            );
            if let Some(t) = &b.sign_off_at {
                let ok = t.len() == 5
                    && t.as_bytes()[2] == b':'
                    && t[..2].parse::<u8>().is_ok_and(|h| h < 24)
                    && t[3..].parse::<u8>().is_ok_and(|m| m < 60);
                anyhow::ensure!(ok, "{at}: sign_off_at = {t:?} must be HH:MM");
            }
            let timeout_ms = b.timeout_ms.unwrap_or(5_000);
            anyhow::ensure!(
                (100..=60_000).contains(&timeout_ms),
                "{at}: timeout_ms = {timeout_ms} must be 100 to 60000"
            );
            let connections = b.connections.unwrap_or(4);
            anyhow::ensure!(
                (1..=64).contains(&connections),
                "{at}: connections = {connections} must be 1 to 64"
            );
            let profile = match &b.profile {
                None => iso8583::Profile::cups_pos(),
                Some(p) => {
                    let text = std::fs::read_to_string(p)
                        .with_context(|| format!("{at}: reading the profile {}", p.display()))?;
                    iso8583::Profile::from_toml(&text)
                        .map_err(|e| anyhow::anyhow!("{at}: the profile {}: {e}", p.display()))?
                }
            };
            banks.push(Bank {
                settings: banklink::BankSettings {
                    link: banklink::BankConfig {
                        bank_id: b.id,
                        address: b.address,
                        terminal_id: b.terminal_id,
                        merchant_id: b.merchant_id,
                        timeout_ms,
                    },
                    connections,
                    profile,
                    sign_off_at: b.sign_off_at,
                },
                reconciliation_dir: b.reconciliation_dir,
            });
        }
        Ok(Config {
            topup,
            banks,
            data_dir,
            database_url,
            http_listen,
            posp_listen,
            log_filter,
            kek_file,
            kek_env,
            card_policy,
            authorisation,
            ingest,
        })
    }
}

fn read_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the configuration file {}", path.display()))?;
    toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("in the configuration file {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(over: Overrides, vars: &[(&str, &str)]) -> anyhow::Result<Config> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let get = |k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        Config::load_from(over, get, vars.iter().map(|(k, _)| k.clone()))
    }

    #[test]
    fn the_card_policy_comes_from_the_file_and_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        let over = || Overrides {
            config_file: Some(file.clone()),
            ..Overrides::default()
        };
        std::fs::write(&file, "[cards]\ndeposit_fen = 3000\npurse_wait_days = 3\n").unwrap();
        let c = load(over(), &[]).unwrap();
        assert_eq!(c.card_policy.deposit_fen, 3_000);
        assert_eq!(c.card_policy.purse_wait_ms, 3 * 86_400_000);
        assert_eq!(
            c.card_policy.replacement_fee_fen,
            app::CardPolicy::default().replacement_fee_fen
        );
        std::fs::write(&file, "[cards]\ndeposit_fen = -1\n").unwrap();
        let e = load(over(), &[]).unwrap_err().to_string();
        assert!(e.contains("deposit_fen = -1"), "{e}");
        std::fs::write(&file, "[cards]\ndeposit = 1\n").unwrap();
        let e = load(over(), &[]).unwrap_err().to_string();
        assert!(e.contains("unknown field"), "{e}");
    }

    #[test]
    fn the_terminal_limits_come_from_the_file_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        let over = || Overrides {
            config_file: Some(file.clone()),
            ..Overrides::default()
        };
        std::fs::write(
            &file,
            "[posp]\nlisten = \"127.0.0.1:9100\"\ncard_daily_limit_fen = 50000\nrecord_max_fen = 2000\n",
        )
        .unwrap();
        let c = load(over(), &[]).unwrap();
        assert_eq!(c.posp_listen.unwrap().port(), 9100);
        assert_eq!(c.authorisation.daily_limit_fen, 50_000);
        assert_eq!(
            c.authorisation.amount_fen_max,
            app::authorise::AuthorisationPolicy::default().amount_fen_max
        );
        assert_eq!(c.ingest.record_amount_fen_max, 2_000);
        std::fs::write(&file, "[posp]\npurchase_max_fen = 0\n").unwrap();
        let e = load(over(), &[]).unwrap_err().to_string();
        assert!(e.contains("purchase_max_fen = 0"), "{e}");
    }

    #[test]
    fn defaults_put_sqlite_in_the_data_dir() {
        let c = load(Overrides::default(), &[]).unwrap();
        assert_eq!(c.database_url.to_string(), "sqlite:onecard-data/onecard.db");
        assert_eq!(c.http_listen.to_string(), HTTP_LISTEN_DEFAULT);
    }

    #[test]
    fn file_then_env_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "data_dir = \"/srv/a\"\n[http]\nlisten = \"0.0.0.0:9000\"\n",
        )
        .unwrap();
        let over = || Overrides {
            config_file: Some(file.clone()),
            ..Overrides::default()
        };
        let c = load(over(), &[]).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/srv/a"));
        assert_eq!(c.http_listen.port(), 9000);
        let c = load(over(), &[("ONECARD_DATA_DIR", "/srv/b")]).unwrap();
        assert_eq!(c.database_url.to_string(), "sqlite:/srv/b/onecard.db");
        let c = load(
            Overrides {
                data_dir: Some("/srv/c".into()),
                ..over()
            },
            &[("ONECARD_DATA_DIR", "/srv/b")],
        )
        .unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/srv/c"));
    }

    #[test]
    fn typos_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "data_dri = \"x\"\n").unwrap();
        let e = load(
            Overrides {
                config_file: Some(file),
                ..Overrides::default()
            },
            &[],
        );
        assert!(format!("{:#}", e.unwrap_err()).contains("data_dri"));
        let e = load(Overrides::default(), &[("ONECARD_DATABSE_URL", "x")]).unwrap_err();
        assert!(e.to_string().contains("ONECARD_DATABSE_URL"));
        let e = load(
            Overrides::default(),
            &[("ONECARD_DATABASE_URL", "mysql://x")],
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("ONECARD_DATABASE_URL"));
        let e = load(
            Overrides {
                http_listen: Some("8080".into()),
                ..Overrides::default()
            },
            &[],
        );
        assert!(e.unwrap_err().to_string().contains("IP:PORT"));
    }
}
