//! Bank top-up with real processes: `onecard sim bank` (losing the answer to the first
//! transfer and refusing the first reversals), `onecard serve` with the bank link and the
//! terminal front end, and a simulated kiosk in this test topping up a card file made by
//! `onecard card create`. The server is killed while the reversal is still owed and started
//! again: the reversal goes out from the journal and the bank returns the money. A second
//! top-up through the restarted server reaches the card. The bank's reconciliation file,
//! written when it stops, shows one transfer reversed and one kept, and reconciles with the
//! campus side; the server also signs off at the agreed time and reconciles the day itself.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const KEK: &str = "2b7e151628aed2a6abf7158809cf4f3c2b7e151628aed2a6abf7158809cf4f3c";
const BANK: &str = "01040000";
const KIOSK: &str = "000000009001";
const PSAM: &str = "KIOSK9001";
const ASN: &str = "10000000000000000001";

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn onecard(d: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_onecard"))
        .arg("--data-dir")
        .arg(d)
        .args(args)
        .env("ONECARD_LOG", "warn")
        .env("ONECARD_KEK", KEK)
        .env_remove("ONECARD_KEK_FILE")
        .output()
        .expect("running onecard")
}

fn ok(d: &Path, args: &[&str]) -> String {
    let o = onecard(d, args);
    assert!(o.status.success(), "onecard {args:?} failed:\n{}", text(&o));
    text(&o)
}

fn spawn(d: &Path, args: &[&str], env: &[(&str, &str)]) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_onecard"));
    cmd.arg("--data-dir")
        .arg(d)
        .args(args)
        .env("ONECARD_LOG", "warn")
        .env("ONECARD_KEK", KEK)
        .stdout(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

/// The address printed after `marker` on a line of the child's output (the rest drained).
fn address_after(child: &mut Child, marker: &str) -> String {
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "no line with {marker:?}"
        );
        if let Some(rest) = line.split(marker).nth(1) {
            let addr = rest
                .split_whitespace()
                .next()
                .unwrap()
                .trim_end_matches([':', ','])
                .to_owned();
            std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
            return addr;
        }
    }
}

fn state(d: &Path, id: i64) -> String {
    let out = ok(d, &["topup", "show", &id.to_string(), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["state"].as_str().unwrap().to_owned()
}

#[test]
fn a_kiosk_top_up_whose_reversal_outlives_a_crash_of_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let path = |name: &str| d.join(name).to_str().unwrap().to_owned();
    ok(d, &["init"]);
    ok(d, &["keys", "ceremony"]);
    ok(
        d,
        &[
            "stock", "receive", "--first", ASN, "--count", "1", "--batch", "b1",
        ],
    );
    ok(d, &["stock", "initialise", "--first", ASN, "--count", "1"]);
    std::fs::write(
        d.join("people.csv"),
        "number,name,kind,department\n2026001,韩梅梅,student,化学系\n",
    )
    .unwrap();
    ok(
        d,
        &["cardholder", "import", &path("people.csv"), "--issue-cards"],
    );
    let pan = sim::bank::pan(1);
    ok(
        d,
        &["bank", "bind", "2026001", "--bank", BANK, "--pan", &pan],
    );
    ok(
        d,
        &[
            "terminal",
            "register",
            "--terminal-no",
            KIOSK,
            "--kind",
            "kiosk",
            "--psam",
            PSAM,
            "--location",
            "library",
        ],
    );
    ok(d, &["terminal", "tmk", KIOSK, "--out", &path("kiosk.tmk")]);
    ok(
        d,
        &[
            "card",
            "create",
            "--file",
            &path("c.card"),
            "--asn",
            ASN,
            "--pin",
            "2468",
        ],
    );
    let tmk_hex = std::fs::read_to_string(d.join("kiosk.tmk")).unwrap();
    let tmk = card::crypto::Tdes2Key::from_slice(
        &app::security::unhex(tmk_hex.split_whitespace().next().unwrap()).unwrap(),
    )
    .unwrap();
    let mut card =
        card::soft_card::SoftCard::from_bytes(&std::fs::read(d.join("c.card")).unwrap()).unwrap();

    // The bank loses the answer to the first transfer and cannot take the first two
    // reversals.
    let files = d.join("bank-files");
    std::fs::create_dir(&files).unwrap();
    let mut bank = spawn(
        d,
        &[
            "sim",
            "bank",
            "--listen",
            "127.0.0.1:0",
            "--accounts",
            "1",
            "--fault",
            "no-answer",
            "--fault-times",
            "1",
            "--reversal-fault",
            "decline:96",
            "--reversal-fault-times",
            "2",
            "--reconciliation-dir",
            files.to_str().unwrap(),
        ],
        &[],
    );
    let bank_addr = address_after(&mut bank, " on ");
    std::fs::write(
        d.join("onecard.toml"),
        format!(
            "utc_offset_minutes = 0\n[topup]\nreversal_attempts = 10\n\n[[bank]]\nid = \"{BANK}\"\n\
             address = \"{bank_addr}\"\nterminal_id = \"CAMPUS01\"\nmerchant_id = \"104110000000001\"\n\
             timeout_ms = 800\nsign_off_at = \"00:00\"\nreconciliation_dir = \"{}\"\n",
            files.display()
        ),
    )
    .unwrap();
    let config = path("onecard.toml");
    let serve = |d: &Path| {
        let mut s = spawn(
            d,
            &["--config", &config, "serve", "--listen", "127.0.0.1:0"],
            &[("ONECARD_POSP_LISTEN", "127.0.0.1:0")],
        );
        let addr = address_after(&mut s, "terminal front end on ");
        (s, addr)
    };
    let (mut server, posp) = serve(d);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut rng = card::random::SeededRandom::new(9);
    let out = rt.block_on(async {
        let mut kiosk = sim::kiosk::Kiosk::sign_in(&posp, KIOSK, PSAM, &tmk)
            .await
            .unwrap();
        kiosk
            .top_up(&mut card, &mut rng, &pan, "123456", 3_000)
            .await
            .unwrap()
    });
    assert_eq!(out.code, "98", "no answer from the bank: nothing credited");
    let id = out.topup_id.unwrap();
    // The server dies with the reversal still owed (the bank refused the first try).
    server.kill().unwrap();
    let _ = server.wait();
    assert_eq!(state(d, id), "reversing");
    assert!(ok(d, &["topup", "list", "--state", "reversing"]).contains(&pan[15..]));

    // Started again, it sends the reversal from its journal until the bank takes it.
    let (mut server, posp) = serve(d);
    let deadline = Instant::now() + Duration::from_secs(40);
    while state(d, id) != "reversed" {
        assert!(Instant::now() < deadline, "not reversed: {}", state(d, id));
        std::thread::sleep(Duration::from_millis(200));
    }
    // A top-up through the restarted server reaches the card, by `onecard sim kiosk` with
    // the card file.
    std::fs::remove_file(d.join("c.card")).unwrap();
    std::fs::write(d.join("c.card"), card.to_bytes().as_slice()).unwrap();
    let (tmk_path, card_path) = (path("kiosk.tmk"), path("c.card"));
    let kiosk = |more: &[&str]| {
        let mut args = vec![
            "sim",
            "kiosk",
            "--posp",
            &posp,
            "--terminal",
            KIOSK,
            "--psam",
            PSAM,
            "--tmk-file",
            &tmk_path,
            "--card",
            &card_path,
        ];
        args.extend_from_slice(more);
        ok(d, &args)
    };
    let out = kiosk(&[
        "--pan",
        &pan,
        "--pin",
        "123456",
        "--amount-fen",
        "1500",
        "--trace",
        "50",
    ]);
    assert!(out.contains("card balance 0 → 1500 fen"), "{out}");
    let loaded: i64 = out
        .lines()
        .find_map(|l| l.strip_prefix("top-up ")?.split(':').next()?.parse().ok())
        .unwrap();
    assert!(
        out.contains(&format!("load of top-up {loaded}: 00")),
        "{out}"
    );
    assert_eq!(state(d, loaded), "loaded");
    assert!(ok(d, &["card", "balance", "--file", &card_path]).contains("1500"));
    let out = kiosk(&["--trace", "60"]);
    assert!(
        out.contains("card balance 1500 → 1500 fen"),
        "nothing pending: {out}"
    );

    // A batch transfer file: queued, sent by the server's worker, a result line per line.
    std::fs::write(
        d.join("batch.csv"),
        "cardholder_number,amount_fen\n2026001,700\n2026999,100\n",
    )
    .unwrap();
    let batch = |id: &str, out: &str| {
        onecard(
            d,
            &[
                "topup",
                "batch",
                &path("batch.csv"),
                "--batch-id",
                id,
                "--out",
                &path(out),
                "--wait-s",
                "30",
            ],
        )
    };
    let o = batch("nov-1", "r1.csv");
    assert!(o.status.success(), "{}", text(&o));
    let result = std::fs::read_to_string(d.join("r1.csv")).unwrap();
    let lines: Vec<&str> = result.lines().collect();
    assert_eq!(
        lines[0],
        "line,cardholder_number,amount_fen,topup_id,state,code,message"
    );
    assert!(
        lines[1].starts_with("2,2026001,700,") && lines[1].contains(",credited,00,"),
        "{result}"
    );
    assert!(
        lines[2].starts_with("3,2026999,100,,not queued,not_found,"),
        "{result}"
    );
    // The same batch again queues nothing new; a line changed under its id is refused.
    assert!(batch("nov-1", "r2.csv").status.success());
    assert_eq!(
        std::fs::read_to_string(d.join("r2.csv"))
            .unwrap()
            .lines()
            .nth(1),
        Some(lines[1]),
        "the same top-up, not a second one"
    );
    std::fs::write(
        d.join("batch.csv"),
        "cardholder_number,amount_fen\n2026001,900\n",
    )
    .unwrap();
    let o = batch("nov-1", "r3.csv");
    let r3 = std::fs::read_to_string(d.join("r3.csv")).unwrap();
    assert!(r3.contains("origin_reused"), "{}{r3}", text(&o));
    assert!(!o.status.success() || r3.contains("not queued"), "{r3}");
    // The credited batch line is a pending load, written at the next tap.
    let out = kiosk(&["--trace", "70"]);
    assert!(out.contains("card balance 1500 → 2200 fen"), "{out}");
    let out = onecard(
        d,
        &[
            "sim",
            "kiosk",
            "--posp",
            &posp,
            "--terminal",
            KIOSK,
            "--psam",
            PSAM,
            "--tmk-file",
            &tmk_path,
            "--card",
            &card_path,
            "--pan",
            &pan,
            "--trace",
            "90",
        ],
    );
    assert!(
        !out.status.success() && text(&out).contains("go together"),
        "{}",
        text(&out)
    );
    server.kill().unwrap();
    let _ = server.wait();

    // Stopped with Ctrl-C, the bank writes its file: one transfer reversed, one kept.
    let pid = bank.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let _ = bank.wait();
    // The bank's settlement date, as its answers gave it (F15).
    let shown: serde_json::Value =
        serde_json::from_str(&ok(d, &["topup", "show", &loaded.to_string(), "--json"])).unwrap();
    let day = shown["settle_date"].as_str().unwrap().to_owned();
    let file = std::fs::read_to_string(files.join(format!("BANK{BANK}{day}.txt"))).unwrap();
    let lines: Vec<&str> = file.lines().collect();
    assert_eq!(lines.len(), 5, "{file}");
    assert!(
        lines[0].starts_with(&format!("H|{BANK}|{day}|3|2200")),
        "{file}"
    );
    assert!(lines[1].contains("|3000|LOAD|"), "{file}");
    assert!(
        lines[1].ends_with("|REVERSED") && lines[2].ends_with("|OK") && lines[3].ends_with("|OK"),
        "{file}"
    );
    assert_eq!(lines[4], "T|3|2200");
    // Reconciled with the file (from the bank's reconciliation_dir): both sides agree.
    let run: serde_json::Value = serde_json::from_str(&ok(
        d,
        &[
            "--config",
            &config,
            "reconcile",
            "run",
            "--bank",
            BANK,
            "--date",
            &day,
            "--json",
        ],
    ))
    .unwrap();
    assert_eq!(run["run"]["counts"]["matched"], 3, "{run}");
    // The server signed off at the agreed time (00:00, so at once) and reconciled the day by
    // itself from the file the bank wrote then: this run is not the first.
    assert!(run["run"]["runs"].as_i64().unwrap() >= 2, "{run}");
    for class in ["bank_only", "campus_only", "amount_mismatch", "duplicate"] {
        assert_eq!(run["run"]["counts"][class], 0, "{class}: {run}");
    }
    assert!(ok(d, &["db-check"]).contains("OK"));
    assert!(ok(d, &["alarm", "list"]).contains("no open alarms"));
}
