//! The engine's end: a PUB socket that sends `[topic, seq, batch]` to every subscriber whose
//! subscription prefixes the topic, and a ROUTER replay socket that resends buffered batches
//! from a requested sequence number, then an end marker (sequence -1, empty payload).
//!
//! Like libzmq's PUB, a subscriber that falls more than [`SUBSCRIBER_QUEUE`] messages behind
//! loses messages rather than slowing the engine: it sees a gap in the sequence numbers.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::zmtp::{self, Incoming, Limits, SocketType};

/// Messages queued per subscriber before new ones are dropped.
pub const SUBSCRIBER_QUEUE: usize = 4096;

/// The end-of-replay marker's sequence number.
pub const REPLAY_END: i64 = -1;

type Message = Arc<(u64, Vec<u8>)>;

#[derive(Debug, Default)]
struct Shared {
    subscribers: Vec<mpsc::Sender<Message>>,
    replay: VecDeque<Message>,
    /// Connections that have subscribed to something.
    subscribed: usize,
}

/// A running publisher; sockets close when it is dropped.
#[derive(Debug)]
pub struct Publisher {
    topic: Vec<u8>,
    shared: Arc<Mutex<Shared>>,
    replay_capacity: usize,
    pub_addr: SocketAddr,
    replay_addr: Option<SocketAddr>,
    next_seq: std::sync::atomic::AtomicU64,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Publisher {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Publisher {
    /// Binds the PUB socket at `pub_addr` and, when given, the replay socket at
    /// `replay_addr` (keeping the last `replay_capacity` batches).
    pub async fn bind(
        pub_addr: &str,
        replay_addr: Option<&str>,
        topic: &str,
        replay_capacity: usize,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Mutex::new(Shared::default()));
        let listener = TcpListener::bind(pub_addr).await?;
        let pub_local = listener.local_addr()?;
        let mut tasks = vec![tokio::spawn(accept_subscribers(listener, shared.clone(), topic.as_bytes().to_vec()))];
        let mut replay_local = None;
        if let Some(addr) = replay_addr {
            let l = TcpListener::bind(addr).await?;
            replay_local = Some(l.local_addr()?);
            tasks.push(tokio::spawn(accept_replay(l, shared.clone())));
        }
        Ok(Self {
            topic: topic.as_bytes().to_vec(),
            shared,
            replay_capacity,
            pub_addr: pub_local,
            replay_addr: replay_local,
            next_seq: std::sync::atomic::AtomicU64::new(0),
            tasks,
        })
    }

    /// Where subscribers connect.
    pub fn pub_addr(&self) -> SocketAddr {
        self.pub_addr
    }

    /// Where replay clients connect, if replay is on.
    pub fn replay_addr(&self) -> Option<SocketAddr> {
        self.replay_addr
    }

    /// Subscribers connected now.
    pub fn subscribers(&self) -> usize {
        self.shared.lock().map(|s| s.subscribers.iter().filter(|t| !t.is_closed()).count()).unwrap_or(0)
    }

    /// Connections (open or since closed) that sent a subscription: from then on a message
    /// published reaches them.
    pub fn subscribed(&self) -> usize {
        self.shared.lock().map(|s| s.subscribed).unwrap_or(0)
    }

    /// The sequence number [`Publisher::publish`] will use next.
    pub fn next_seq(&self) -> u64 {
        self.next_seq.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Publishes `payload` under the next sequence number (from 0), which it returns.
    pub fn publish(&self, payload: Vec<u8>) -> u64 {
        let seq = self.next_seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.publish_as(seq, payload, true);
        seq
    }

    /// Restarts the sequence at 0 and forgets the replay buffer (what an engine restart does).
    pub fn restart(&self) {
        self.next_seq.store(0, std::sync::atomic::Ordering::Relaxed);
        self.clear_replay();
    }

    /// Publishes `payload` as sequence number `seq`. `send` = false keeps it only for replay
    /// (how a test makes a subscriber see a gap that replay can repair).
    pub fn publish_as(&self, seq: u64, payload: Vec<u8>, send: bool) {
        let msg: Message = Arc::new((seq, payload));
        let Ok(mut s) = self.shared.lock() else { return };
        if self.replay_capacity > 0 {
            if s.replay.len() == self.replay_capacity {
                s.replay.pop_front();
            }
            s.replay.push_back(msg.clone());
        }
        if send {
            s.subscribers.retain(|tx| !tx.is_closed());
            for tx in &s.subscribers {
                // Full: the subscriber is too slow and loses this message (a gap it will see).
                let _ = tx.try_send(msg.clone());
            }
        }
    }

    /// Forgets every buffered batch (an engine restart).
    pub fn clear_replay(&self) {
        if let Ok(mut s) = self.shared.lock() {
            s.replay.clear();
        }
    }

    /// The topic sent with every message.
    pub fn topic(&self) -> &[u8] {
        &self.topic
    }
}

async fn accept_subscribers(listener: TcpListener, shared: Arc<Mutex<Shared>>, topic: Vec<u8>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let (tx, rx) = mpsc::channel(SUBSCRIBER_QUEUE);
        if let Ok(mut s) = shared.lock() {
            s.subscribers.push(tx);
        }
        tokio::spawn(serve_subscriber(stream, rx, topic.clone(), shared.clone()));
    }
}

/// One subscriber: handshake, then send what it subscribed to while reading its
/// (un)subscriptions. Messages before its first subscription are dropped, as libzmq does.
async fn serve_subscriber(
    mut stream: TcpStream,
    mut rx: mpsc::Receiver<Message>,
    topic: Vec<u8>,
    shared: Arc<Mutex<Shared>>,
) {
    let _ = stream.set_nodelay(true);
    if zmtp::handshake(&mut stream, SocketType::Pub, true).await.is_err() {
        return;
    }
    let (mut read, write) = stream.into_split();
    let mut write = BufWriter::new(write);
    let mut prefixes: Vec<Vec<u8>> = Vec::new();
    let limits = Limits { max_frame: 4096, max_frames: 1 };
    let (sub_tx, mut sub_rx) = mpsc::channel::<Incoming>(16);
    let reader = tokio::spawn(async move {
        while let Ok(m) = zmtp::read(&mut read, limits).await {
            if sub_tx.send(m).await.is_err() {
                return;
            }
        }
    });
    let mut counted = false;
    loop {
        if !counted && !prefixes.is_empty() {
            counted = true;
            if let Ok(mut s) = shared.lock() {
                s.subscribed += 1;
            }
        }
        tokio::select! {
            m = sub_rx.recv() => match m {
                Some(Incoming::Message(frames)) => {
                    if let Some(f) = frames.first() {
                        match f.split_first() {
                            Some((1, t)) => prefixes.push(t.to_vec()),
                            Some((0, t)) => prefixes.retain(|p| p != t),
                            _ => {}
                        }
                    }
                }
                Some(Incoming::Command(name, body)) => match name.as_str() {
                    "SUBSCRIBE" => prefixes.push(body),
                    "CANCEL" => prefixes.retain(|p| *p != body),
                    "PING" if zmtp::pong(&mut write, &body).await.is_err() || write.flush().await.is_err() => break,
                    _ => {}
                },
                None => break,
            },
            msg = rx.recv() => {
                let Some(msg) = msg else { break };
                if !prefixes.iter().any(|p| topic.starts_with(p)) {
                    continue;
                }
                let seq = msg.0.to_be_bytes();
                if zmtp::write_message(&mut write, &[&topic, &seq, &msg.1]).await.is_err() {
                    break;
                }
                if rx.is_empty() && write.flush().await.is_err() {
                    break;
                }
            }
        }
    }
    reader.abort();
}

async fn accept_replay(listener: TcpListener, shared: Arc<Mutex<Shared>>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        tokio::spawn(serve_replay(stream, shared.clone()));
    }
}

/// One replay client: each request names a start sequence number (its last frame, 8 bytes
/// big-endian); the answer is every buffered batch from there, then the end marker. Frames
/// go back behind an empty delimiter, as a ROUTER answers a REQ.
async fn serve_replay(mut stream: TcpStream, shared: Arc<Mutex<Shared>>) {
    if zmtp::handshake(&mut stream, SocketType::Router, true).await.is_err() {
        return;
    }
    let limits = Limits { max_frame: 4096, max_frames: 4 };
    loop {
        let frames = match zmtp::read(&mut stream, limits).await {
            Ok(Incoming::Message(f)) => f,
            Ok(Incoming::Command(..)) => continue,
            Err(_) => return,
        };
        let Some(start) = frames.last().and_then(|f| <[u8; 8]>::try_from(f.as_slice()).ok()) else { continue };
        let start = u64::from_be_bytes(start);
        let batch: Vec<Message> = match shared.lock() {
            Ok(s) => s.replay.iter().filter(|m| m.0 >= start).cloned().collect(),
            Err(_) => return,
        };
        let mut w = BufWriter::new(&mut stream);
        for m in batch {
            if zmtp::write_message(&mut w, &[b"", &m.0.to_be_bytes(), &m.1]).await.is_err() {
                return;
            }
        }
        if zmtp::write_message(&mut w, &[b"", &REPLAY_END.to_be_bytes(), b""]).await.is_err()
            || w.flush().await.is_err()
        {
            return;
        }
    }
}
