//! WebSocket subscribers: connect under a concurrency limit, then read frames and record
//! each message's end-to-end latency until told to stop, or, in the churn phase, to
//! leave (a close handshake, or the TCP connection dropped).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::ValueEnum;
use futures_util::StreamExt;
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch, Semaphore};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::eventsource;
use crate::longpoll;
use crate::util::{now_ns, parse_t};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long a leaving subscriber waits for the server's close frame and end of stream.
pub const LEAVE_TIMEOUT: Duration = Duration::from_secs(5);

/// How a subscriber leaves when the churn phase tells it to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LeaveMode {
    /// Send a close frame (1000) and wait for the server's close frame and the end of the
    /// connection (at most 5 s).
    Close,
    /// Drop the TCP connection without a close frame.
    Drop,
}

impl LeaveMode {
    pub fn name(self) -> &'static str {
        match self {
            LeaveMode::Close => "close",
            LeaveMode::Drop => "drop",
        }
    }
}

/// Opens a WebSocket connection (TCP connect and handshake up to the 101), bounded by
/// `timeout`.
pub async fn connect(url: &str, timeout: Duration) -> Result<Ws, String> {
    let config = WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(0)
        .max_message_size(Some(1 << 20));
    let connect = tokio_tungstenite::connect_async_with_config(url, Some(config), true);
    match tokio::time::timeout(timeout, connect).await {
        Ok(Ok((ws, _response))) => Ok(ws),
        Ok(Err(e)) => Err(format!("connect: {e}")),
        Err(_) => Err("connect: timed out".into()),
    }
}

/// Counters that the main task watches while the subscribers run.
pub struct Shared {
    pub connected: AtomicU64,
    pub failed: AtomicU64,
    /// Subscribers whose connection ended (closed or failed) after it was open.
    pub dropped: AtomicU64,
    pub received: AtomicU64,
    /// Unix nanoseconds of the latest message received (0: none yet).
    pub last_recv_ns: AtomicU64,
    /// Connected subscribers per channel, for the expected delivery count.
    pub per_channel: Vec<AtomicU32>,
}

impl Shared {
    pub fn new(channels: usize) -> Self {
        Shared {
            connected: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            received: AtomicU64::new(0),
            last_recv_ns: AtomicU64::new(0),
            per_channel: (0..channels).map(|_| AtomicU32::new(0)).collect(),
        }
    }
}

/// What one subscriber saw.
#[derive(Default)]
pub struct Outcome {
    pub received: u64,
    /// Frames without a send time in them.
    pub unparsed: u64,
    /// Messages that came as binary frames rather than text.
    pub binary: u64,
    /// Messages sent before this run started (a server replaying stored messages).
    pub stale: u64,
    /// Latencies in microseconds.
    pub latencies: Vec<u32>,
    pub error: Option<String>,
    /// Left because the churn phase told it to (`error` says whether the close went wrong).
    pub left: bool,
}

pub struct Subscriber {
    pub url: String,
    pub channel: usize,
    pub limit: Arc<Semaphore>,
    pub connect_timeout: Duration,
    pub shared: Arc<Shared>,
    pub stop: watch::Receiver<bool>,
    /// Messages stamped before this (Unix ns) are stale: not this run's.
    pub since_ns: u64,
    /// Fired by the churn phase: leave the way `leave_mode` says and return. A dropped
    /// sender does not count.
    pub leave: Option<oneshot::Receiver<()>>,
    pub leave_mode: LeaveMode,
    /// An http:// URL is polled (long-polling) rather than read as an EventSource.
    pub long_poll: bool,
}

impl Subscriber {
    /// Connects (under the concurrency limit) and then serves: the initial subscribers.
    pub async fn run(mut self) -> Outcome {
        let url = self.url.clone();
        if url.starts_with("http://") && self.long_poll {
            return self.run_longpoll(&url).await;
        }
        if url.starts_with("http://") {
            return self.run_eventsource(&url).await;
        }
        match self.admit(connect(&url, self.connect_timeout)).await {
            Ok(ws) => self.serve(ws).await,
            Err(out) => out,
        }
    }

    /// Connects under the concurrency limit and counts the subscriber in; `Err` is the
    /// outcome to return (stopped first, or failed).
    async fn admit<T>(
        &mut self,
        connect: impl std::future::Future<Output = Result<T, String>>,
    ) -> Result<T, Outcome> {
        let mut out = Outcome::default();
        let permit = tokio::select! {
            p = self.limit.acquire() => p,
            _ = self.stop.changed() => return Err(out),
        };
        let res = tokio::select! {
            r = connect => r,
            _ = self.stop.changed() => return Err(out),
        };
        drop(permit);
        match res {
            Ok(c) => {
                self.shared.per_channel[self.channel].fetch_add(1, Ordering::Relaxed);
                self.shared.connected.fetch_add(1, Ordering::Relaxed);
                Ok(c)
            }
            Err(e) => {
                self.shared.failed.fetch_add(1, Ordering::Relaxed);
                out.error = Some(e);
                Err(out)
            }
        }
    }

    /// Reads frames from an open connection until told to stop or to leave, or until the
    /// connection ends.
    pub async fn serve(mut self, mut ws: Ws) -> Outcome {
        let mut out = Outcome::default();
        let shared = self.shared.clone();
        let leave = self.leave.take();
        let left = told_to_leave(leave);
        tokio::pin!(left);
        // One stop future for the whole loop: making a new one per frame costs more than
        // the frame itself.
        let mut stop = self.stop.clone();
        let stopped = stop.changed();
        tokio::pin!(stopped);
        let mut leaving = false;
        loop {
            let frame = tokio::select! {
                biased;
                _ = &mut stopped => break,
                _ = &mut left => {
                    leaving = true;
                    break;
                }
                f = ws.next() => f,
            };
            match frame {
                Some(Ok(Message::Text(t))) => self.record(&mut out, t.as_bytes()),
                Some(Ok(Message::Binary(b))) => {
                    out.binary += 1;
                    self.record(&mut out, &b)
                }
                Some(Ok(Message::Close(c))) => {
                    out.error = Some(format!("closed by the server: {c:?}"));
                    shared.dropped.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                // Pings are answered by tungstenite itself.
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    out.error = Some(format!("read: {e}"));
                    shared.dropped.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                None => {
                    out.error = Some("connection closed".into());
                    shared.dropped.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
        }
        if leaving {
            return leave_now(ws, out, self.leave_mode).await;
        }
        out
    }

    /// The same for an EventSource subscriber (churn is WebSocket only: told to leave, it
    /// drops its connection).
    async fn run_eventsource(mut self, url: &str) -> Outcome {
        match self.admit(eventsource::connect(url, self.connect_timeout)).await {
            Ok(es) => self.serve_http(es, "stream ended").await,
            Err(out) => out,
        }
    }

    /// The same for a long-polling subscriber: each answer's messages, then the next poll.
    async fn run_longpoll(mut self, url: &str) -> Outcome {
        match self.admit(longpoll::connect(url, self.connect_timeout)).await {
            Ok(lp) => self.serve_http(lp, "connection closed").await,
            Err(out) => out,
        }
    }

    /// Reads an HTTP subscriber's messages until told to stop or to leave, or until its
    /// connection ends (`ended` says so).
    async fn serve_http(mut self, mut stream: impl HttpMessages, ended: &str) -> Outcome {
        let mut out = Outcome::default();
        let shared = self.shared.clone();
        let mut stop = self.stop.clone();
        let stopped = stop.changed();
        tokio::pin!(stopped);
        let leave = self.leave.take();
        let left = told_to_leave(leave);
        tokio::pin!(left);
        loop {
            let next = tokio::select! {
                biased;
                _ = &mut stopped => break,
                _ = &mut left => {
                    out.left = true;
                    break;
                }
                n = stream.next_messages() => n,
            };
            match next {
                Some(Ok(messages)) => messages.iter().for_each(|m| self.record(&mut out, m)),
                Some(Err(e)) => {
                    out.error = Some(e);
                    shared.dropped.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                None => {
                    out.error = Some(ended.into());
                    shared.dropped.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
        }
        out
    }

    fn record(&self, out: &mut Outcome, data: &[u8]) {
        let now = now_ns();
        match parse_t(data) {
            Some(t) if t < self.since_ns => {
                out.stale += 1;
                return;
            }
            Some(t) => {
                out.received += 1;
                let us = now.saturating_sub(t) / 1000;
                out.latencies.push(us.min(u64::from(u32::MAX)) as u32);
            }
            None => {
                out.received += 1;
                out.unparsed += 1;
            }
        }
        self.shared.received.fetch_add(1, Ordering::Relaxed);
        self.shared.last_recv_ns.fetch_max(now, Ordering::Relaxed);
    }
}

/// An HTTP subscriber's messages as they come: `None` once its connection has ended.
trait HttpMessages {
    async fn next_messages(&mut self) -> Option<Result<Vec<Vec<u8>>, String>>;
}

impl HttpMessages for eventsource::EventStream {
    async fn next_messages(&mut self) -> Option<Result<Vec<Vec<u8>>, String>> {
        Some(self.next_event().await?.map(|data| vec![data]))
    }
}

impl HttpMessages for longpoll::LongPoll {
    async fn next_messages(&mut self) -> Option<Result<Vec<Vec<u8>>, String>> {
        longpoll::LongPoll::next_messages(self).await
    }
}

/// Resolves when the churn phase says to leave; never if it does not (or drops its sender).
async fn told_to_leave(leave: Option<oneshot::Receiver<()>>) {
    let told = match leave {
        Some(rx) => rx.await.is_ok(),
        None => false,
    };
    if !told {
        std::future::pending::<()>().await
    }
}

/// Leaves as told: a close frame and the server's answer, or the TCP connection dropped.
async fn leave_now(mut ws: Ws, mut out: Outcome, mode: LeaveMode) -> Outcome {
    out.left = true;
    if mode == LeaveMode::Drop {
        drop(ws);
        return out;
    }
    let handshake = async {
        let frame = CloseFrame { code: CloseCode::Normal, reason: "".into() };
        ws.close(Some(frame)).await.map_err(|e| format!("leave: sending the close: {e}"))?;
        let mut answered = false;
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(_))) => answered = true,
                Some(Ok(_)) => {}
                None | Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => {
                    return if answered {
                        Ok(())
                    } else {
                        Err("leave: connection ended without the server's close frame".into())
                    };
                }
                Some(Err(e)) => return Err(format!("leave: {e}")),
            }
        }
    };
    match tokio::time::timeout(LEAVE_TIMEOUT, handshake).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => out.error = Some(e),
        Err(_) => out.error = Some("leave: no close from the server within 5 s".into()),
    }
    out
}
