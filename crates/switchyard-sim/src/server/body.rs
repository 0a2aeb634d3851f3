//! A response body fed through a channel: how streamed tokens reach the client.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame};
use tokio::sync::mpsc;

/// Error frame that aborts the connection mid-body (a dying worker).
#[derive(Debug, thiserror::Error)]
#[error("simulated worker died mid-stream")]
pub struct Died;

/// Body whose chunks arrive on a channel; an `Err` aborts the response.
pub struct ChannelBody {
    rx: mpsc::Receiver<Result<Bytes, Died>>,
}

impl ChannelBody {
    /// A body and the sender that feeds it.
    pub fn new(capacity: usize) -> (mpsc::Sender<Result<Bytes, Died>>, Self) {
        let (tx, rx) = mpsc::channel(capacity);
        (tx, Self { rx })
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Died;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Died>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data)))
    }
}
