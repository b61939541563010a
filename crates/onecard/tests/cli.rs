//! The binary as a user runs it: real processes, real files, a real TCP port.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn onecard(data: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_onecard"))
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .env_remove("ONECARD_DATABASE_URL")
        .env_remove("ONECARD_DATA_DIR")
        .env("ONECARD_LOG", "warn")
        .output()
        .expect("running onecard")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs onecard with `kek` in ONECARD_KEK (or none), and no other KEK setting.
fn with_kek(data: &Path, kek: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_onecard"));
    cmd.arg("--data-dir")
        .arg(data)
        .args(args)
        .env("ONECARD_LOG", "warn");
    cmd.env_remove("ONECARD_KEK").env_remove("ONECARD_KEK_FILE");
    if let Some(k) = kek {
        cmd.env("ONECARD_KEK", k);
    }
    cmd.output().expect("running onecard")
}

fn ok(data: &Path, args: &[&str]) -> String {
    let o = onecard(data, args);
    assert!(o.status.success(), "onecard {args:?} failed:\n{}", text(&o));
    text(&o)
}

fn fails(data: &Path, args: &[&str], code: i32, needle: &str) {
    let o = onecard(data, args);
    assert_eq!(
        o.status.code(),
        Some(code),
        "onecard {args:?}:\n{}",
        text(&o)
    );
    assert!(
        text(&o).contains(needle),
        "onecard {args:?} should say {needle:?}:\n{}",
        text(&o)
    );
}

const T1: &str = "0190a1b2-c3d4-7e5f-8a9b-000000000001";
const T2: &str = "0190a1b2-c3d4-7e5f-8a9b-000000000002";

#[test]
fn init_transfer_and_db_check_and_every_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    fails(&data, &["db-check"], 1, "onecard init");
    assert!(ok(&data, &["init"]).contains("schema version 14"));
    assert!(data.join("onecard.db").is_file());
    ok(&data, &["init"]);
    assert!(ok(&data, &["migrate"]).contains("up to date"));
    assert!(ok(&data, &["expire-holds"]).contains("released 0 expired holds"));
    assert!(
        ok(
            &data,
            &[
                "account",
                "create",
                "--kind",
                "bank_clearing",
                "--name",
                "bank:x"
            ]
        )
        .contains("account 1")
    );
    ok(&data, &["account", "create", "--kind", "cardholder_online"]);
    ok(&data, &["account", "create", "--kind", "merchant_payable"]);
    ok(
        &data,
        &[
            "transfer", "create", "--id", T1, "--debit", "1", "--credit", "2", "--amount", "5000",
        ],
    );
    // A retry is answered from the store and applies once.
    ok(
        &data,
        &[
            "transfer", "create", "--id", T1, "--debit", "1", "--credit", "2", "--amount", "5000",
        ],
    );
    assert!(ok(&data, &["account", "show", "2"]).contains("50.00 yuan (5000 fen)"));

    // Bad input: a clear error, and nothing changes.
    let t = |amount: &'static str, debit: &'static str| {
        vec![
            "transfer", "create", "--id", T2, "--debit", debit, "--credit", "3", "--amount", amount,
        ]
    };
    fails(&data, &t("0", "2"), 1, "amount must not be zero");
    fails(&data, &t("-5", "2"), 1, "amount must not be negative");
    fails(&data, &t("99999999999999999999", "2"), 2, "out of range");
    fails(&data, &t("1.5", "2"), 2, "whole number of fen");
    fails(&data, &t("5", "42"), 1, "debit account does not exist");
    fails(&data, &t("5", "0"), 2, "positive integer");
    fails(&data, &t("6000", "2"), 1, "insufficient balance");
    fails(
        &data,
        &[
            "transfer",
            "create",
            "--id",
            "not-a-uuid",
            "--debit",
            "2",
            "--credit",
            "3",
            "--amount",
            "1",
        ],
        2,
        "invalid transfer id",
    );
    fails(
        &data,
        &["account", "create", "--kind", "piggy_bank"],
        2,
        "unknown account kind",
    );
    fails(
        &data,
        &["account", "create", "--kind", "cash", "--name", "bank:x"],
        1,
        "exists already",
    );
    fails(
        &data,
        &["--database-url", "mysql://h/db", "db-check"],
        1,
        "invalid database URL",
    );
    fails(
        &data,
        &[
            "--database-url",
            "postgres://u:hunter2@h:port/db",
            "db-check",
        ],
        1,
        "invalid database URL",
    );
    let o = onecard(
        &data,
        &[
            "--database-url",
            "postgres://u:hunter2@h:port/db",
            "db-check",
        ],
    );
    assert!(!text(&o).contains("hunter2"), "a password was printed");
    assert!(ok(&data, &["account", "show", "3"]).contains("balance    0.00"));
    // The stored rejection (insufficient balance) is kept; the input rejections are not.
    assert!(ok(&data, &["transfer", "show", T2]).contains("insufficient_balance"));

    let check = ok(&data, &["db-check"]);
    assert!(check.contains("OK"), "{check}");

    // Corrupt one balance behind onecard's back: db-check must fail and name the account.
    let conn = rusqlite::Connection::open(data.join("onecard.db")).unwrap();
    conn.execute(
        "UPDATE accounts SET credits_posted = credits_posted + 7 WHERE id = 2",
        [],
    )
    .unwrap();
    drop(conn);
    fails(
        &data,
        &["db-check"],
        1,
        "account 2: credits_posted is 5007 but its transfers say 5000",
    );
    let json = onecard(&data, &["db-check", "--json"]);
    assert_eq!(json.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["bad_accounts"], serde_json::json!([2]));
}

#[test]
fn typo_in_environment_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_onecard"))
        .args(["--data-dir"])
        .arg(dir.path())
        .arg("init")
        .env("ONECARD_DATABSE_URL", "x")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        text(&o).contains("unknown environment variable ONECARD_DATABSE_URL"),
        "{}",
        text(&o)
    );
}

#[test]
fn demo_seeds_a_consistent_campus() {
    let dir = tempfile::tempdir().unwrap();
    let out = ok(dir.path(), &["demo", "--cardholders", "60", "--no-serve"]);
    assert!(out.contains("demo campus created"), "{out}");
    assert!(ok(dir.path(), &["demo", "--no-serve"]).contains("already present"));
    assert!(ok(dir.path(), &["db-check"]).contains("OK"));
    let list = ok(dir.path(), &["account", "list", "--limit", "200"]);
    assert!(list.contains("merchant:canteen-1"), "{list}");
}

fn http_get(port: u16, path: &str) -> (u16, serde_json::Value) {
    http(port, "GET", path, None, None)
}

/// One HTTP/1.1 request over TCP, with an optional bearer token and JSON body.
fn http(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let status: u16 = raw[9..12].parse().unwrap();
    let body = raw.split("\r\n\r\n").nth(1).unwrap_or("");
    // Bodies are small and sent whole (no chunking) by axum for JSON.
    (
        status,
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

#[test]
fn serve_answers_health_and_ledger_reads_over_tcp() {
    let dir = tempfile::tempdir().unwrap();
    ok(dir.path(), &["demo", "--cardholders", "5", "--no-serve"]);
    let password = dir.path().join("pw");
    std::fs::write(&password, "finance password\n").unwrap();
    let pw = password.to_str().unwrap();
    ok(
        dir.path(),
        &[
            "operator",
            "create",
            "--username",
            "fin",
            "--role",
            "finance",
            "--password-file",
            pw,
        ],
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_onecard"))
        .arg("--data-dir")
        .arg(dir.path())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("ONECARD_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port: u16 = line
        .split("http://127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"));
    let (status, health) = http_get(port, "/healthz");
    assert_eq!(
        (
            status,
            health["status"].as_str(),
            health["database"].as_str()
        ),
        (200, Some("ok"), Some("sqlite"))
    );
    // The ledger is behind a login.
    let (status, err) = http_get(port, "/api/v1/accounts/1");
    assert_eq!((status, err["code"].as_str()), (401, Some("unauthorized")));
    let credentials = |p: &str| serde_json::json!({"username": "fin", "password": p});
    let (status, err) = http(
        port,
        "POST",
        "/api/v1/login",
        None,
        Some(credentials("nope")),
    );
    assert_eq!((status, err["code"].as_str()), (401, Some("unauthorized")));
    let (status, session) = http(
        port,
        "POST",
        "/api/v1/login",
        None,
        Some(credentials("finance password")),
    );
    assert_eq!(status, 200, "{session}");
    let token = session["token"].as_str().unwrap();
    let get = |path: &str| http(port, "GET", path, Some(token), None);
    let (status, me) = get("/api/v1/me");
    assert_eq!((status, me["role"].as_str()), (200, Some("finance")));
    let (status, bank) = get("/api/v1/accounts/1");
    assert_eq!(status, 200);
    assert_eq!(bank["name"], "bank:demo-bank");
    assert!(
        bank["balance_fen"].as_i64().unwrap() < 0,
        "the bank clearing account paid out"
    );
    let (status, history) = get("/api/v1/accounts/11/transfers?limit=2");
    assert_eq!(status, 200);
    assert_eq!(history["transfers"].as_array().unwrap().len(), 2);
    let (status, err) = get("/api/v1/accounts/abc");
    assert_eq!(
        (status, err["code"].as_str()),
        (400, Some("invalid_account_id"))
    );
    // Finance may not manage operators.
    let (status, err) = get("/api/v1/operators");
    assert_eq!((status, err["code"].as_str()), (403, Some("forbidden")));
    // The server saw the client's address.
    let db = rusqlite::Connection::open(dir.path().join("onecard.db")).unwrap();
    let sources: Vec<String> = db
        .prepare("SELECT DISTINCT source FROM login_attempts")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(sources, ["127.0.0.1"]);
    child.kill().unwrap();
    child.wait().unwrap();
}

/// The same commands on PostgreSQL (a scratch database on ONECARD_TEST_PG_URL's server).
#[test]
fn commands_work_on_postgres() {
    let base = match std::env::var("ONECARD_TEST_PG_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI is set but ONECARD_TEST_PG_URL is not: PostgreSQL tests must not be skipped"
            );
            eprintln!("ONECARD_TEST_PG_URL is not set: PostgreSQL run not possible here");
            return;
        }
    };
    let name = format!("onecard_test_{}_cli", std::process::id());
    let server = store::DatabaseUrl::parse(&base).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(store::create_scratch_database(&server, &name))
        .unwrap();
    // The URL with its password, for the command line (Display would hide it).
    let (head, query) = base
        .split_once('?')
        .map_or((base.as_str(), ""), |(h, q)| (h, q));
    let head = &head[..head.rfind('/').unwrap()];
    let url = if query.is_empty() {
        format!("{head}/{name}")
    } else {
        format!("{head}/{name}?{query}")
    };

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let db = |args: &[&str]| {
        let mut all = vec!["--database-url", url.as_str()];
        all.extend_from_slice(args);
        all.iter().map(|s| s.to_string()).collect::<Vec<String>>()
    };
    let run_ok = |args: Vec<String>| ok(data, &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(run_ok(db(&["init"])).contains("schema version 14"));
    assert!(run_ok(db(&["migrate"])).contains("up to date"));
    run_ok(db(&["account", "create", "--kind", "bank_clearing"]));
    run_ok(db(&["account", "create", "--kind", "cardholder_online"]));
    run_ok(db(&[
        "transfer", "create", "--id", T1, "--debit", "1", "--credit", "2", "--amount", "700",
    ]));
    assert!(run_ok(db(&["account", "show", "2"])).contains("7.00 yuan (700 fen)"));
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "a postgres password").unwrap();
    run_ok(db(&[
        "operator",
        "create",
        "--username",
        "pgadmin",
        "--role",
        "administrator",
        "--password-file",
        pw.to_str().unwrap(),
    ]));
    let demote = db(&["operator", "role", "pgadmin", "auditor"]);
    fails(
        data,
        &demote.iter().map(String::as_str).collect::<Vec<_>>(),
        1,
        "last enabled administrator",
    );
    assert!(run_ok(db(&["operator", "list"])).contains("pgadmin"));
    let bad = db(&[
        "transfer", "create", "--id", T2, "--debit", "2", "--credit", "9", "--amount", "1",
    ]);
    fails(
        data,
        &bad.iter().map(String::as_str).collect::<Vec<_>>(),
        1,
        "credit account does not exist",
    );
    assert!(run_ok(db(&["db-check"])).contains("OK"));
    let shown = run_ok(db(&["init"]));
    assert!(
        !base.contains(':') || !shown.contains("onecard_test:onecard_test@"),
        "password printed: {shown}"
    );
    rt.block_on(store::drop_scratch_database(&server, &name))
        .unwrap();
}

#[test]
fn key_ceremony_list_rotate_and_a_wrong_or_missing_kek() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    ok(&data, &["init"]);
    let with_kek = |kek: Option<&str>, args: &[&str]| with_kek(&data, kek, args);
    let fresh = String::from_utf8(onecard(&data, &["keys", "new-kek"]).stdout).unwrap();
    let kek = fresh.trim();
    assert_eq!(kek.len(), 64);
    let missing = with_kek(None, &["keys", "list"]);
    assert!(!missing.status.success());
    assert!(
        text(&missing).contains("no key-encryption key"),
        "{}",
        text(&missing)
    );

    let made = with_kek(Some(kek), &["keys", "ceremony"]);
    assert!(made.status.success(), "{}", text(&made));
    let shown = text(&made);
    for kind in ["load", "purchase", "tac", "terminal-master", "bank-master"] {
        assert!(shown.contains(kind), "{shown}");
    }
    assert!(!shown.contains(kek), "the KEK was printed");
    let again = with_kek(Some(kek), &["keys", "ceremony"]);
    assert!(text(&again).contains("runs once"), "{}", text(&again));

    let rotated = with_kek(
        Some(kek),
        &["keys", "rotate", "--kind", "purchase", "--kind", "tac"],
    );
    assert!(
        text(&rotated).contains("added 2 new master key version(s)"),
        "{}",
        text(&rotated)
    );
    let list = text(&with_kek(Some(kek), &["keys", "list"]));
    assert_eq!(
        list.lines().filter(|l| l.starts_with("purchase")).count(),
        2,
        "{list}"
    );

    let other = "11".repeat(32);
    let wrong = with_kek(Some(&other), &["keys", "list"]);
    assert!(text(&wrong).contains("wrong KEK"), "{}", text(&wrong));
    let typo = with_kek(Some("not-hex"), &["keys", "list"]);
    assert!(text(&typo).contains("64 hex digits"), "{}", text(&typo));
    let kind = with_kek(Some(kek), &["keys", "rotate", "--kind", "pruchase"]);
    assert!(text(&kind).contains("unknown key kind"), "{}", text(&kind));

    // At rest the keys are wrapped: 24 bytes each, and the database holds no KEK.
    let conn = rusqlite::Connection::open(data.join("onecard.db")).unwrap();
    let lens: Vec<i64> = conn
        .prepare("SELECT length(wrapped) FROM master_keys")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(lens, vec![24; 7]);
}

#[test]
fn card_files_are_personalised_from_the_security_module() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    ok(&data, &["init"]);
    let kek = "ab".repeat(32);
    let run = |args: &[&str]| with_kek(&data, Some(&kek), args);
    let card = dir.path().join("alice.card");
    let card_arg = card.to_str().unwrap();
    let asn = "10000000000000000001";
    let before = run(&[
        "card", "create", "--file", card_arg, "--asn", asn, "--pin", "2468",
    ]);
    assert!(
        text(&before).contains("run `onecard keys ceremony`"),
        "{}",
        text(&before)
    );
    assert!(run(&["keys", "ceremony"]).status.success());

    let made = run(&[
        "card", "create", "--file", card_arg, "--asn", asn, "--start", "20260901", "--pin", "2468",
    ]);
    assert!(made.status.success(), "{}", text(&made));
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&card).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let balance = text(&run(&["card", "balance", "--file", card_arg]));
    assert!(
        balance.contains(asn) && balance.contains("0.00 yuan (0 fen)"),
        "{balance}"
    );
    assert!(balance.contains("maximum   1000.00 yuan"), "{balance}");
    assert!(text(&run(&["card", "history", "--file", card_arg])).contains("no transactions"));

    // Bad input: no PIN, an existing file, a malformed ASN or date, a damaged card file.
    let no_pin = run(&["card", "create", "--file", "x.card", "--asn", asn]);
    assert!(text(&no_pin).contains("--pin"), "{}", text(&no_pin));
    let again = run(&[
        "card", "create", "--file", card_arg, "--asn", asn, "--pin", "2468",
    ]);
    assert!(text(&again).contains("must not exist"), "{}", text(&again));
    let other = dir.path().join("bob.card");
    let other_arg = other.to_str().unwrap();
    let bad_asn = run(&[
        "card", "create", "--file", other_arg, "--asn", "12ab", "--pin", "2468",
    ]);
    assert!(text(&bad_asn).contains("invalid ASN"), "{}", text(&bad_asn));
    let bad_date = run(&[
        "card", "create", "--file", other_arg, "--asn", asn, "--expiry", "20261340", "--pin",
        "2468",
    ]);
    assert!(
        text(&bad_date).contains("not a calendar date"),
        "{}",
        text(&bad_date)
    );
    assert!(!other.exists(), "a refused card leaves no file");
    let mut bytes = std::fs::read(&card).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&other, &bytes).unwrap();
    let damaged = run(&["card", "balance", "--file", other_arg]);
    assert!(
        text(&damaged).contains("is not a valid card file"),
        "{}",
        text(&damaged)
    );
}

#[test]
fn a_card_file_serves_the_vpcd_protocol_and_is_saved() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    ok(&data, &["init"]);
    let kek = "cd".repeat(32);
    let run = |args: &[&str]| with_kek(&data, Some(&kek), args);
    assert!(run(&["keys", "ceremony"]).status.success());
    let card = dir.path().join("c.card");
    let card_arg = card.to_str().unwrap().to_owned();
    assert!(
        run(&[
            "card",
            "create",
            "--file",
            &card_arg,
            "--asn",
            "10000000000000000005",
            "--pin",
            "2468",
        ])
        .status
        .success()
    );
    let before = std::fs::read(&card).unwrap();

    // A fake vpcd driver: ATR, SELECT the purse, a VERIFY with a wrong PIN (which the card
    // remembers: one try fewer), then it hangs up.
    let driver = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = driver.local_addr().unwrap().to_string();
    let child = Command::new(env!("CARGO_BIN_EXE_onecard"))
        .arg("--data-dir")
        .arg(&data)
        .args(["card", "serve-vpcd", "--file", &card_arg, "--vpcd", &addr])
        .env("ONECARD_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (mut conn, _) = driver.accept().unwrap();
    let mut exchange = |body: &[u8], answer: bool| -> Vec<u8> {
        let mut msg = (body.len() as u16).to_be_bytes().to_vec();
        msg.extend_from_slice(body);
        conn.write_all(&msg).unwrap();
        if !answer {
            return Vec::new();
        }
        let mut len = [0u8; 2];
        conn.read_exact(&mut len).unwrap();
        let mut out = vec![0u8; u16::from_be_bytes(len) as usize];
        conn.read_exact(&mut out).unwrap();
        out
    };
    exchange(&[0x01], false);
    assert_eq!(exchange(&[0x04], true)[0], 0x3B);
    let select = exchange(
        &[
            0x00, 0xA4, 0x04, 0x00, 0x09, 0xA0, 0, 0, 0, 0x03, 0x86, 0x98, 0x07, 0x01,
        ],
        true,
    );
    assert_eq!(&select[select.len() - 2..], &[0x90, 0x00]);
    let verify = exchange(&[0x00, 0x20, 0x00, 0x00, 0x03, 0x99, 0x99, 0x99], true);
    assert_eq!(verify[0], 0x63, "wrong PIN: 63Cx");
    drop(conn);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("after 2 commands"));
    assert_ne!(
        std::fs::read(&card).unwrap(),
        before,
        "the PIN try was saved to the card file"
    );
}

#[test]
fn the_card_desk_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(d, &["init"]);
    ok(
        d,
        &[
            "stock",
            "receive",
            "--first",
            "10000000000000000001",
            "--count",
            "20",
            "--batch",
            "b1",
        ],
    );
    ok(
        d,
        &[
            "stock",
            "initialise",
            "--first",
            "10000000000000000001",
            "--count",
            "3",
        ],
    );
    fails(
        d,
        &[
            "stock",
            "void",
            "--first",
            "10000000000000000001",
            "--count",
            "25",
            "--reason",
            "x",
        ],
        1,
        "17 blank, 3 initialised, 5 not in stock",
    );
    let csv = d.join("people.csv");
    std::fs::write(
        &csv,
        "number,name,kind,department,id_number,phone\n\
         1,张三,学生,物理系,110101200001011234,13812345678\n\
         2,李四,staff,化学系,,\n\
         3,,student,x,,\n\
         4,王五,student,数学系,,\n\
         5,赵六,student,数学系,,\n",
    )
    .unwrap();
    let errors = d.join("errors.csv");
    let out = ok(
        d,
        &[
            "cardholder",
            "import",
            csv.to_str().unwrap(),
            "--issue-cards",
            "--errors-out",
            errors.to_str().unwrap(),
        ],
    );
    assert!(
        out.contains("5 rows: 3 imported, 3 cards issued, 2 not imported"),
        "{out}"
    );
    assert!(out.contains("line 4 (3): name is empty"), "{out}");
    assert!(out.contains("line 6 (5): no initialised card"), "{out}");
    let written = std::fs::read_to_string(&errors).unwrap();
    assert!(
        written.starts_with("line,number,error\n4,3,name is empty\n"),
        "{written}"
    );
    // Lists are masked.
    let found = ok(d, &["cardholder", "search", "张"]);
    assert!(
        found.contains("1101**********1234") && !found.contains("13812345678"),
        "{found}"
    );
    ok(
        d,
        &[
            "online",
            "top-up",
            "--cardholder",
            "1",
            "--amount-fen",
            "5000",
            "--key",
            "k1",
        ],
    );
    ok(d, &["card", "loss", "10000000000000000001"]);
    fails(d, &["card", "loss", "10000000000000000001"], 1, "is lost");
    fails(
        d,
        &["card", "replace", "10000000000000000001"],
        1,
        "no initialised card is left",
    );
    ok(
        d,
        &[
            "stock",
            "initialise",
            "--first",
            "10000000000000000004",
            "--count",
            "2",
        ],
    );
    let replaced = ok(d, &["card", "replace", "10000000000000000001", "--json"]);
    let replaced: serde_json::Value = serde_json::from_str(&replaced).unwrap();
    assert_eq!(replaced["card"]["status"], "replaced");
    assert_eq!(replaced["new_card"]["asn"], "10000000000000000004");
    let cancelled = ok(d, &["card", "cancel", "10000000000000000004"]);
    assert!(
        cancelled.contains("refund_online: 50.00") && cancelled.contains("refund_deposit: 20.00"),
        "{cancelled}"
    );
    let blacklist = ok(d, &["blacklist", "--json"]);
    let blacklist: serde_json::Value = serde_json::from_str(&blacklist).unwrap();
    assert_eq!(blacklist["version"], 2);
    let events = ok(d, &["card", "events", "10000000000000000001"]);
    assert!(
        events.contains("report_loss") && events.contains("replace"),
        "{events}"
    );
    fails(
        d,
        &["card", "show", "12x"],
        1,
        "must be an ASN (20 digits) or a card id",
    );
    fails(
        d,
        &["cardholder", "import", "/nonexistent.csv"],
        1,
        "reading /nonexistent.csv",
    );
    assert!(ok(d, &["db-check"]).contains("OK"));
    assert!(ok(d, &["audit", "verify"]).contains("audit log intact"));
    let log = ok(d, &["audit", "list", "--action", "card.cancel", "--json"]);
    let log: serde_json::Value = serde_json::from_str(&log).unwrap();
    assert_eq!(log.as_array().unwrap().len(), 1);
    assert!(log[0]["actor"].as_str().unwrap().starts_with("cli:"));
}

/// Runs onecard with ONECARD_OPERATOR_PASSWORD set (or removed).
fn with_password(data: &Path, password: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_onecard"));
    cmd.arg("--data-dir")
        .arg(data)
        .args(args)
        .env("ONECARD_LOG", "warn")
        .env_remove("ONECARD_OPERATOR_PASSWORD");
    if let Some(p) = password {
        cmd.env("ONECARD_OPERATOR_PASSWORD", p);
    }
    cmd.output().expect("running onecard")
}

#[test]
fn operators_are_managed_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    ok(&data, &["init"]);
    let shop = ok(&data, &["account", "create", "--kind", "merchant_payable"]);
    assert!(shop.contains("account 1"), "{shop}");
    let file = dir.path().join("pw");
    std::fs::write(&file, "root password 1\r\n").unwrap();
    let pw = file.to_str().unwrap();

    let out = ok(
        &data,
        &[
            "operator",
            "create",
            "--username",
            "root",
            "--role",
            "administrator",
            "--password-file",
            pw,
        ],
    );
    assert!(
        out.contains("created operator 1 root (administrator)"),
        "{out}"
    );
    let o = with_password(
        &data,
        Some("till password"),
        &[
            "operator",
            "create",
            "--username",
            "till",
            "--role",
            "merchant-operator",
            "--merchant",
            "1",
            "--display-name",
            "Canteen till",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("merchant account 1"), "{}", text(&o));

    // Bad input: what was wrong, and nothing created.
    let create = |user: &'static str, role: &'static str| {
        vec!["operator", "create", "--username", user, "--role", role]
    };
    let o = with_password(&data, None, &create("nopw", "finance"));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("ONECARD_OPERATOR_PASSWORD"),
        "{}",
        text(&o)
    );
    let o = with_password(&data, Some("short"), &create("weak", "finance"));
    assert!(text(&o).contains("at least 10"), "{}", text(&o));
    let o = with_password(&data, Some("long enough pw"), &create("root", "finance"));
    assert!(text(&o).contains("exists already"), "{}", text(&o));
    let o = with_password(
        &data,
        Some("long enough pw"),
        &create("x2x", "merchant_operator"),
    );
    assert!(text(&o).contains("merchant account"), "{}", text(&o));
    fails(&data, &create("x3x", "boss"), 2, "unknown role");
    let mut with_flag = create("x4x", "finance");
    with_flag.extend(["--password", "visible to all"]);
    fails(&data, &with_flag, 2, "unexpected argument '--password'");
    fails(
        &data,
        &[
            "operator",
            "create",
            "--username",
            "x5x",
            "--role",
            "finance",
            "--password-file",
            "/nonexistent/pw",
        ],
        1,
        "reading the password file /nonexistent/pw",
    );

    let list = ok(&data, &["operator", "list"]);
    assert!(list.starts_with("ID"), "{list}");
    assert!(
        list.contains("till") && list.contains("Canteen till"),
        "{list}"
    );
    assert_eq!(list.lines().count(), 3, "{list}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(&data, &["operator", "list", "--json"])).unwrap();
    assert_eq!(json[1]["merchant_account_id"], 1);

    assert!(ok(&data, &["operator", "disable", "till"]).contains("disabled"));
    assert!(ok(&data, &["operator", "enable", "till"]).contains("enabled operator 2"));
    fails(
        &data,
        &["operator", "disable", "root"],
        1,
        "last enabled administrator",
    );
    fails(
        &data,
        &["operator", "disable", "ghost"],
        1,
        "no operator named \"ghost\"",
    );
    let out = ok(&data, &["operator", "role", "till", "finance"]);
    assert!(out.contains("(finance)"), "{out}");
    let o = with_password(
        &data,
        Some("a fresh password"),
        &["operator", "passwd", "till"],
    );
    assert!(o.status.success(), "{}", text(&o));

    // The changes are in the audit log, which is intact, and no password is stored.
    let db = rusqlite::Connection::open(data.join("onecard.db")).unwrap();
    let actions: Vec<String> = db
        .prepare("SELECT action FROM audit_log ORDER BY seq")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        actions,
        [
            "operator.create",
            "operator.create",
            "operator.disable",
            "operator.enable",
            "operator.role",
            "operator.password"
        ]
    );
    let everything: String = db
        .query_row(
            "SELECT group_concat(actor || summary || source) FROM audit_log",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(everything.contains("cli:"), "{everything}");
    for secret in ["root password 1", "till password", "a fresh password"] {
        assert!(
            !everything.contains(secret),
            "{secret:?} is in the audit log"
        );
    }
}

#[test]
fn terminals_and_the_pos_simulator_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let kek = "2b7e151628aed2a6abf7158809cf4f3c2b7e151628aed2a6abf7158809cf4f3c";
    let run = |args: &[&str]| {
        let o = with_kek(d, Some(kek), args);
        assert!(o.status.success(), "onecard {args:?} failed:\n{}", text(&o));
        text(&o)
    };
    run(&["init"]);
    run(&["keys", "ceremony"]);
    // Registry: bad input refused with the reason, good input listed.
    let o = with_kek(
        d,
        Some(kek),
        &[
            "terminal",
            "register",
            "--terminal-no",
            "12",
            "--kind",
            "pos",
            "--location",
            "x",
        ],
    );
    assert!(
        !o.status.success() && text(&o).contains("must be 12 hexadecimal digits"),
        "{}",
        text(&o)
    );
    let o = with_kek(
        d,
        Some(kek),
        &[
            "terminal",
            "register",
            "--terminal-no",
            "000000000042",
            "--kind",
            "pos",
            "--location",
            "x",
        ],
    );
    assert!(
        !o.status.success() && text(&o).contains("merchant"),
        "{}",
        text(&o)
    );
    // The simulator sells online, then offline, and the books still balance.
    let out = run(&[
        "sim",
        "pos",
        "--terminals",
        "2",
        "--cards",
        "10",
        "--rate",
        "20",
        "--seconds",
        "1",
    ]);
    assert!(
        out.contains("sales tried 20") && out.contains("quarantined 0"),
        "{out}"
    );
    let out = run(&[
        "sim",
        "pos",
        "--terminals",
        "2",
        "--cards",
        "10",
        "--rate",
        "20",
        "--seconds",
        "1",
        "--mode",
        "offline",
        "--first-terminal",
        "900050000101",
        "--first-asn",
        "90000000000000000101",
    ]);
    assert!(out.contains("records posted 20"), "{out}");
    let list = run(&["terminal", "list"]);
    assert_eq!(
        list.lines().filter(|l| l.contains("simulated POS")).count(),
        4,
        "{list}"
    );
    // A second run on the same numbers is refused with the reason.
    let o = with_kek(
        d,
        Some(kek),
        &[
            "sim",
            "pos",
            "--terminals",
            "1",
            "--cards",
            "1",
            "--rate",
            "1",
            "--seconds",
            "1",
        ],
    );
    assert!(
        !o.status.success() && text(&o).contains("registered already"),
        "{}",
        text(&o)
    );
    assert!(run(&["db-check"]).contains("OK"));
    assert!(run(&["audit", "verify"]).contains("intact"));
    // Without the KEK the simulator says what it needs.
    let o = with_kek(d, None, &["sim", "pos"]);
    assert!(
        !o.status.success() && text(&o).contains("needs the KEK"),
        "{}",
        text(&o)
    );
}

/// Reads `child`'s stdout until a line contains `marker`; returns the word after it.
fn address_after(child: &mut std::process::Child, marker: &str) -> String {
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "no line with {marker:?}"
        );
        if let Some(rest) = line.split(marker).nth(1) {
            let addr = rest.split_whitespace().next().unwrap().to_owned();
            // Keep draining its output so it never blocks on a full pipe.
            std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
            return addr;
        }
    }
}

#[test]
fn a_commerce_gateway_between_simulated_pos_and_the_centre() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let kek = "2b7e151628aed2a6abf7158809cf4f3c2b7e151628aed2a6abf7158809cf4f3c";
    let run = |args: &[&str]| {
        let o = with_kek(d, Some(kek), args);
        assert!(o.status.success(), "onecard {args:?} failed:\n{}", text(&o));
        text(&o)
    };
    let refused = |args: &[&str], needle: &str| {
        let o = with_kek(d, Some(kek), args);
        assert!(
            !o.status.success() && text(&o).contains(needle),
            "onecard {args:?} should say {needle:?}:\n{}",
            text(&o)
        );
    };
    run(&["init"]);
    run(&["keys", "ceremony"]);
    run(&[
        "terminal",
        "register",
        "--terminal-no",
        "900060000001",
        "--kind",
        "gateway",
        "--psam",
        "GW0001",
        "--location",
        "canteen 2",
    ]);
    refused(
        &[
            "terminal",
            "register",
            "--terminal-no",
            "900050000009",
            "--kind",
            "kiosk",
            "--location",
            "x",
            "--gateway",
            "900050000001",
        ],
        "is not registered",
    );
    // The gateway's TMK: written once, readable by its owner only, audited.
    let tmk = d.join("gateway.tmk");
    let tmk_s = tmk.to_str().unwrap();
    assert!(run(&["terminal", "tmk", "900060000001", "--out", tmk_s]).contains("check value"));
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&tmk).unwrap().permissions().mode() & 0o777,
        0o600
    );
    refused(
        &["terminal", "tmk", "900060000001", "--out", tmk_s],
        "must not exist yet",
    );
    refused(
        &[
            "terminal",
            "tmk",
            "900060000077",
            "--out",
            d.join("x").to_str().unwrap(),
        ],
        "not registered",
    );
    assert!(run(&["audit", "list"]).contains("terminal.tmk_exported"));
    // The gateway's own errors say what is wrong.
    let bad = d.join("bad.tmk");
    std::fs::write(&bad, "not a key\n").unwrap();
    let gw_args = |tmk: &str, centre: &str| {
        vec![
            "gateway".to_owned(),
            "--centre".into(),
            centre.into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--terminal".into(),
            "900060000001".into(),
            "--serial".into(),
            "GW0001".into(),
            "--tmk-file".into(),
            tmk.into(),
            "--outbox".into(),
            d.join("gateway.sqlite").to_str().unwrap().into(),
        ]
    };
    let args = gw_args(bad.to_str().unwrap(), "127.0.0.1:1");
    refused(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        "chmod 600",
    );
    std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o600)).unwrap();
    let args = gw_args(bad.to_str().unwrap(), "127.0.0.1:1");
    refused(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        "32 hex digits",
    );
    let args = gw_args(tmk_s, "no-port-here");
    refused(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        "not host:port",
    );

    // Three processes: the centre, the gateway, the simulated POS selling through the gateway.
    let spawn = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_onecard"));
        cmd.arg("--data-dir")
            .arg(d)
            .args(args)
            .env("ONECARD_LOG", "warn")
            .env("ONECARD_KEK", kek)
            .stdout(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.spawn().unwrap()
    };
    let mut centre = spawn(
        &["serve", "--listen", "127.0.0.1:0"],
        &[("ONECARD_POSP_LISTEN", "127.0.0.1:0")],
    );
    let centre_addr = address_after(&mut centre, "terminal front end on ");
    let args = gw_args(tmk_s, &centre_addr);
    let mut gateway = spawn(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    let gateway_addr = address_after(&mut gateway, "listening on ");
    let out = run(&[
        "sim",
        "pos",
        "--posp",
        &gateway_addr,
        "--gateway",
        "900060000001",
        "--terminals",
        "2",
        "--cards",
        "10",
        "--rate",
        "20",
        "--seconds",
        "1",
        "--mode",
        "offline",
    ]);
    assert!(out.contains("records posted 20"), "{out}");
    let db = rusqlite::Connection::open(d.join("onecard.db")).unwrap();
    let mut arrived = 0;
    for _ in 0..300 {
        arrived = db
            .query_row(
                "SELECT count(*) FROM offline_records WHERE status = 0",
                [],
                |r| r.get::<_, i64>(0),
            )
            .unwrap();
        if arrived == 20 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(
        arrived, 20,
        "the gateway forwarded every record to the centre"
    );
    gateway.kill().unwrap();
    centre.kill().unwrap();
    let _ = (gateway.wait(), centre.wait());
    let list = run(&["terminal", "list"]);
    assert_eq!(
        list.lines()
            .filter(|l| l.contains("via 900060000001"))
            .count(),
        2,
        "{list}"
    );
    assert!(run(&["db-check"]).contains("OK"));
    assert!(run(&["audit", "verify"]).contains("intact"));
}

#[test]
fn the_bank_simulator_starts_and_says_what_it_holds() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let kek = "2b7e151628aed2a6abf7158809cf4f3c2b7e151628aed2a6abf7158809cf4f3c";
    assert!(with_kek(d, Some(kek), &["init"]).status.success());
    let o = with_kek(d, None, &["sim", "bank", "--listen", "127.0.0.1:0"]);
    assert!(
        !o.status.success() && text(&o).contains("needs the KEK"),
        "{}",
        text(&o)
    );
    assert!(
        with_kek(d, Some(kek), &["keys", "ceremony"])
            .status
            .success()
    );
    let o = with_kek(d, Some(kek), &["sim", "bank", "--accounts", "0"]);
    assert!(
        !o.status.success() && text(&o).contains("--accounts must be"),
        "{}",
        text(&o)
    );
    let mut bank = Command::new(env!("CARGO_BIN_EXE_onecard"))
        .arg("--data-dir")
        .arg(d)
        .args(["sim", "bank", "--listen", "127.0.0.1:0", "--accounts", "3"])
        .env("ONECARD_LOG", "warn")
        .env("ONECARD_KEK", kek)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let addr = address_after(&mut bank, " on ");
    assert!(
        TcpStream::connect(addr.trim_end_matches(':')).is_ok(),
        "listening on {addr}"
    );
    bank.kill().unwrap();
    let _ = bank.wait();
}
