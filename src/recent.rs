//! A worker's recent stored messages of one listened channel, so that the common resume
//! (a client that reconnects to a busy channel with a backtrack, a last event id or a
//! time and tag a moment old) needs no query.
//!
//! The cache holds the newest messages the worker delivered, contiguous by offset and
//! ending at the worker's position on the channel: any request whose answer lies wholly
//! inside it is answered from it; any other goes to PostgreSQL. It is bounded in messages
//! ([`RECENT_MESSAGES`]) and bytes ([`RECENT_BYTES`]).

use std::collections::VecDeque;
use std::rc::Rc;

use crate::postgres::store::{Since, Stored};

/// Messages kept per channel.
pub const RECENT_MESSAGES: usize = 32;
/// Payload bytes kept per channel (a message larger than this is never cached).
pub const RECENT_BYTES: usize = 64 * 1024;

#[derive(Default)]
pub struct Recent {
    messages: VecDeque<Rc<Stored>>,
    bytes: usize,
}

/// Limits a history answer must respect.
#[derive(Clone, Copy, Debug)]
pub struct Keep {
    /// `push_stream_max_messages_stored_per_channel`.
    pub max_stored: Option<i64>,
    /// Messages older than this second have expired (`push_stream_message_ttl`).
    pub oldest_second: i64,
}

impl Recent {
    /// A message the worker delivered, in order. A message that does not follow the last
    /// one (another epoch, or a hole) starts the cache again.
    pub fn push(&mut self, m: Rc<Stored>) {
        let len = m.message.bytes().len();
        let follows = self
            .messages
            .back()
            .map_or(true, |last| last.epoch == m.epoch && last.offset + 1 == m.offset);
        if !follows || len > RECENT_BYTES {
            self.messages.clear();
            self.bytes = 0;
            if len > RECENT_BYTES {
                return;
            }
        }
        self.bytes += len;
        self.messages.push_back(m);
        while self.messages.len() > RECENT_MESSAGES || self.bytes > RECENT_BYTES {
            if let Some(old) = self.messages.pop_front() {
                self.bytes -= old.message.bytes().len();
            }
        }
    }

    /// The offset of the newest message held, if any.
    pub fn newest(&self) -> Option<(i64, i64)> {
        self.messages.back().map(|m| (m.epoch, m.offset))
    }

    pub fn len(&self) -> usize {
        self.messages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// The answer to `since`, if the cache holds all of it. `position` is the worker's
    /// (epoch, offset) on the channel: the cache must end there.
    pub fn answer(&self, since: &Since, position: (i64, i64), keep: Keep) -> Option<Vec<Stored>> {
        if self.newest() != Some(position) {
            return None;
        }
        let last = position.1;
        // the oldest offset history may return: the count limit and the ttl
        let floor = keep.max_stored.map_or(1, |max| last - max + 1);
        let kept = |m: &&Rc<Stored>| m.offset >= floor && m.second >= keep.oldest_second;
        let first = self.messages.front()?;
        let answer: Vec<Stored> = match since {
            Since::Backtrack(n) => {
                let from = (last - i64::from(*n) + 1).max(floor).max(1);
                // every message from `from` on must be here, and none of them expired
                if first.offset > from {
                    return None;
                }
                let picked: Vec<&Rc<Stored>> =
                    self.messages.iter().filter(|m| m.offset >= from).collect();
                if picked.iter().any(|m| !kept(m)) {
                    return None;
                }
                picked.into_iter().map(|m| (**m).clone()).collect()
            }
            Since::EventId(id) => {
                let at = self
                    .messages
                    .iter()
                    .rposition(|m| m.event_id.as_deref() == Some(id.as_str()))?;
                if !kept(&&self.messages[at]) {
                    return None;
                }
                self.messages.iter().skip(at + 1).map(|m| (**m).clone()).collect()
            }
            Since::Time { second, tag } => {
                // the first message of the cache must be at or before the position asked,
                // so that nothing after it is missing
                if (first.second, first.tag) > (*second, *tag) || !kept(&first) {
                    return None;
                }
                self.messages
                    .iter()
                    .filter(|m| (m.second, m.tag) > (*second, *tag))
                    .map(|m| (**m).clone())
                    .collect()
            }
            Since::Position { epoch, offset } => {
                // the cache must hold the position's successor, in the same epoch
                if first.epoch != *epoch || first.offset > offset + 1 || !kept(&first) {
                    return None;
                }
                if *offset > last {
                    return None;
                }
                self.messages.iter().filter(|m| m.offset > *offset).map(|m| (**m).clone()).collect()
            }
            Since::After { .. } => return None,
        };
        Some(answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::payload::Message;

    fn m(offset: i64, second: i64, tag: i64, event: Option<&str>) -> Rc<Stored> {
        Rc::new(Stored {
            epoch: 7,
            offset,
            second,
            tag,
            message: Message::Text(format!("m{offset}").into_bytes().into()),
            event_id: event.map(str::to_string),
            event_type: None,
        })
    }

    fn offsets(v: Option<Vec<Stored>>) -> Option<Vec<i64>> {
        v.map(|l| l.iter().map(|s| s.offset).collect())
    }

    const ALL: Keep = Keep { max_stored: None, oldest_second: 0 };

    #[test]
    fn answers_only_what_it_holds_whole() {
        let mut r = Recent::default();
        for o in 5..=10 {
            r.push(m(o, 100 + o, 1, (o == 7).then_some("e7")));
        }
        let at = (7, 10);
        assert_eq!(offsets(r.answer(&Since::Backtrack(3), at, ALL)), Some(vec![8, 9, 10]));
        assert_eq!(offsets(r.answer(&Since::Backtrack(6), at, ALL)), Some(vec![5, 6, 7, 8, 9, 10]));
        // offsets 1..4 exist in the store but not here
        assert_eq!(offsets(r.answer(&Since::Backtrack(7), at, ALL)), None);
        // unless the limit says they are not kept
        let four = Keep { max_stored: Some(4), oldest_second: 0 };
        assert_eq!(offsets(r.answer(&Since::Backtrack(9), at, four)), Some(vec![7, 8, 9, 10]));
        assert_eq!(offsets(r.answer(&Since::EventId("e7".into()), at, ALL)), Some(vec![8, 9, 10]));
        assert_eq!(offsets(r.answer(&Since::EventId("nope".into()), at, ALL)), None);
        let t = |second, tag| Since::Time { second, tag };
        assert_eq!(offsets(r.answer(&t(108, 1), at, ALL)), Some(vec![9, 10]));
        assert_eq!(offsets(r.answer(&t(104, 0), at, ALL)), None);
        assert_eq!(offsets(r.answer(&t(110, 1), at, ALL)), Some(vec![]));
        let p = |epoch, offset| Since::Position { epoch, offset };
        assert_eq!(offsets(r.answer(&p(7, 8), at, ALL)), Some(vec![9, 10]));
        assert_eq!(offsets(r.answer(&p(7, 4), at, ALL)), Some(vec![5, 6, 7, 8, 9, 10]));
        assert_eq!(offsets(r.answer(&p(7, 3), at, ALL)), None, "4 is not here");
        assert_eq!(offsets(r.answer(&p(6, 8), at, ALL)), None, "another epoch: a gap to tell");
        assert_eq!(offsets(r.answer(&p(7, 10), at, ALL)), Some(vec![]));
        // a cache that does not end at the worker's position answers nothing
        assert_eq!(offsets(r.answer(&Since::Backtrack(1), (7, 11), ALL)), None);
        // expired messages are not answered from the cache
        let ttl = Keep { max_stored: None, oldest_second: 108 };
        assert_eq!(offsets(r.answer(&Since::Backtrack(3), at, ttl)), Some(vec![8, 9, 10]));
        // offset 7 expired: PostgreSQL knows what is kept
        assert_eq!(offsets(r.answer(&Since::Backtrack(4), at, ttl)), None);
    }

    #[test]
    fn a_last_event_id_is_a_position_or_an_event_id() {
        assert_eq!(
            Since::from_last_event_id(b"1764:12"),
            Since::Position { epoch: 1764, offset: 12 }
        );
        assert_eq!(Since::from_last_event_id(b"e7"), Since::EventId("e7".into()));
        assert_eq!(Since::from_last_event_id(b"1:x"), Since::EventId("1:x".into()));
        assert_eq!(Since::from_last_event_id(b":3"), Since::EventId(":3".into()));
        assert_eq!(Since::from_last_event_id(b"1:2:3"), Since::EventId("1:2:3".into()));
    }

    #[test]
    fn stays_bounded_and_contiguous() {
        let mut r = Recent::default();
        for o in 1..=100 {
            r.push(m(o, 1, o, None));
        }
        assert_eq!(r.len(), RECENT_MESSAGES);
        assert_eq!(r.newest(), Some((7, 100)));
        r.push(m(150, 1, 1, None));
        assert_eq!(r.len(), 1, "a hole starts again");
        let big = Rc::new(Stored {
            message: Message::Text(vec![b'x'; RECENT_BYTES + 1].into()),
            ..(*m(151, 1, 1, None)).clone()
        });
        r.push(big);
        assert!(r.is_empty(), "a message larger than the cache is not kept");
        for o in 200..210 {
            r.push(Rc::new(Stored {
                message: Message::Text(vec![b'y'; RECENT_BYTES / 4].into()),
                ..(*m(o, 1, 1, None)).clone()
            }));
        }
        assert!(r.len() <= 4);
    }
}
