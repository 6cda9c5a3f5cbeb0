//! A TCP proxy on loopback that a test can cut and restore, to play a broker or database
//! outage without stopping the real service (which other tests share).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Forwards `127.0.0.1:<port>` to `target` while up.
#[derive(Debug)]
pub struct Proxy {
    port: u16,
    target: SocketAddr,
    up: Arc<AtomicBool>,
    /// Connections forwarded so far.
    forwarded: Arc<AtomicUsize>,
    cut: watch::Sender<u64>,
    listener: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Starts a proxy on a free port.
    ///
    /// # Panics
    /// When no port can be bound.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let (cut, _) = watch::channel(0);
        let mut proxy =
            Self { port, target, up: Arc::new(AtomicBool::new(true)), forwarded: Arc::new(AtomicUsize::new(0)), cut, listener: None };
        proxy.listener = Some(proxy.serve(listener));
        proxy
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// How many connections it has forwarded (accepted while up), since it started.
    pub fn connections(&self) -> usize {
        self.forwarded.load(Ordering::SeqCst)
    }

    fn serve(&self, listener: TcpListener) -> JoinHandle<()> {
        let (target, up, cut, forwarded) = (self.target, self.up.clone(), self.cut.clone(), self.forwarded.clone());
        tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else { return };
                if !up.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                forwarded.fetch_add(1, Ordering::SeqCst);
                let mut cut_rx = cut.subscribe();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else { return };
                    let (mut ri, mut wi) = inbound.into_split();
                    let (mut ro, mut wo) = outbound.into_split();
                    tokio::select! {
                        _ = tokio::io::copy(&mut ri, &mut wo) => {}
                        _ = tokio::io::copy(&mut ro, &mut wi) => {}
                        _ = cut_rx.changed() => {}
                    }
                });
            }
        })
    }

    /// Drops every open connection and refuses new ones until [`Proxy::restore`].
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.cut.send_modify(|n| *n += 1);
    }

    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        if let Some(listener) = self.listener.take() {
            listener.abort();
        }
    }
}
