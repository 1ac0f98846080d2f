//! Subscriber churn: with the subscribers connected, K loops each make one subscriber
//! leave (a close handshake, or the connection dropped) and open a new one in its place
//! until its handshake completes (the 101), for a given time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch, Semaphore};
use tokio::task::JoinHandle;

use crate::subscribe::{self, LeaveMode, Outcome, Shared, Subscriber, LEAVE_TIMEOUT};

/// One place in the pool of subscribers: the task serving it and the way to make it leave.
/// Empty after a replacement failed to connect (the next visit connects one).
#[derive(Default)]
pub struct Slot {
    pub channel: usize,
    pub url: String,
    pub handle: Option<JoinHandle<Outcome>>,
    pub leave: Option<oneshot::Sender<()>>,
}

/// What every churn loop shares.
pub struct Churn {
    pub leave_mode: LeaveMode,
    pub connect_timeout: Duration,
    pub shared: Arc<Shared>,
    pub stop: watch::Receiver<bool>,
    pub since_ns: u64,
    /// Not used by the replacements (they connect at once), only carried by Subscriber.
    pub limit: Arc<Semaphore>,
}

/// What one loop (or, merged, all of them) counted.
#[derive(Default)]
pub struct ChurnStats {
    /// Subscribers that left as asked (close answered, or connection dropped).
    pub leaves: u64,
    /// Leaves that went wrong: no close answer in time, an error.
    pub leave_failed: u64,
    /// Subscribers found already ended (the server closed them) when their turn came.
    pub gone: u64,
    /// Replacements whose handshake completed.
    pub connects: u64,
    pub connect_failed: u64,
    /// Handshake times (TCP connect to the 101) in microseconds.
    pub handshake_us: Vec<u32>,
    /// Leave times (close sent to the server's close and end of stream) in microseconds.
    pub leave_us: Vec<u32>,
    /// The subscribers that ended during the churn, and failed connects, for the report's
    /// error summary.
    pub outcomes: Vec<Outcome>,
}

impl ChurnStats {
    pub fn merge(&mut self, other: ChurnStats) {
        self.leaves += other.leaves;
        self.leave_failed += other.leave_failed;
        self.gone += other.gone;
        self.connects += other.connects;
        self.connect_failed += other.connect_failed;
        self.handshake_us.extend(other.handshake_us);
        self.leave_us.extend(other.leave_us);
        self.outcomes.extend(other.outcomes);
    }
}

fn micros(d: Duration) -> u32 {
    d.as_micros().min(u128::from(u32::MAX)) as u32
}

/// Deals `items` into `k` hands, round-robin: item i goes to hand i % k.
pub fn deal<T>(items: Vec<T>, k: usize) -> Vec<Vec<T>> {
    let k = k.max(1);
    let mut hands: Vec<Vec<T>> = (0..k).map(|_| Vec::with_capacity(items.len() / k + 1)).collect();
    for (i, item) in items.into_iter().enumerate() {
        hands[i % k].push(item);
    }
    hands
}

impl Churn {
    /// Starts serving `ws` in a new task, in `slot`.
    fn spawn(&self, slot: &mut Slot, ws: subscribe::Ws) {
        let (tx, rx) = oneshot::channel();
        let sub = Subscriber {
            url: slot.url.clone(),
            channel: slot.channel,
            limit: self.limit.clone(),
            connect_timeout: self.connect_timeout,
            shared: self.shared.clone(),
            stop: self.stop.clone(),
            since_ns: self.since_ns,
            leave: Some(rx),
            leave_mode: self.leave_mode,
            long_poll: false,
        };
        slot.handle = Some(tokio::spawn(sub.serve(ws)));
        slot.leave = Some(tx);
    }

    /// Makes the slot's subscriber leave and waits for it to be gone.
    async fn leave(&self, slot: &mut Slot, stats: &mut ChurnStats) {
        let Some(handle) = slot.handle.take() else { return };
        let started = Instant::now();
        // A subscriber already ended has dropped its receiver.
        let told = slot.leave.take().is_some_and(|tx| tx.send(()).is_ok());
        let abort = handle.abort_handle();
        match tokio::time::timeout(LEAVE_TIMEOUT + Duration::from_secs(1), handle).await {
            Ok(Ok(outcome)) => {
                if !told || !outcome.left {
                    stats.gone += 1;
                } else if outcome.error.is_none() {
                    stats.leaves += 1;
                    stats.leave_us.push(micros(started.elapsed()));
                } else {
                    stats.leave_failed += 1;
                }
                stats.outcomes.push(outcome);
            }
            Ok(Err(_)) => stats.leave_failed += 1,
            Err(_) => {
                abort.abort();
                stats.leave_failed += 1;
            }
        }
    }

    /// One loop: visits its slots in turn until `end`, replacing each subscriber.
    pub async fn run_loop(
        self: Arc<Self>,
        mut slots: Vec<Slot>,
        end: Instant,
    ) -> (Vec<Slot>, ChurnStats) {
        let mut stats = ChurnStats::default();
        if slots.is_empty() {
            return (slots, stats);
        }
        let n = slots.len();
        let mut i = 0;
        while Instant::now() < end {
            let slot = &mut slots[i];
            i = (i + 1) % n;
            self.leave(slot, &mut stats).await;
            let started = Instant::now();
            match subscribe::connect(&slot.url, self.connect_timeout).await {
                Ok(ws) => {
                    stats.connects += 1;
                    stats.handshake_us.push(micros(started.elapsed()));
                    self.spawn(slot, ws);
                }
                Err(e) => {
                    stats.connect_failed += 1;
                    stats.outcomes.push(Outcome { error: Some(e), ..Outcome::default() });
                    // Do not spin against a server that refuses at once.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        (slots, stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deals_round_robin() {
        let hands = deal((0..7).collect(), 3);
        assert_eq!(hands, vec![vec![0, 3, 6], vec![1, 4], vec![2, 5]]);
        let hands = deal((0..2).collect::<Vec<i32>>(), 4);
        assert_eq!(hands.len(), 4);
        assert_eq!(hands.iter().map(Vec::len).sum::<usize>(), 2);
        assert_eq!(deal(vec![1], 0), vec![vec![1]]);
    }

    #[test]
    fn merges_counts() {
        let mut a =
            ChurnStats { leaves: 1, connects: 2, handshake_us: vec![5], ..Default::default() };
        let b = ChurnStats {
            leaves: 3,
            connect_failed: 1,
            handshake_us: vec![7, 9],
            leave_us: vec![1],
            ..Default::default()
        };
        a.merge(b);
        assert_eq!((a.leaves, a.connects, a.connect_failed), (4, 2, 1));
        assert_eq!(a.handshake_us, vec![5, 7, 9]);
        assert_eq!(a.leave_us, vec![1]);
    }

    #[test]
    fn micros_saturate() {
        assert_eq!(micros(Duration::from_millis(3)), 3000);
        assert_eq!(micros(Duration::from_secs(1 << 40)), u32::MAX);
    }
}
