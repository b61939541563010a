//! What the gateway tests share: a centre that can be stopped as a process would be.

use std::sync::Arc;

use app::security::{Kek, SecurityModule, SoftwareSecurityModule};
use app::{App, SystemClock};

pub const KEK: &str = "2b7e151628aed2a6abf7158809cf4f3c2b7e151628aed2a6abf7158809cf4f3c";
pub const GATEWAY: &str = "900060000001";
pub const SERIAL: &str = "GW900060000001";

/// A centre's data: master keys from a ceremony, a canteen merchant, and the gateway
/// registered (kind gateway, signing in with [`SERIAL`]).
pub async fn centre_data(
    store: &store::Store,
) -> (App, Arc<dyn SecurityModule>, ledger::AccountId) {
    let app = App::new(store.clone(), Arc::new(SystemClock));
    let kek = Kek::from_hex(KEK, "test").unwrap();
    SoftwareSecurityModule::ceremony(
        app.store(),
        &kek,
        card::crypto::PurseAlgorithm::Tdes,
        ledger::Timestamp(0),
    )
    .await
    .unwrap();
    let module: Arc<dyn SecurityModule> = Arc::new(
        SoftwareSecurityModule::open(app.store(), &kek)
            .await
            .unwrap(),
    );
    let canteen = app
        .create_account(
            ledger::AccountKind::MerchantPayable,
            Some("merchant:canteen"),
        )
        .await
        .unwrap()
        .account
        .id;
    app::terminals::register(
        &app,
        &app::Actor::cli(),
        app::terminals::NewTerminal {
            terminal_no: GATEWAY.into(),
            kind: app::terminals::TerminalKind::Gateway,
            merchant_account_id: None,
            location: "canteen gateway".into(),
            psam_serial: Some(SERIAL.into()),
            gateway_no: None,
        },
    )
    .await
    .unwrap();
    (app, module, canteen)
}

/// A centre in its own thread and runtime, as its own process would be: stopping it drops
/// every task and connection it had.
pub struct Centre {
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Centre {
    pub fn start(url: String, listener: std::net::TcpListener) -> Centre {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let store = store::Store::open(
                    &store::DatabaseUrl::parse(&url).unwrap(),
                    store::StoreOptions::default(),
                )
                .await
                .unwrap();
                let app = App::new(store, Arc::new(SystemClock));
                let kek = Kek::from_hex(KEK, "test").unwrap();
                let module: Arc<dyn SecurityModule> = Arc::new(
                    SoftwareSecurityModule::open(app.store(), &kek)
                        .await
                        .unwrap(),
                );
                listener.set_nonblocking(true).unwrap();
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                posp::Posp::new(app, module, posp::PospConfig::default())
                    .serve(listener, async {
                        let _ = stopped.await;
                    })
                    .await
                    .unwrap();
            });
            // Dropping the runtime here ends every connection the centre had.
        });
        Centre { stop, thread }
    }

    pub fn stop(self) {
        let _ = self.stop.send(());
        self.thread.join().unwrap();
    }
}
