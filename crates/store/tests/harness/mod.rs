//! Test harness: a fresh database per test on each backend.
//!
//! SQLite always runs. PostgreSQL runs when `ONECARD_TEST_PG_URL` names a server (a database on
//! it is created per test and dropped after); if `CI` is set and the URL is not, the test
//! fails, so PostgreSQL can never be skipped silently in CI.

#![allow(dead_code)] // Each test binary uses a different part of the harness.

use std::sync::atomic::{AtomicU32, Ordering};

use store::{DatabaseUrl, Store, StoreOptions};

pub enum Backend {
    Sqlite,
    Postgres,
}

/// A fresh database; dropping it removes the SQLite folder (PostgreSQL databases are dropped by
/// [`TestDb::cleanup`] and, if a test failed first, by the next `.ci/run`).
pub struct TestDb {
    pub store: Store,
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    pg: Option<(String, String)>,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub fn pg_base_url() -> Option<String> {
    match std::env::var("ONECARD_TEST_PG_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI is set but ONECARD_TEST_PG_URL is not: PostgreSQL tests must not be skipped"
            );
            None
        }
    }
}

/// Replaces the database name in a PostgreSQL URL.
pub fn with_database(base: &str, db: &str) -> String {
    let (head, query) = match base.split_once('?') {
        Some((h, q)) => (h, format!("?{q}")),
        None => (base, String::new()),
    };
    let scheme_end = head.find("://").map(|i| i + 3).unwrap_or(0);
    let head = match head[scheme_end..].find('/') {
        Some(i) => &head[..scheme_end + i],
        None => head,
    };
    format!("{head}/{db}{query}")
}

impl TestDb {
    /// `None` when the backend is PostgreSQL and no server is configured (outside CI).
    pub async fn new(backend: Backend) -> Option<TestDb> {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let url = format!("sqlite:{}", dir.path().join("onecard.db").display());
                let store =
                    Store::open(&DatabaseUrl::parse(&url).unwrap(), StoreOptions::default())
                        .await
                        .unwrap();
                Some(TestDb {
                    store,
                    url,
                    _dir: Some(dir),
                    pg: None,
                })
            }
            Backend::Postgres => {
                let base = pg_base_url()?;
                let name = format!(
                    "onecard_test_{}_{}",
                    std::process::id(),
                    COUNTER.fetch_add(1, Ordering::Relaxed)
                );
                let (client, conn) = tokio_postgres::connect(&base, tokio_postgres::NoTls)
                    .await
                    .expect("connecting to ONECARD_TEST_PG_URL");
                tokio::spawn(conn);
                client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
                    .await
                    .unwrap();
                client
                    .batch_execute(&format!("CREATE DATABASE {name}"))
                    .await
                    .unwrap();
                let url = with_database(&base, &name);
                let store =
                    Store::open(&DatabaseUrl::parse(&url).unwrap(), StoreOptions::default())
                        .await
                        .unwrap();
                Some(TestDb {
                    store,
                    url,
                    _dir: None,
                    pg: Some((base, name)),
                })
            }
        }
    }

    pub fn is_postgres(&self) -> bool {
        self.pg.is_some()
    }

    /// Opens a second, independent store on the same database (another "process").
    pub async fn second_store(&self) -> Store {
        Store::open(
            &DatabaseUrl::parse(&self.url).unwrap(),
            StoreOptions::default(),
        )
        .await
        .unwrap()
    }

    /// Runs raw SQL against the database behind the store's back (to corrupt it on purpose).
    pub async fn raw(&self, sql: &str) -> Result<(), String> {
        match &self.pg {
            None => {
                let path = self.url.strip_prefix("sqlite:").unwrap();
                let conn = rusqlite::Connection::open(path).unwrap();
                conn.execute_batch(sql).map_err(|e| e.to_string())
            }
            Some(_) => {
                let (client, conn) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                tokio::spawn(conn);
                client.batch_execute(sql).await.map_err(|e| {
                    e.as_db_error()
                        .map(|d| d.message().to_owned())
                        .unwrap_or(e.to_string())
                })
            }
        }
    }

    /// Holds back the store's writer from another connection: the SQLite write lock, or the
    /// row of `account` on PostgreSQL. Submits queue up until [`Blocker::release`].
    pub async fn block_writes(&self, account: i64) -> Blocker {
        match &self.pg {
            None => {
                let path = self.url.strip_prefix("sqlite:").unwrap().to_owned();
                let (release, wait) = std::sync::mpsc::channel::<()>();
                let (ready, is_ready) = std::sync::mpsc::channel::<()>();
                let thread = std::thread::spawn(move || {
                    let conn = rusqlite::Connection::open(path).unwrap();
                    conn.execute_batch("BEGIN IMMEDIATE").unwrap();
                    ready.send(()).unwrap();
                    let _ = wait.recv();
                    conn.execute_batch("COMMIT").unwrap();
                });
                is_ready.recv().unwrap();
                Blocker::Sqlite(release, thread)
            }
            Some(_) => {
                let (client, conn) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                tokio::spawn(conn);
                client.batch_execute("BEGIN").await.unwrap();
                client
                    .execute(
                        "SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE",
                        &[&account],
                    )
                    .await
                    .unwrap();
                Blocker::Postgres(client)
            }
        }
    }

    pub async fn cleanup(self) {
        let TestDb { store, pg, .. } = self;
        drop(store);
        if let Some((base, name)) = pg {
            // A database left behind is dropped by the next .ci/run; it is not a test failure.
            match tokio_postgres::connect(&base, tokio_postgres::NoTls).await {
                Ok((client, conn)) => {
                    tokio::spawn(conn);
                    let drop = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                    if let Err(e) = client.batch_execute(&drop).await {
                        eprintln!("could not drop test database {name}: {e}");
                    }
                }
                Err(e) => eprintln!("could not connect to drop test database {name}: {e}"),
            }
        }
    }
}

/// A write lock held by another connection; see [`TestDb::block_writes`].
pub enum Blocker {
    Sqlite(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>),
    Postgres(tokio_postgres::Client),
}

impl Blocker {
    pub async fn release(self) {
        match self {
            Blocker::Sqlite(release, thread) => {
                release.send(()).unwrap();
                tokio::task::spawn_blocking(move || thread.join().unwrap())
                    .await
                    .unwrap();
            }
            Blocker::Postgres(client) => client.batch_execute("COMMIT").await.unwrap(),
        }
    }
}

/// Defines `$name::sqlite` and `$name::postgres`, running the same body on each backend.
#[macro_export]
macro_rules! conformance {
    (async fn $name:ident($db:ident) $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            async fn run($db: &$crate::harness::TestDb) $body

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let db = $crate::harness::TestDb::new($crate::harness::Backend::Sqlite)
                    .await
                    .unwrap();
                run(&db).await;
                db.cleanup().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let Some(db) =
                    $crate::harness::TestDb::new($crate::harness::Backend::Postgres).await
                else {
                    eprintln!("ONECARD_TEST_PG_URL is not set: PostgreSQL run not possible here");
                    return;
                };
                run(&db).await;
                db.cleanup().await;
            }
        }
    };
}
