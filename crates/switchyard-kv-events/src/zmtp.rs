//! ZMTP 3.0 (the ZeroMQ transport, RFC 23) over TCP with the NULL mechanism: the greeting,
//! the READY handshake, and framed multipart messages.
//!
//! We announce version 3.0, so a libzmq peer (which speaks 3.1) falls back to 3.0's
//! conventions: subscriptions travel as messages (`0x01` + topic) rather than commands. A peer
//! that sends 3.1's SUBSCRIBE command anyway is understood. Every read is bounded: a frame
//! larger than the caller's limit is an error before anything is allocated for it.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Greeting length in bytes.
const GREETING_LEN: usize = 64;
const FLAG_MORE: u8 = 0x01;
const FLAG_LONG: u8 = 0x02;
const FLAG_COMMAND: u8 = 0x04;

/// The socket types the engines' event publishing uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketType {
    /// Publisher of the event stream.
    Pub,
    /// Subscriber to it.
    Sub,
    /// Replay client (talks to a ROUTER like a REQ socket, without REQ's one-reply rule).
    Dealer,
    /// Replay server.
    Router,
}

impl SocketType {
    fn name(self) -> &'static str {
        match self {
            SocketType::Pub => "PUB",
            SocketType::Sub => "SUB",
            SocketType::Dealer => "DEALER",
            SocketType::Router => "ROUTER",
        }
    }
}

/// Why a ZMTP exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ZmtpError {
    /// The socket failed or closed.
    #[error("zmtp: {0}")]
    Io(#[from] std::io::Error),
    /// The peer is not a ZMTP 3 peer (bad signature or version).
    #[error("zmtp: not a ZMTP 3 peer ({0})")]
    NotZmtp(&'static str),
    /// The peer wants a security mechanism other than NULL.
    #[error("zmtp: the peer asks for the {0} security mechanism; only NULL is supported")]
    Mechanism(String),
    /// The peer's handshake command was malformed or not READY.
    #[error("zmtp: bad handshake: {0}")]
    Handshake(String),
    /// A frame or message over the caller's limit.
    #[error("zmtp: a frame of {size} bytes exceeds the {limit}-byte limit")]
    TooLarge {
        /// Size the peer announced.
        size: u64,
        /// The limit.
        limit: usize,
    },
    /// The peer is a socket type that cannot talk to ours.
    #[error("zmtp: a {peer} peer cannot talk to a {ours} socket")]
    Incompatible {
        /// Its type.
        peer: String,
        /// Ours.
        ours: &'static str,
    },
}

/// What arrived: a whole multipart message, or a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// The frames of one message.
    Message(Vec<Vec<u8>>),
    /// A command (name, body) after the handshake, e.g. PING or SUBSCRIBE.
    Command(String, Vec<u8>),
}

/// Limits on what one read may accept.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest frame, bytes.
    pub max_frame: usize,
    /// Most frames in one message.
    pub max_frames: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_frame: 64 << 20, max_frames: 8 }
    }
}

fn greeting(as_server: bool) -> [u8; GREETING_LEN] {
    let mut g = [0u8; GREETING_LEN];
    g[0] = 0xff;
    g[8] = 0x01;
    g[9] = 0x7f;
    g[10] = 3;
    g[11] = 0;
    g[12..16].copy_from_slice(b"NULL");
    g[32] = u8::from(as_server);
    g
}

/// Exchanges greetings and READY commands; returns the peer's socket type.
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    ours: SocketType,
    as_server: bool,
) -> Result<String, ZmtpError> {
    stream.write_all(&greeting(as_server)).await?;
    let mut peer = [0u8; GREETING_LEN];
    stream.read_exact(&mut peer).await?;
    if peer[0] != 0xff || peer[9] != 0x7f {
        return Err(ZmtpError::NotZmtp("signature"));
    }
    if peer[10] < 3 {
        return Err(ZmtpError::NotZmtp("version below 3"));
    }
    let mechanism = &peer[12..32];
    let end = mechanism.iter().position(|b| *b == 0).unwrap_or(mechanism.len());
    if &mechanism[..end] != b"NULL" {
        return Err(ZmtpError::Mechanism(String::from_utf8_lossy(&mechanism[..end]).into_owned()));
    }
    let mut props = Vec::new();
    property(&mut props, "Socket-Type", ours.name().as_bytes());
    if matches!(ours, SocketType::Dealer) {
        property(&mut props, "Identity", b"");
    }
    write_command(stream, "READY", &props).await?;
    let limits = Limits { max_frame: 4096, max_frames: 1 };
    let (name, body) = match read(stream, limits).await? {
        Incoming::Command(name, body) => (name, body),
        Incoming::Message(_) => return Err(ZmtpError::Handshake("a message before READY".into())),
    };
    if name != "READY" {
        return Err(ZmtpError::Handshake(format!("{name} instead of READY")));
    }
    let peer_type = ready_socket_type(&body)?;
    let compatible = matches!(
        (ours, peer_type.as_str()),
        (SocketType::Pub, "SUB" | "XSUB")
            | (SocketType::Sub, "PUB" | "XPUB")
            | (SocketType::Dealer, "ROUTER" | "DEALER" | "REP")
            | (SocketType::Router, "DEALER" | "REQ" | "ROUTER")
    );
    if !compatible {
        return Err(ZmtpError::Incompatible { peer: peer_type, ours: ours.name() });
    }
    Ok(peer_type)
}

fn property(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&(value.len() as u32).to_be_bytes());
    out.extend_from_slice(value);
}

fn ready_socket_type(mut body: &[u8]) -> Result<String, ZmtpError> {
    let bad = || ZmtpError::Handshake("malformed READY properties".into());
    while !body.is_empty() {
        let n = usize::from(body[0]);
        let name = body.get(1..1 + n).ok_or_else(bad)?;
        let len_bytes: [u8; 4] = body.get(1 + n..5 + n).ok_or_else(bad)?.try_into().map_err(|_| bad())?;
        let len = u32::from_be_bytes(len_bytes) as usize;
        let value = body.get(5 + n..5 + n + len).ok_or_else(bad)?;
        if name.eq_ignore_ascii_case(b"Socket-Type") {
            return Ok(String::from_utf8_lossy(value).into_owned());
        }
        body = &body[5 + n + len..];
    }
    Err(ZmtpError::Handshake("READY without Socket-Type".into()))
}

async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, flags: u8, body: &[u8]) -> std::io::Result<()> {
    if body.len() > 255 {
        let mut head = [0u8; 9];
        head[0] = flags | FLAG_LONG;
        head[1..].copy_from_slice(&(body.len() as u64).to_be_bytes());
        w.write_all(&head).await?;
    } else {
        w.write_all(&[flags, body.len() as u8]).await?;
    }
    w.write_all(body).await
}

/// Sends a command frame (`name` then `body`).
pub async fn write_command<W: AsyncWrite + Unpin>(w: &mut W, name: &str, body: &[u8]) -> std::io::Result<()> {
    let mut b = Vec::with_capacity(1 + name.len() + body.len());
    b.push(name.len() as u8);
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(body);
    write_frame(w, FLAG_COMMAND, &b).await
}

/// Sends one multipart message (does not flush a buffered writer).
pub async fn write_message<W: AsyncWrite + Unpin>(w: &mut W, frames: &[&[u8]]) -> std::io::Result<()> {
    for (i, f) in frames.iter().enumerate() {
        let more = if i + 1 < frames.len() { FLAG_MORE } else { 0 };
        write_frame(w, more, f).await?;
    }
    Ok(())
}

/// Reads the next message or command, within `limits`.
pub async fn read<R: AsyncRead + Unpin>(r: &mut R, limits: Limits) -> Result<Incoming, ZmtpError> {
    let mut frames = Vec::new();
    loop {
        let flags = r.read_u8().await?;
        let size = if flags & FLAG_LONG != 0 { r.read_u64().await? } else { u64::from(r.read_u8().await?) };
        if size > limits.max_frame as u64 {
            return Err(ZmtpError::TooLarge { size, limit: limits.max_frame });
        }
        let mut body = vec![0u8; size as usize];
        r.read_exact(&mut body).await?;
        if flags & FLAG_COMMAND != 0 {
            let n = usize::from(*body.first().ok_or_else(|| ZmtpError::Handshake("empty command".into()))?);
            let name = body.get(1..1 + n).ok_or_else(|| ZmtpError::Handshake("truncated command name".into()))?;
            let name = String::from_utf8_lossy(name).into_owned();
            body.drain(..1 + n);
            return Ok(Incoming::Command(name, body));
        }
        if frames.len() >= limits.max_frames {
            return Err(ZmtpError::TooLarge { size: frames.len() as u64 + 1, limit: limits.max_frames });
        }
        frames.push(body);
        if flags & FLAG_MORE == 0 {
            return Ok(Incoming::Message(frames));
        }
    }
}

/// Answers a PING command with its PONG (the context after the 2-byte TTL, echoed).
pub async fn pong<W: AsyncWrite + Unpin>(w: &mut W, ping_body: &[u8]) -> std::io::Result<()> {
    write_command(w, "PONG", ping_body.get(2..).unwrap_or(&[])).await
}

/// `tcp://host:port` as `host:port` (a `*` host binds every interface).
pub fn tcp_address(endpoint: &str) -> Option<String> {
    let rest = endpoint.strip_prefix("tcp://")?;
    let (host, port) = rest.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    let host = if host == "*" { "0.0.0.0" } else { host };
    Some(format!("{host}:{port}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pub_and_sub_handshake_and_exchange_a_message() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let server = tokio::spawn(async move {
            let peer = handshake(&mut a, SocketType::Pub, true).await.unwrap();
            let sub = read(&mut a, Limits::default()).await.unwrap();
            write_message(&mut a, &[b"topic", &7u64.to_be_bytes(), &[0u8; 300]]).await.unwrap();
            (peer, sub)
        });
        assert_eq!(handshake(&mut b, SocketType::Sub, false).await.unwrap(), "PUB");
        write_message(&mut b, &[b"\x01topic"]).await.unwrap();
        let got = read(&mut b, Limits::default()).await.unwrap();
        let (peer, sub) = server.await.unwrap();
        assert_eq!(peer, "SUB");
        assert_eq!(sub, Incoming::Message(vec![b"\x01topic".to_vec()]));
        let Incoming::Message(frames) = got else { panic!("{got:?}") };
        assert_eq!(frames.len(), 3);
        assert_eq!(frames[2].len(), 300, "a long frame (8-byte size)");
    }

    #[tokio::test]
    async fn a_frame_over_the_limit_is_refused_before_it_is_read() {
        // A long frame announcing 2^40 bytes.
        let mut bytes: &[u8] = &[FLAG_LONG, 0, 0, 1, 0, 0, 0, 0, 0];
        let err = read(&mut bytes, Limits { max_frame: 1 << 20, max_frames: 4 }).await.unwrap_err();
        assert!(matches!(err, ZmtpError::TooLarge { size, .. } if size == 1 << 40), "{err}");
    }

    #[tokio::test]
    async fn wrong_mechanism_and_wrong_peer_type_are_refused() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        tokio::spawn(async move {
            let mut g = greeting(true);
            g[12..16].copy_from_slice(b"PLAI");
            let _ = a.write_all(&g).await;
            let mut sink = [0u8; 64];
            let _ = a.read_exact(&mut sink).await;
        });
        assert!(matches!(handshake(&mut b, SocketType::Sub, false).await, Err(ZmtpError::Mechanism(m)) if m == "PLAI"));
        let (mut a, mut b) = tokio::io::duplex(4096);
        tokio::spawn(async move {
            let _ = handshake(&mut a, SocketType::Router, true).await;
        });
        assert!(matches!(handshake(&mut b, SocketType::Sub, false).await, Err(ZmtpError::Incompatible { .. })));
    }

    #[test]
    fn endpoints() {
        assert_eq!(tcp_address("tcp://127.0.0.1:5557").as_deref(), Some("127.0.0.1:5557"));
        assert_eq!(tcp_address("tcp://*:5557").as_deref(), Some("0.0.0.0:5557"));
        assert_eq!(tcp_address("ipc:///tmp/x"), None);
        assert_eq!(tcp_address("tcp://host:notaport"), None);
    }
}
