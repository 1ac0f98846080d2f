//! The worker-local channel hub: which subscribers hold which PostgreSQL channel.
//!
//! It decides when the worker must LISTEN (first subscriber of a channel) and UNLISTEN
//! (last one gone), so subscribers that churn never leave a stale LISTEN behind. A channel
//! whose last subscriber was one that comes straight back (a long-poll, between two polls)
//! lingers instead: it stays listened, with no subscriber, until two [`Hub::sweep`]s in a
//! row find it empty.
//!
//! Each channel keeps its subscribers in a slab: joining returns a stable [`Slot`], and
//! leaving with that slot is O(1) however many subscribers the channel has (10k leaves
//! on one channel used to be quadratic with a scanned `Vec`).

use std::collections::HashMap;
use std::rc::Rc;

use slab::Slab;

/// What the side connection must do after a change in the hub.
#[derive(Debug, PartialEq, Eq)]
pub enum ListenChange {
    None,
    Listen(String),
    Unlisten(String),
}

/// Where a subscriber sits in one channel; handed back to [`Hub::unsubscribe`].
pub type Slot = usize;

/// Subscribers by PostgreSQL channel name; `K` identifies a subscriber.
#[derive(Debug)]
pub struct Hub<K> {
    /// Keyed by a shared name: subscribers keep a clone instead of their own copy.
    channels: HashMap<Rc<str>, Channel<K>>,
}

/// One channel with subscribers in this worker.
#[derive(Debug)]
struct Channel<K> {
    subs: Slab<K>,
    /// Messages received since the channel got its first subscriber: `~id~` and the
    /// publisher's `published_messages`.
    messages: u64,
    /// Sweeps that found it lingering (no subscriber).
    idle: u8,
}

impl<K> Default for Hub<K> {
    fn default() -> Self {
        Self { channels: HashMap::new() }
    }
}

impl<K: Copy + PartialEq> Hub<K> {
    /// Adds a subscriber to a channel: the channel's shared name and the slot to leave
    /// with. The caller joins each channel once.
    pub fn subscribe(&mut self, channel: &str, key: K) -> (Rc<str>, Slot, ListenChange) {
        if let Some((name, _)) = self.channels.get_key_value(channel) {
            let name = name.clone();
            let ch = self.channels.get_mut(channel).expect("just found");
            ch.idle = 0;
            return (name, ch.subs.insert(key), ListenChange::None);
        }
        let name: Rc<str> = Rc::from(channel);
        // most channels have one subscriber per worker: no room for more until needed
        let mut subs = Slab::with_capacity(1);
        let slot = subs.insert(key);
        self.channels.insert(name.clone(), Channel { subs, messages: 0, idle: 0 });
        (name, slot, ListenChange::Listen(channel.to_string()))
    }

    /// Removes the subscriber in `slot`; a slot that does not hold `key` is ignored. With
    /// `linger`, a channel left empty stays (see [`Hub::sweep`]).
    pub fn unsubscribe(&mut self, channel: &str, slot: Slot, key: K, linger: bool) -> ListenChange {
        let Some(ch) = self.channels.get_mut(channel) else {
            return ListenChange::None;
        };
        if ch.subs.get(slot) == Some(&key) {
            ch.subs.remove(slot);
        }
        if ch.subs.is_empty() && !linger {
            self.channels.remove(channel);
            return ListenChange::Unlisten(channel.to_string());
        }
        ListenChange::None
    }

    /// Drops the lingering channels that the previous sweep found empty too, and returns
    /// them (to UNLISTEN); whether some still linger.
    pub fn sweep(&mut self) -> (Vec<String>, bool) {
        let mut gone = Vec::new();
        let mut lingering = false;
        self.channels.retain(|name, ch| {
            if !ch.subs.is_empty() {
                return true;
            }
            ch.idle += 1;
            if ch.idle >= 2 {
                gone.push(name.to_string());
                return false;
            }
            lingering = true;
            true
        });
        (gone, lingering)
    }

    /// The subscribers of a channel, copied (delivering may change the hub).
    pub fn subscribers(&self, channel: &str) -> Vec<K> {
        self.channels
            .get(channel)
            .map(|c| c.subs.iter().map(|(_, k)| *k).collect())
            .unwrap_or_default()
    }

    /// Every subscriber of every channel (one per membership).
    pub fn all(&self) -> impl Iterator<Item = K> + '_ {
        self.channels.values().flat_map(|c| c.subs.iter().map(|(_, k)| *k))
    }

    /// Counts a message received on `channel`; returns its number (from 1) and the
    /// subscribers to deliver it to, or `None` when nobody here subscribes.
    pub fn message(&mut self, channel: &str) -> Option<(u64, Vec<K>)> {
        let c = self.channels.get_mut(channel)?;
        c.messages += 1;
        Some((c.messages, c.subs.iter().map(|(_, k)| *k).collect()))
    }

    /// Messages received and subscribers, for the publisher's channel info.
    pub fn info(&self, channel: &str) -> (u64, usize) {
        self.channels.get(channel).map(|c| (c.messages, c.subs.len())).unwrap_or((0, 0))
    }

    /// The channels this worker must be listening on.
    pub fn channels(&self) -> impl Iterator<Item = &str> {
        self.channels.keys().map(|k| &**k)
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
        let (_, s1, c) = h.subscribe("news", 1);
        assert_eq!(c, ListenChange::Listen("news".into()));
        let (_, s2, c) = h.subscribe("news", 2);
        assert_eq!(c, ListenChange::None);
        assert_eq!(h.subscribers("news"), vec![1, 2]);
        assert_eq!(h.message("news"), Some((1, vec![1, 2])));
        assert_eq!(h.message("other"), None);
        assert_eq!(h.info("news"), (1, 2));
        assert_eq!(h.unsubscribe("news", s1, 1, false), ListenChange::None);
        // a stale slot (already left) changes nothing
        assert_eq!(h.unsubscribe("news", s1, 1, false), ListenChange::None);
        assert_eq!(h.unsubscribe("news", s2, 2, false), ListenChange::Unlisten("news".into()));
        assert_eq!(h.unsubscribe("news", s2, 2, false), ListenChange::None);
        assert!(h.is_empty());
        assert_eq!(h.subscribers("news"), Vec::<i32>::new());
    }

    #[test]
    fn a_lingering_channel_stays_listened_until_two_sweeps_find_it_empty() {
        let mut h = Hub::default();
        let (_, s1, _) = h.subscribe("poll", 1);
        assert_eq!(h.unsubscribe("poll", s1, 1, true), ListenChange::None);
        assert_eq!(h.message("poll"), Some((1, vec![])), "still listened, nobody to deliver to");
        // back before the sweeps: no new LISTEN, and it is not idle any more
        let (_, s2, c) = h.subscribe("poll", 2);
        assert_eq!(c, ListenChange::None);
        assert_eq!(h.sweep(), (vec![], false));
        h.unsubscribe("poll", s2, 2, true);
        assert_eq!(h.sweep(), (vec![], true), "one sweep: it lingers");
        assert_eq!(h.sweep(), (vec!["poll".to_string()], false), "two: UNLISTEN");
        assert!(h.is_empty());
        let (_, _, c) = h.subscribe("poll", 3);
        assert_eq!(c, ListenChange::Listen("poll".into()));
    }

    #[test]
    fn a_reused_slot_is_not_left_by_its_former_owner() {
        let mut h = Hub::default();
        let (_, s1, _) = h.subscribe("c", 1);
        let (_, _s2, _) = h.subscribe("c", 2);
        h.unsubscribe("c", s1, 1, false);
        let (_, s3, _) = h.subscribe("c", 3);
        assert_eq!(s3, s1, "the slab reuses the freed slot");
        assert_eq!(h.unsubscribe("c", s1, 1, false), ListenChange::None);
        let mut subs = h.subscribers("c");
        subs.sort();
        assert_eq!(subs, vec![2, 3]);
    }

    #[test]
    fn ten_thousand_leaves_on_one_channel() {
        let mut h = Hub::default();
        let slots: Vec<(Slot, u32)> = (0..10_000).map(|k| (h.subscribe("big", k).1, k)).collect();
        for (slot, k) in slots.iter().rev().step_by(2).chain(slots.iter().step_by(2)) {
            h.unsubscribe("big", *slot, *k, false);
        }
        assert!(h.is_empty());
    }

    #[test]
    fn churn_leaves_nothing_behind() {
        // a deterministic mix of joins and leaves over a few channels: the LISTEN state
        // implied by the changes must always equal the channels that have subscribers
        let mut h = Hub::default();
        let mut listening = std::collections::BTreeSet::new();
        let mut seed: u32 = 7;
        let mut live: Vec<(String, u32, Slot)> = Vec::new();
        for _ in 0..5000 {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            let ch = format!("c{}", (seed >> 16) % 5);
            let key = (seed >> 8) % 50;
            let change = if (seed >> 4) % 3 == 0 || live.is_empty() {
                if live.iter().any(|(c, k, _)| *c == ch && *k == key) {
                    continue;
                }
                let (_, slot, change) = h.subscribe(&ch, key);
                live.push((ch.clone(), key, slot));
                change
            } else {
                let (c, k, slot) = live.swap_remove((seed as usize >> 3) % live.len());
                h.unsubscribe(&c, slot, k, false)
            };
            match change {
                ListenChange::Listen(c) => assert!(listening.insert(c)),
                ListenChange::Unlisten(c) => assert!(listening.remove(&c)),
                ListenChange::None => {}
            }
            let mut want: Vec<&str> = h.channels().collect();
            want.sort();
            assert_eq!(want, listening.iter().map(String::as_str).collect::<Vec<_>>());
            assert_eq!(h.all().count(), live.len());
        }
        for (c, k, slot) in live {
            h.unsubscribe(&c, slot, k, false);
        }
        assert!(h.is_empty());
    }
}
