//! The worker-local channel hub: which subscribers hold which PostgreSQL channel.
//!
//! It decides when the worker must LISTEN (first subscriber of a channel) and UNLISTEN
//! (last one gone), so subscribers that churn never leave a stale LISTEN behind.

use std::collections::HashMap;

/// What the side connection must do after a change in the hub.
#[derive(Debug, PartialEq, Eq)]
pub enum ListenChange {
    None,
    Listen(String),
    Unlisten(String),
}

/// Subscribers by PostgreSQL channel name; `K` identifies a subscriber.
#[derive(Debug)]
pub struct Hub<K> {
    channels: HashMap<String, Channel<K>>,
}

/// One channel with subscribers in this worker.
#[derive(Debug)]
struct Channel<K> {
    subs: Vec<K>,
    /// Messages received since the channel got its first subscriber: `~id~` and the
    /// publisher's `published_messages`.
    messages: u64,
}

impl<K> Default for Hub<K> {
    fn default() -> Self {
        Self { channels: HashMap::new() }
    }
}

impl<K: Copy + PartialEq> Hub<K> {
    /// Adds a subscriber; a repeated (channel, key) pair is ignored.
    pub fn subscribe(&mut self, channel: &str, key: K) -> ListenChange {
        match self.channels.get_mut(channel) {
            Some(ch) => {
                if !ch.subs.contains(&key) {
                    ch.subs.push(key);
                }
                ListenChange::None
            }
            None => {
                self.channels.insert(channel.to_string(), Channel { subs: vec![key], messages: 0 });
                ListenChange::Listen(channel.to_string())
            }
        }
    }

    /// Removes a subscriber; unknown pairs are ignored.
    pub fn unsubscribe(&mut self, channel: &str, key: K) -> ListenChange {
        let Some(Channel { subs, .. }) = self.channels.get_mut(channel) else {
            return ListenChange::None;
        };
        if let Some(pos) = subs.iter().position(|k| *k == key) {
            // order of delivery within a channel does not depend on subscriber order
            subs.swap_remove(pos);
        }
        if subs.is_empty() {
            self.channels.remove(channel);
            return ListenChange::Unlisten(channel.to_string());
        }
        ListenChange::None
    }

    pub fn subscribers(&self, channel: &str) -> &[K] {
        self.channels.get(channel).map(|c| c.subs.as_slice()).unwrap_or_default()
    }

    /// Counts a message received on `channel`; returns its number (from 1) and the
    /// subscribers to deliver it to, or `None` when nobody here subscribes.
    pub fn message(&mut self, channel: &str) -> Option<(u64, &[K])> {
        let c = self.channels.get_mut(channel)?;
        c.messages += 1;
        Some((c.messages, &c.subs))
    }

    /// Messages received and subscribers, for the publisher's channel info.
    pub fn info(&self, channel: &str) -> (u64, usize) {
        self.channels.get(channel).map(|c| (c.messages, c.subs.len())).unwrap_or((0, 0))
    }

    /// The channels this worker must be listening on.
    pub fn channels(&self) -> impl Iterator<Item = &str> {
        self.channels.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.channels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.channels.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_on_first_unlisten_after_last() {
        let mut h = Hub::default();
        assert_eq!(h.subscribe("news", 1), ListenChange::Listen("news".into()));
        assert_eq!(h.subscribe("news", 2), ListenChange::None);
        assert_eq!(h.subscribe("news", 2), ListenChange::None);
        assert_eq!(h.subscribers("news"), &[1, 2]);
        assert_eq!(h.message("news"), Some((1, &[1, 2][..])));
        assert_eq!(h.message("other"), None);
        assert_eq!(h.info("news"), (1, 2));
        assert_eq!(h.unsubscribe("news", 1), ListenChange::None);
        assert_eq!(h.unsubscribe("news", 1), ListenChange::None);
        assert_eq!(h.unsubscribe("news", 2), ListenChange::Unlisten("news".into()));
        assert_eq!(h.unsubscribe("news", 2), ListenChange::None);
        assert!(h.is_empty());
        assert_eq!(h.subscribers("news"), &[] as &[i32]);
    }

    #[test]
    fn churn_leaves_nothing_behind() {
        // a deterministic mix of joins and leaves over a few channels: the LISTEN state
        // implied by the changes must always equal the channels that have subscribers
        let mut h = Hub::default();
        let mut listening = std::collections::BTreeSet::new();
        let mut seed: u32 = 7;
        let mut live: Vec<(String, u32)> = Vec::new();
        for _ in 0..5000 {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            let ch = format!("c{}", (seed >> 16) % 5);
            let key = (seed >> 8) % 50;
            let change = if (seed >> 4) % 3 == 0 || live.is_empty() {
                if !live.contains(&(ch.clone(), key)) {
                    live.push((ch.clone(), key));
                }
                h.subscribe(&ch, key)
            } else {
                let (c, k) = live.swap_remove((seed as usize >> 3) % live.len());
                h.unsubscribe(&c, k)
            };
            match change {
                ListenChange::Listen(c) => assert!(listening.insert(c)),
                ListenChange::Unlisten(c) => assert!(listening.remove(&c)),
                ListenChange::None => {}
            }
            let mut want: Vec<&str> = h.channels().collect();
            want.sort();
            assert_eq!(want, listening.iter().map(String::as_str).collect::<Vec<_>>());
        }
        for (c, k) in live {
            h.unsubscribe(&c, k);
        }
        assert!(h.is_empty());
    }
}
