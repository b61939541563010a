//! What the gateway tests share: a centre that can be stopped as a process would be.

use std::sync::Arc;

use app::security::{Kek, SecurityModule, SoftwareSecurityModule};
use app::{App, SystemClock};

pub const KEK: &str = "2b7e151628aed2a6abf7158809cf4f3c2b7e151628aed2a6abf7158809cf4f3c";

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
