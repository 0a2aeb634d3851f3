//! The router's end: a SUB connection that yields `(seq, batch)` messages, and a one-shot
//! replay request against the engine's ROUTER socket.

use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::publisher::REPLAY_END;
use crate::zmtp::{self, Incoming, Limits, SocketType, ZmtpError};

/// One published message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// Its sequence number.
    pub seq: u64,
    /// The encoded batch.
    pub payload: Vec<u8>,
}

/// Why a subscription or replay failed.
#[derive(Debug, thiserror::Error)]
pub enum SubscribeError {
    /// Not a `tcp://host:port` endpoint.
    #[error("kv events: {0:?} is not a tcp://host:port endpoint")]
    Endpoint(String),
    /// Transport failure.
    #[error(transparent)]
    Zmtp(#[from] ZmtpError),
    /// No answer in time.
    #[error("kv events: no answer from {0} in time")]
    Timeout(String),
    /// A message that is not `[topic, 8-byte seq, payload]`.
    #[error("kv events: malformed message ({0} frames)")]
    Malformed(usize),
}

fn address(endpoint: &str) -> Result<String, SubscribeError> {
    zmtp::tcp_address(endpoint).ok_or_else(|| SubscribeError::Endpoint(endpoint.to_owned()))
}

async fn connect(endpoint: &str, ours: SocketType, timeout: Duration) -> Result<TcpStream, SubscribeError> {
    let addr = address(endpoint)?;
    let timed_out = || SubscribeError::Timeout(endpoint.to_owned());
    let mut stream = tokio::time::timeout(timeout, TcpStream::connect(&addr))
        .await
        .map_err(|_| timed_out())?
        .map_err(ZmtpError::from)?;
    let _ = stream.set_nodelay(true);
    tokio::time::timeout(timeout, zmtp::handshake(&mut stream, ours, false)).await.map_err(|_| timed_out())??;
    Ok(stream)
}

/// A live subscription.
#[derive(Debug)]
pub struct Subscription {
    stream: BufReader<TcpStream>,
    limits: Limits,
}

impl Subscription {
    /// Connects to `endpoint`, subscribes to `topic` (a prefix; empty = everything). Messages
    /// over `max_message` bytes end the subscription with an error.
    pub async fn connect(
        endpoint: &str,
        topic: &str,
        max_message: usize,
        timeout: Duration,
    ) -> Result<Self, SubscribeError> {
        let mut stream = connect(endpoint, SocketType::Sub, timeout).await?;
        let mut sub = Vec::with_capacity(1 + topic.len());
        sub.push(1);
        sub.extend_from_slice(topic.as_bytes());
        zmtp::write_message(&mut stream, &[&sub]).await.map_err(ZmtpError::from)?;
        Ok(Self { stream: BufReader::new(stream), limits: Limits { max_frame: max_message, max_frames: 3 } })
    }

    /// The next message (waits as long as the engine is quiet; answers heartbeats).
    pub async fn next(&mut self) -> Result<Published, SubscribeError> {
        loop {
            match zmtp::read(&mut self.stream, self.limits).await? {
                Incoming::Message(mut frames) => {
                    if frames.len() != 3 || frames[1].len() != 8 {
                        return Err(SubscribeError::Malformed(frames.len()));
                    }
                    let payload = frames.pop().unwrap_or_default();
                    let seq =
                        u64::from_be_bytes(frames[1].as_slice().try_into().map_err(|_| SubscribeError::Malformed(3))?);
                    return Ok(Published { seq, payload });
                }
                Incoming::Command(name, body) if name == "PING" => {
                    let w = self.stream.get_mut();
                    zmtp::pong(w, &body).await.map_err(ZmtpError::from)?;
                    w.flush().await.map_err(ZmtpError::from)?;
                }
                Incoming::Command(..) => {}
            }
        }
    }
}

/// Bounds on what one replay may return.
#[derive(Debug, Clone, Copy)]
pub struct ReplayLimits {
    /// Batches kept (the rest are not read).
    pub messages: usize,
    /// Largest batch, bytes.
    pub message_bytes: usize,
    /// All batches together, bytes; beyond it the replay fails.
    pub total_bytes: usize,
}

/// Asks the replay socket at `endpoint` for every batch from `from_seq` on. Returns them in
/// order, within `limits`, stopping at the end marker.
pub async fn replay(
    endpoint: &str,
    from_seq: u64,
    limits: ReplayLimits,
    timeout: Duration,
) -> Result<Vec<Published>, SubscribeError> {
    let (max_messages, max_message, max_total) = (limits.messages, limits.message_bytes, limits.total_bytes);
    let mut total = 0usize;
    let stream = connect(endpoint, SocketType::Dealer, timeout).await?;
    let mut stream = BufReader::new(stream);
    zmtp::write_message(stream.get_mut(), &[b"", &from_seq.to_be_bytes()]).await.map_err(ZmtpError::from)?;
    let limits = Limits { max_frame: max_message, max_frames: 4 };
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let read = tokio::time::timeout_at(deadline, zmtp::read(&mut stream, limits))
            .await
            .map_err(|_| SubscribeError::Timeout(endpoint.to_owned()))??;
        let Incoming::Message(frames) = read else { continue };
        // [empty delimiter, seq, payload]; the delimiter is optional.
        let body: Vec<&Vec<u8>> = frames.iter().skip_while(|f| f.is_empty()).collect();
        let (seq, payload) = match body.as_slice() {
            [seq, payload] if seq.len() == 8 => (seq, payload),
            [seq] if seq.len() == 8 => (seq, &&Vec::new()),
            _ => return Err(SubscribeError::Malformed(frames.len())),
        };
        let seq = i64::from_be_bytes(seq.as_slice().try_into().map_err(|_| SubscribeError::Malformed(frames.len()))?);
        if seq == REPLAY_END && payload.is_empty() {
            return Ok(out);
        }
        if out.len() >= max_messages {
            return Ok(out);
        }
        total += payload.len();
        if total > max_total {
            return Err(SubscribeError::Zmtp(ZmtpError::TooLarge { size: total as u64, limit: max_total }));
        }
        out.push(Published { seq: seq as u64, payload: payload.to_vec() });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publisher::Publisher;

    #[tokio::test]
    async fn subscribe_receive_and_replay_against_our_publisher() {
        let publisher = Publisher::bind("127.0.0.1:0", Some("127.0.0.1:0"), "kv", 100).await.unwrap();
        let endpoint = format!("tcp://{}", publisher.pub_addr());
        let replay_endpoint = format!("tcp://{}", publisher.replay_addr().unwrap());
        let mut sub = Subscription::connect(&endpoint, "", 1 << 20, Duration::from_secs(5)).await.unwrap();
        // The subscription is registered once the publisher's connection task reads it; publish
        // until the first message arrives (no sleep: the receive itself is the signal).
        let first = loop {
            publisher.publish(b"hello".to_vec());
            if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(50), sub.next()).await {
                break m;
            }
        };
        assert_eq!(first.payload, b"hello");
        let next = publisher.publish(b"a".to_vec());
        publisher.publish_as(next + 1, b"b".to_vec(), false);
        publisher.publish_as(next + 2, b"c".to_vec(), true);
        let m = sub.next().await.unwrap();
        assert_eq!((m.seq, m.payload.as_slice()), (next, &b"a"[..]));
        let m = sub.next().await.unwrap();
        assert_eq!(m.seq, next + 2, "b was never sent: a gap");
        let limits = ReplayLimits { messages: 100, message_bytes: 1 << 20, total_bytes: 1 << 20 };
        let replayed = replay(&replay_endpoint, next + 1, limits, Duration::from_secs(5)).await.unwrap();
        let seqs: Vec<u64> = replayed.iter().map(|p| p.seq).collect();
        assert_eq!(seqs, vec![next + 1, next + 2]);
        assert_eq!(replayed[0].payload, b"b");
        // A replay larger than its byte bound fails rather than growing without limit.
        let tight = ReplayLimits { messages: 100, message_bytes: 1 << 20, total_bytes: 1 };
        assert!(replay(&replay_endpoint, next + 1, tight, Duration::from_secs(5)).await.is_err());
    }
}
