//! `onecard reconcile` through the real binary: a missing file, a small file with a match and
//! a difference, the queue, a resolution, and db-check afterwards.

use std::path::Path;
use std::process::{Command, Output};

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

fn ok(data: &Path, args: &[&str]) -> String {
    let o = onecard(data, args);
    assert!(o.status.success(), "onecard {args:?} failed:\n{}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn run_list_and_resolve_a_day_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let files = dir.path().join("incoming");
    std::fs::create_dir_all(&files).unwrap();
    ok(&data, &["init"]);
    let holder: serde_json::Value = serde_json::from_str(&ok(
        &data,
        &[
            "cardholder",
            "create",
            "--number",
            "S0001",
            "--name",
            "Li Lei",
            "--kind",
            "student",
            "--department",
            "Physics",
            "--json",
        ],
    ))
    .unwrap();
    let (holder_id, online) = (
        holder["id"].as_i64().unwrap(),
        holder["online_account"].as_i64().unwrap(),
    );
    // A refused top-up the bank nevertheless debited, and one that matches.
    let db = rusqlite::Connection::open(data.join("onecard.db")).unwrap();
    for (stan, state, amount) in [("000001", 6, 500), ("000002", 6, 700)] {
        db.execute(
            "INSERT INTO bank_topups (origin, kind, state, bank_id, batch, stan, pan, \
             cardholder_id, amount_fen, settle_date, requested_at, updated_at) \
             VALUES (?1, 0, ?2, '01040000', '261103', ?3, '6222020200000000001', ?4, ?5, \
             '20261103', 0, 0)",
            rusqlite::params![format!("t{stan}"), state, stan, holder_id, amount],
        )
        .unwrap();
    }
    drop(db);
    let day = [
        "reconcile",
        "run",
        "--bank",
        "01040000",
        "--date",
        "2026-11-03",
        "--dir",
    ];
    let mut run: Vec<&str> = day.to_vec();
    run.push(files.to_str().unwrap());

    // Late: the file is not there yet.
    let o = onecard(&data, &run);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("BANK0104000020261103.txt"),
        "{}",
        text(&o)
    );
    assert!(text(&o).contains("stays open"), "{}", text(&o));

    let line = |stan: &str, amount: u32, status: &str| {
        format!(
            "D|20261103|R{stan}|261103{stan}|K0000001|622202******0001|{online}|{amount:09}|\
             LOAD|20261103101010|{status}\n"
        )
    };
    std::fs::write(
        files.join("BANK0104000020261103.txt"),
        format!(
            "H|01040000|20261103|2|500\n{}{}T|2|500\n",
            line("000001", 500, "OK"),
            line("000002", 700, "REVERSED")
        ),
    )
    .unwrap();
    let out = ok(&data, &run);
    assert!(out.contains("bank_only"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("bank_only") && l.trim_end().ends_with(" 1")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("matched") && l.trim_end().ends_with(" 1")),
        "{out}"
    );
    run.push("--json");
    let again: serde_json::Value = serde_json::from_str(&ok(&data, &run)).unwrap();
    assert_eq!(again["run"]["runs"], 2);
    assert_eq!(again["items_kept"], 1);
    assert_eq!(again["run"]["counts"]["bank_only"], 1);

    let items: serde_json::Value = serde_json::from_str(&ok(
        &data,
        &[
            "reconcile",
            "items",
            "--bank",
            "01040000",
            "--open",
            "--json",
        ],
    ))
    .unwrap();
    let items = items.as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["class"], "bank_only");
    let id = items[0]["id"].as_i64().unwrap().to_string();
    assert!(ok(&data, &["reconcile", "items"]).contains("bank_only"));

    let o = onecard(
        &data,
        &["reconcile", "resolve", &id, "--action", "write-off"],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("reason"), "{}", text(&o));
    let done = ok(&data, &["reconcile", "resolve", &id, "--action", "credit"]);
    assert!(done.contains("5.00 moved"), "{done}");
    let account: serde_json::Value = serde_json::from_str(&ok(
        &data,
        &["account", "show", &online.to_string(), "--json"],
    ))
    .unwrap();
    assert_eq!(account["balance_fen"], 500, "{account}");
    let o = onecard(&data, &["reconcile", "resolve", &id, "--action", "credit"]);
    assert!(text(&o).contains("resolved already"), "{}", text(&o));
    let show = ok(
        &data,
        &[
            "reconcile",
            "show",
            "--bank",
            "01040000",
            "--date",
            "20261103",
        ],
    );
    assert!(show.contains("0 open, 1 resolved"), "{show}");
    assert!(ok(&data, &["db-check"]).contains("OK"));
}
