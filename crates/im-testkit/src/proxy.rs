//! A TCP proxy on loopback that a test can cut and restore, to play a broker or database
//! outage without stopping the real service (which other tests share), or mute, to play a
//! server that takes everything and answers nothing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Forwards `127.0.0.1:<port>` to `target` while up.
#[derive(Debug)]
pub struct Proxy {
    port: u16,
    target: SocketAddr,
    up: Arc<AtomicBool>,
    /// While set, what the target sends is read and dropped, not forwarded.
    muted: Arc<AtomicBool>,
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
        let mut proxy = Self {
            port,
            target,
            up: Arc::new(AtomicBool::new(true)),
            muted: Arc::new(AtomicBool::new(false)),
            forwarded: Arc::new(AtomicUsize::new(0)),
            cut,
            listener: None,
        };
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
        let (target, up, muted, cut, forwarded) =
            (self.target, self.up.clone(), self.muted.clone(), self.cut.clone(), self.forwarded.clone());
        tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else { return };
                if !up.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                forwarded.fetch_add(1, Ordering::SeqCst);
                let mut cut_rx = cut.subscribe();
                let muted = muted.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else { return };
                    let (mut ri, mut wi) = inbound.into_split();
                    let (mut ro, mut wo) = outbound.into_split();
                    tokio::select! {
                        _ = tokio::io::copy(&mut ri, &mut wo) => {}
                        _ = answers(&mut ro, &mut wi, &muted) => {}
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

    /// From now on, every connection's answers from the target are dropped (what the client
    /// sends still reaches it), until [`Proxy::unmute`]. Meant for connections made after the
    /// unmute: one muted mid-stream resumes mid-stream, with what was dropped missing.
    pub fn mute(&self) {
        self.muted.store(true, Ordering::SeqCst);
    }

    pub fn unmute(&self) {
        self.muted.store(false, Ordering::SeqCst);
    }
}

/// Copies what the target sends to the client, dropping it while `muted`.
async fn answers(from: &mut OwnedReadHalf, to: &mut OwnedWriteHalf, muted: &AtomicBool) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if !muted.load(Ordering::SeqCst) && to.write_all(&buf[..n]).await.is_err() {
            return;
        }
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
