//! The subscription lifecycle, the same for every transport: admit, join the hub, deliver,
//! leave.
//!
//! A transport (WebSocket today; EventSource, streaming and long-polling plug in the same
//! way) owns its connection and implements [`Transport`]. It embeds a [`Subscription`]:
//! the channels it joined and what the lifecycle keeps for it. The lifecycle knows
//! subscribers only by [`SubKey`], a pointer to the transport that stays valid from
//! [`join`] until [`leave`], which every transport calls from its cleanup.
//!
//! - **join**: every channel is added to the worker's hub; the first subscriber of a
//!   channel makes the worker LISTEN, and the transport's [`Transport::ready`] is called
//!   once every LISTEN it needs is confirmed (so nothing published after it answers its
//!   client is missed).
//! - **deliver**: a notification is encoded once per [`Transport::encoding`] and queued on
//!   every subscriber of its channel; queued output is flushed once per batch.
//! - **leave**: the subscriber leaves its channels; the last one out makes the worker
//!   UNLISTEN.
//!
//! Re-entrancy: like the worker state, the registry is borrowed only inside [`with`], and
//! transports (whose methods may finalize a request, whose cleanup calls [`leave`]) are
//! only called outside it.

use core::ptr::{self, NonNull};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use nginx_sys::ngx_http_request_t;

use crate::hub::{Hub, ListenChange, Slot};
use crate::nginx::conf::LocConf;
use crate::nginx::events::{self, Event};
use crate::nginx::hooks::{self, Hooks};
use crate::nginx::{http, worker, zone};
use crate::postgres::cells::Reply;
use crate::postgres::store::{self, Since};
use crate::protocol::payload;
use crate::protocol::template::Values;
use crate::recent::{Keep, Recent};

/// push-stream's special message ids go down from -1 (ping, channel deleted, long-poll
/// timeout); this one tells that messages may have been missed.
pub const GAP_ID: i64 = -4;

/// What a transport does for the lifecycle.
pub trait Transport {
    fn subscription(&mut self) -> &mut Subscription;

    /// Every LISTEN is confirmed: answer the client. May finalize (and so [`leave`]).
    fn ready(&mut self);

    /// Takes messages now (a transport still waiting for LISTEN queues them).
    fn accepts(&self) -> bool;

    /// Subscribers with equal encodings share one encoded message.
    fn encoding(&self) -> Encoding;

    /// One message as this transport writes it.
    fn encode(&self, message: &Values<'_>) -> Rc<[u8]>;

    /// Queues an encoded message; the transport enforces its own output limit.
    fn queue(&mut self, encoded: Rc<[u8]>, channel: &str);

    /// Writes what is queued. May finalize.
    fn flush(&mut self);

    /// The worker is shutting down: tell the client and close. May finalize.
    fn going_away(&mut self);

    /// What a publish hook sent back, for this client only. May finalize.
    fn reply(&mut self, rows: Vec<Reply>);

    /// Its last channel was deleted: end the response as at its ttl. May finalize.
    fn finish(&mut self);

    /// Whether its client comes straight back when it leaves (a long-poll): its channels
    /// then linger, listened, rather than being UNLISTENed at once.
    fn lingers(&self) -> bool {
        false
    }
}

/// Identifies how a message is encoded: the transport kind and its location's template.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Encoding {
    pub kind: u16,
    pub template: *const (),
}

/// What the lifecycle keeps inside each transport.
#[derive(Default)]
pub struct Subscription {
    /// PostgreSQL channel names (shared with the hub once joined), with the slot held in
    /// each.
    channels: Box<[(Rc<str>, Slot)]>,
    /// LISTENs still to be confirmed.
    waiting: u32,
    /// Queued output not flushed yet.
    dirty: bool,
    /// The subscriber's hooks, when its location has some.
    hooks: Option<Box<Hooks>>,
    /// Where it resumes from the store, until its history is delivered (and what the
    /// history held, until live messages pass it).
    resume: Option<Box<Resume>>,
}

/// A subscriber's resume from the store: where each channel starts, and the live messages
/// that arrive while its history is read.
#[derive(Default)]
pub struct Resume {
    /// Per channel, in the subscription's order; `None` is live only.
    since: Vec<Option<Since>>,
    /// The history read in flight.
    reading: Option<u64>,
    /// Live messages held meanwhile: channel, offset (-1 when not stored), time and tag,
    /// encoded.
    held: Vec<HeldMessage>,
    /// Once the history is delivered: per channel, the newest offset it held. The store
    /// can be ahead of the notifications still on their way, so a live message up to it
    /// is a repeat; the entry goes with the first newer one.
    floor: Vec<(Rc<str>, i64)>,
}

/// A live message held for a resuming subscriber: its channel, offset (-1 when not
/// stored), time and tag, and encoding.
type HeldMessage = (Rc<str>, i64, (i64, u64), Rc<[u8]>);

impl Resume {
    /// Where the channels start, if any of them resumes.
    pub fn new(since: Vec<Option<Since>>) -> Option<Box<Self>> {
        since.iter().any(Option::is_some).then(|| Box::new(Self { since, ..Self::default() }))
    }
}

impl Subscription {
    /// A subscription to these PostgreSQL channels (repeats are joined once), admitted: the
    /// location's subscribe hooks run now, with the request.
    pub fn admit(
        r: &mut ngx_http_request_t,
        lcf: &'static LocConf,
        mut channels: Vec<(String, u32)>,
    ) -> Self {
        let mut seen = std::collections::HashSet::new();
        channels.retain(|(c, _)| seen.insert(c.clone()));
        let prefix = http::main_conf(r).channel_prefix().len();
        let ids: Vec<&str> = channels.iter().map(|(c, _)| id_of(c, prefix)).collect();
        let hooks = hooks::admit(r, lcf, &ids);
        let backtracks: Vec<u32> = channels.iter().map(|(_, b)| *b).collect();
        let resume = Resume::new(resume_points(r, &backtracks));
        let channels = channels.into_iter().map(|(c, _)| (Rc::from(c), 0)).collect();
        Self { channels, hooks, resume, ..Self::default() }
    }

    /// The PostgreSQL channels subscribed to.
    pub fn channels(&self) -> impl Iterator<Item = &str> {
        self.channels.iter().map(|(c, _)| &**c)
    }

    /// LISTENs still to be confirmed.
    pub fn waiting(&self) -> usize {
        self.waiting as usize
    }
}

/// A subscriber, as the hub and the lifecycle's lists know it.
#[derive(Clone, Copy, Debug)]
pub struct SubKey(NonNull<dyn Transport>);

impl PartialEq for SubKey {
    fn eq(&self, other: &Self) -> bool {
        ptr::addr_eq(self.0.as_ptr(), other.0.as_ptr())
    }
}

impl Eq for SubKey {}

impl PartialOrd for SubKey {
    fn partial_cmp(&self, other: &Self) -> Option<core::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for SubKey {
    fn cmp(&self, other: &Self) -> core::cmp::Ordering {
        self.0.as_ptr().cast::<()>().cmp(&other.0.as_ptr().cast::<()>())
    }
}

impl SubKey {
    /// # Safety
    /// `t` stays at this address until it calls [`leave`] (from its cleanup).
    pub unsafe fn new(t: &mut (dyn Transport + 'static)) -> Self {
        Self(NonNull::from(t))
    }

    /// # Safety
    /// Keys are removed from every list in [`leave`], before the transport is freed, so a
    /// key that is still listed points at a live transport.
    unsafe fn get<'a>(self) -> &'a mut dyn Transport {
        unsafe { &mut *self.0.as_ptr() }
    }
}

#[derive(Default)]
struct Registry {
    hub: Hub<SubKey>,
    /// Channels whose LISTEN is not confirmed yet, with the subscribers waiting for it.
    waiting: HashMap<String, Vec<SubKey>>,
    /// Subscribers with fresh output, flushed once per batch of messages.
    dirty: Vec<SubKey>,
    /// With a store: where each listened channel stands, (epoch, offset) of the last stored
    /// message delivered; (0, 0) when it had none as it was first listened.
    positions: HashMap<String, (i64, i64)>,
    /// Channels catching up from the store, with the notifications held meanwhile.
    catching: HashMap<String, Vec<String>>,
    /// The newest stored messages delivered, per listened channel.
    recent: HashMap<String, Recent>,
    /// Resumes answered from `recent`, and read from PostgreSQL.
    cache_hits: u64,
    cache_misses: u64,
    /// The timer that sweeps lingering channels, armed while some linger.
    sweep: Option<&'static mut nginx_sys::ngx_event_t>,
}

/// How often lingering channels are swept: a channel left by its last long-poll is
/// UNLISTENed 2 to 4 s later if no poll came back.
const LINGER_SWEEP: nginx_sys::ngx_msec_t = 2000;

/// Arms the lingering channels' sweep, if it is not armed.
fn arm_sweep(reg: &mut Registry) {
    if reg.sweep.is_none() {
        // nginx's timer code reads an event's data as a connection
        let Some(conn) = worker::with(|w| w.conn) else { return };
        // SAFETY: an all-zero event is nginx's initial state; leaked, since a timer may
        // still be in nginx's tree as the worker exits (it is cancelable)
        let ev: &'static mut nginx_sys::ngx_event_t =
            Box::leak(Box::new(unsafe { core::mem::zeroed() }));
        ev.handler = Some(on_sweep);
        ev.data = conn.cast();
        // SAFETY: the running cycle's log (a worker's event loop logs through it)
        ev.log = unsafe { (*nginx_sys::ngx_cycle).log };
        ev.set_cancelable(1);
        reg.sweep = Some(ev);
    }
    let Some(ev) = reg.sweep.as_mut() else { return };
    if ev.timer_set() == 0 {
        // SAFETY: our own event
        unsafe { nginx_sys::ngx_add_timer(*ev, LINGER_SWEEP) };
    }
}

extern "C" fn on_sweep(_ev: *mut nginx_sys::ngx_event_t) {
    let unlisten = with(|reg| {
        let (gone, lingering) = reg.hub.sweep();
        for ch in &gone {
            reg.positions.remove(ch);
            reg.recent.remove(ch);
        }
        if lingering {
            arm_sweep(reg);
        }
        gone
    })
    .unwrap_or_default();
    if !unlisten.is_empty() {
        worker::with(|w| unlisten.into_iter().for_each(|ch| w.unlisten(ch)));
    }
}

thread_local! {
    static REGISTRY: RefCell<Registry> = RefCell::default();
}

fn with<R>(f: impl FnOnce(&mut Registry) -> R) -> Option<R> {
    REGISTRY.with(|r| match r.try_borrow_mut() {
        Ok(mut r) => Some(f(&mut r)),
        Err(_) => {
            worker::reentered();
            None
        }
    })
}

/// Joins every channel of the subscription; returns the number of LISTENs to wait for.
/// At zero the transport answers its client itself (from the event loop).
pub fn join(key: SubKey) -> usize {
    // SAFETY: the caller just made the key of a live transport
    let sub = unsafe { key.get() }.subscription();
    let (postgres, prefix) =
        worker::with(|w| (w.has_postgres(), w.prefix.len())).unwrap_or((false, 0));
    // the events are published once this subscriber's LISTENs are queued: the side
    // connection runs commands in order, so one that also listens to the events channel
    // hears of its own subscription
    let mut created = Vec::with_capacity(sub.channels.len());
    for (k, (channel, _)) in sub.channels.iter().enumerate() {
        let id = id_of(channel, prefix);
        // the summary counts a subscriber once, on its first channel
        created.push((id.to_string(), zone::join(id.as_bytes(), k == 0)));
    }
    let mut listen = Vec::new();
    let waiting = with(|reg| {
        let mut waiting = 0;
        for (channel, slot) in sub.channels.iter_mut() {
            let (name, s, change) = reg.hub.subscribe(channel, key);
            *channel = name;
            *slot = s;
            match change {
                ListenChange::Listen(ch) if postgres => {
                    reg.waiting.entry(ch.clone()).or_default().push(key);
                    listen.push(ch);
                    waiting += 1;
                }
                _ => {
                    if let Some(keys) = reg.waiting.get_mut(&**channel) {
                        keys.push(key);
                        waiting += 1;
                    }
                }
            }
        }
        waiting
    })
    .unwrap_or(0);
    sub.waiting = waiting as u32;
    worker::with(|w| {
        listen.into_iter().for_each(|ch| w.listen(ch));
        w.after_burst();
    });
    for (id, new) in created {
        if new {
            events::emit(Event::ChannelCreated, id.as_bytes());
        }
        events::emit(Event::ClientSubscribed, id.as_bytes());
    }
    if waiting == 0 && read_history(key) {
        return 1;
    }
    waiting
}

/// Leaves every channel: the transport is about to be freed, or is closing and takes no
/// more messages. The lifecycle then forgets the key; a second call does nothing.
pub fn leave(key: SubKey) {
    // SAFETY: called by the transport, live until its cleanup's call returns
    let linger = unsafe { key.get() }.lingers();
    // SAFETY: as above
    let sub = unsafe { key.get() }.subscription();
    let channels = std::mem::take(&mut sub.channels);
    if let Some(id) = sub.resume.take().and_then(|r| r.reading) {
        // its history is not wanted any more (nor may it reach a freed transport)
        worker::with(|w| drop(w.take_history(id)));
    }
    GONE.with(|g| {
        if g.get().0 == Some(key) {
            g.set((Some(key), true));
        }
    });
    let prefix = worker::with(|w| w.prefix.len()).unwrap_or(0);
    for (k, (channel, _)) in channels.iter().enumerate() {
        let id = id_of(channel, prefix).as_bytes();
        let ended = zone::leave(id, k == 0);
        events::left(id, ended);
    }
    if let Some(h) = sub.hooks.take() {
        let ids: Vec<&str> = channels.iter().map(|(c, _)| id_of(c, prefix)).collect();
        hooks::left(*h, &ids);
    }
    let unlisten = with(|reg| {
        let mut unlisten = Vec::new();
        for (channel, slot) in &channels {
            if let ListenChange::Unlisten(ch) = reg.hub.unsubscribe(channel, *slot, key, linger) {
                reg.positions.remove(&ch);
                reg.recent.remove(&ch);
                unlisten.push(ch);
            }
            if let Some(keys) = reg.waiting.get_mut(&**channel) {
                keys.retain(|k| *k != key);
            }
        }
        if linger && !channels.is_empty() {
            arm_sweep(reg);
        }
        if sub.dirty {
            reg.dirty.retain(|k| *k != key);
            // a closing transport queued in this batch is listed again by fan_out
            sub.dirty = false;
        }
        unlisten
    })
    .unwrap_or_default();
    if !unlisten.is_empty() {
        worker::with(|w| unlisten.into_iter().for_each(|ch| w.unlisten(ch)));
    }
}

/// A client sent a message: the publish hooks run, and what they send back reaches this
/// client only.
pub fn client_message(key: SubKey, message: &hooks::Message<'_>) {
    // SAFETY: called by the live transport itself
    let sub = unsafe { key.get() }.subscription();
    if let Some(h) = sub.hooks.as_mut() {
        let replies: hooks::Replies = Rc::new(move |answer| {
            // SAFETY: calls are forgotten when the transport leaves, so it is live
            let t = unsafe { key.get() };
            if let Some(h) = t.subscription().hooks.as_mut() {
                h.answered(&answer);
            }
            let rows = match answer {
                hooks::Answer::Sql { rows, .. } => rows,
                hooks::Answer::Http(body) => body.into_iter().collect(),
            };
            if !rows.is_empty() {
                t.reply(rows);
            }
        });
        let prefix = worker::with(|w| w.prefix.len()).unwrap_or(0);
        let ids: Vec<&str> = sub.channels.iter().map(|(c, _)| id_of(c, prefix)).collect();
        hooks::client_message(h, &ids, message, replies);
    }
}

/// A channel id as the client named it: the PostgreSQL channel without the prefix.
fn id_of(channel: &str, prefix: usize) -> &str {
    channel.get(prefix..).unwrap_or(channel)
}

/// These channels are LISTENed: subscribers that waited for all of theirs are ready.
pub fn listening(channels: &[String]) {
    if worker::with(|w| w.store).unwrap_or(false) {
        with(|reg| {
            for ch in channels {
                reg.positions.entry(ch.clone()).or_insert((0, 0));
            }
        });
    }
    let keys: Vec<SubKey> = with(|reg| {
        let keys = channels.iter().filter_map(|ch| reg.waiting.remove(ch)).flatten().collect();
        if reg.waiting.is_empty() && reg.waiting.capacity() > 64 {
            // a burst of new channels is over: keep no table sized for it
            reg.waiting = HashMap::new();
        }
        keys
    })
    .unwrap_or_default();
    for key in keys {
        // SAFETY: listed keys are live (a transport that left was unlisted from waiting,
        // and a ready() below that finalizes removes later keys of its own)
        let t = unsafe { key.get() };
        let sub = t.subscription();
        if sub.waiting == 0 {
            continue;
        }
        sub.waiting -= 1;
        if sub.waiting == 0 && !read_history(key) {
            match sub.resume.take() {
                // messages that arrived before the LISTEN was confirmed go after the answer
                Some(resume) => {
                    if survives(key, |t| t.ready()) {
                        release(key, resume.held, &HashMap::new());
                    }
                }
                None => t.ready(),
            }
        }
    }
    settle();
}

/// Queues the live messages held for a subscriber, but those its history had (by offset).
fn release(key: SubKey, held: Vec<HeldMessage>, newest: &HashMap<Rc<str>, i64>) {
    // SAFETY: the caller holds a live key
    let t = unsafe { key.get() };
    for (channel, offset, stamp, bytes) in held {
        if offset >= 0 && newest.get(&channel).is_some_and(|&n| offset <= n) {
            continue;
        }
        CURRENT.with(|cur| cur.set(stamp));
        t.queue(bytes, &channel);
        mark_dirty(key);
    }
}

thread_local! {
    /// A transport being watched while it may finalize, and whether it left.
    static GONE: core::cell::Cell<(Option<SubKey>, bool)> = const { core::cell::Cell::new((None, false)) };
}

/// Calls `f` on the transport; false if the transport left (and was freed) meanwhile.
fn survives(key: SubKey, f: impl FnOnce(&mut dyn Transport)) -> bool {
    GONE.with(|g| g.set((Some(key), false)));
    // SAFETY: the caller holds a live key
    f(unsafe { key.get() });
    !GONE.with(|g| g.replace((None, false))).1
}

/// Every LISTEN of a resuming subscriber is confirmed: its history is read now, so that
/// nothing falls between the history and the live messages. Whether a read started (the
/// subscriber then waits for it).
fn read_history(key: SubKey) -> bool {
    // SAFETY: the caller holds a live key
    let sub = unsafe { key.get() }.subscription();
    let Some(resume) = sub.resume.as_mut() else { return false };
    if resume.reading.is_some() {
        return true;
    }
    if !resume.since.iter().any(Option::is_some) {
        return false;
    }
    let asked: Vec<(String, Since)> = sub
        .channels
        .iter()
        .zip(&resume.since)
        .filter_map(|((c, _), s)| s.clone().map(|s| (c.to_string(), s)))
        .collect();
    let done: worker::HistoryDone = Box::new(move |result| history_read(key, result));
    let started = match cached(&asked) {
        Some(lists) => worker::with(|w| w.answered(lists, done)),
        None => worker::with(|w| w.history(asked, done)),
    };
    match started {
        Some(id) => {
            resume.reading = Some(id);
            sub.waiting = 1;
            true
        }
        None => false,
    }
}

/// The history of these channels from the recent-message cache, if it holds all of it:
/// each channel must be listened and confirmed, not catching up, with a known position.
pub fn cached(asked: &[(String, Since)]) -> Option<Vec<Vec<store::Stored>>> {
    let (max_stored, ttl) = worker::with(|w| w.keep)?;
    // SAFETY: nginx's cached time is always set
    let now: i64 = unsafe { (*nginx_sys::ngx_cached_time).sec };
    let keep = Keep { max_stored, oldest_second: now - ttl + 1 };
    with(|reg| {
        let mut lists = Vec::with_capacity(asked.len());
        for (channel, since) in asked {
            let answer = (!reg.waiting.contains_key(channel)
                && !reg.catching.contains_key(channel))
            .then(|| reg.positions.get(channel).copied())
            .flatten()
            .and_then(|position| reg.recent.get(channel)?.answer(since, position, keep));
            match answer {
                Some(list) => lists.push(list),
                None => {
                    reg.cache_misses += 1;
                    return None;
                }
            }
        }
        reg.cache_hits += 1;
        Some(lists)
    })
    .flatten()
}

/// Logs how many resumes the recent-message cache answered (once: the worker is exiting).
pub fn log_cache_stats() {
    let (hits, misses) =
        with(|reg| (std::mem::take(&mut reg.cache_hits), std::mem::take(&mut reg.cache_misses)))
            .unwrap_or_default();
    if hits + misses > 0 {
        worker::with(|w| {
            let msg = format!(
                "store: {hits} of {} resumes answered from the recent-message cache",
                hits + misses
            );
            worker::log(w.log, crate::postgres::Level::Notice, &msg)
        });
    }
}

/// Keeps a delivered stored message in its channel's recent-message cache.
fn remember(channel: &str, m: store::Stored) {
    with(|reg| reg.recent.entry(channel.to_string()).or_default().push(Rc::new(m)));
}

/// A subscriber's history arrived: it is answered (as when its LISTENs were confirmed),
/// then gets the history, then the live messages held meanwhile that the history did not
/// hold already.
fn history_read(key: SubKey, result: Result<Vec<Vec<store::Stored>>, String>) {
    // SAFETY: a transport that leaves drops its pending read, so the key is live
    let sub = unsafe { key.get() }.subscription();
    let Some(resume) = sub.resume.take() else { return };
    sub.waiting = 0;
    let lists = match result {
        Ok(lists) => Some(lists),
        Err(why) => {
            worker::with(|w| {
                let msg = format!("no history for a resuming subscriber: {why}");
                worker::log(w.log, crate::postgres::Level::Error, &msg)
            });
            None
        }
    };
    if !survives(key, |t| t.ready()) {
        return;
    }
    let prefix_len = worker::with(|w| w.prefix.len()).unwrap_or(0);
    let asked: Vec<Rc<str>> = sub
        .channels
        .iter()
        .zip(&resume.since)
        .filter(|(_, s)| s.is_some())
        .map(|((c, _), _)| c.clone())
        .collect();
    let Some(lists) = lists else {
        // what it missed cannot be read: it is told, never left with a silent gap
        for channel in &asked {
            gap_channel(channel, &[key]);
        }
        release(key, resume.held, &HashMap::new());
        settle();
        return;
    };
    let mut newest: HashMap<Rc<str>, i64> = HashMap::new();
    for (channel, list) in asked.iter().zip(lists) {
        let id = id_of(channel, prefix_len);
        for m in list {
            newest.insert(channel.clone(), m.offset);
            let time = stored_time(&m);
            CURRENT.with(|cur| cur.set((m.second, m.tag.max(0) as u64)));
            let v = stored_values(&m, id, &time);
            as_history(true, || fan_out(&[key], &v));
        }
    }
    // live: nothing was flushed since ready()
    release(key, resume.held, &newest);
    if !newest.is_empty() {
        // SAFETY: live: nothing was flushed since ready()
        let sub = unsafe { key.get() }.subscription();
        let floor = newest.into_iter().collect();
        sub.resume = Some(Box::new(Resume { floor, ..Resume::default() }));
    }
    settle();
}

thread_local! {
    static HISTORY: core::cell::Cell<bool> = const { core::cell::Cell::new(false) };
}

/// Whether the message being fanned out is part of a history (a resume, or the catch-up
/// after a reconnect): it comes as a burst the client did not fall behind on, so a
/// subscriber's output limit leaves it out.
pub fn from_history() -> bool {
    HISTORY.with(core::cell::Cell::get)
}

fn as_history<R>(history: bool, f: impl FnOnce() -> R) -> R {
    HISTORY.with(|h| h.set(history));
    let r = f();
    HISTORY.with(|h| h.set(false));
    r
}

/// Whether the stored message being fanned out is one the subscriber's history held.
fn repeats_history(sub: &mut Subscription, channel: &str, prefix_len: usize) -> bool {
    let Some(r) = sub.resume.as_mut() else { return false };
    let offset = CURRENT_OFFSET.with(core::cell::Cell::get);
    let Some(k) = r.floor.iter().position(|(c, _)| id_of(c, prefix_len) == channel) else {
        return false;
    };
    if offset >= 0 && offset <= r.floor[k].1 {
        return true;
    }
    r.floor.swap_remove(k);
    if r.floor.is_empty() && r.reading.is_none() && r.held.is_empty() && r.since.is_empty() {
        sub.resume = None;
    }
    false
}

/// Queues a subscriber for the next flush.
fn mark_dirty(key: SubKey) {
    // SAFETY: the caller holds a live key
    let sub = unsafe { key.get() }.subscription();
    if !sub.dirty {
        sub.dirty = true;
        with(|reg| reg.dirty.push(key));
    }
}

/// A stored message as templates see it; `time` is [`stored_time`]'s.
pub fn stored_values<'a>(m: &'a store::Stored, channel: &'a str, time: &'a str) -> Values<'a> {
    Values {
        text: m.message.bytes(),
        binary: m.message.is_binary(),
        channel,
        id: m.offset,
        time,
        tag: m.tag.max(0) as u64,
        event_id: m.event_id.as_deref().unwrap_or_default(),
        event_type: m.event_type.as_deref().unwrap_or_default(),
        epoch: m.epoch,
    }
}

/// A history message's `~time~`: its own, or now for the gap message.
pub fn stored_time(m: &store::Stored) -> String {
    if m.offset == store::GAP_OFFSET {
        // SAFETY: nginx's cached time is always set
        return http_time(unsafe { (*nginx_sys::ngx_cached_time).sec });
    }
    http_time(m.second)
}

/// An HTTP date (`~time~` of a stored message).
pub fn http_time(second: i64) -> String {
    let mut buf = [0u8; 40];
    // SAFETY: ngx_http_time writes at most 29 bytes
    let end = unsafe { nginx_sys::ngx_http_time(buf.as_mut_ptr(), second as _) };
    let len = (end as usize).saturating_sub(buf.as_ptr() as usize).min(buf.len());
    String::from_utf8_lossy(&buf[..len]).into_owned()
}

/// Where a subscriber's channels resume from the store, in push-stream's order of
/// precedence: a channel's `.bN` backtrack, else the last event id (`Last-Event-ID`, or
/// `push_stream_last_event_id`), else the time and tag (`If-Modified-Since` and
/// `If-None-Match`, or `push_stream_last_received_message_time` and `_tag`). Nothing
/// without a store.
pub fn resume_points(r: &mut ngx_http_request_t, backtracks: &[u32]) -> Vec<Option<Since>> {
    if !http::main_conf(r).store {
        return vec![None; backtracks.len()];
    }
    let lcf = http::loc_conf(r);
    let shared = match http::position_value(r, lcf.last_event_id, "Last-Event-ID") {
        Some(id) => Some(Since::from_last_event_id(&id)),
        None => match http::position(r) {
            (time, tag) if time >= 0 => {
                Some(Since::Time { second: time, tag: tag.unwrap_or(0) as i64 })
            }
            _ => None,
        },
    };
    backtracks
        .iter()
        .map(|&b| if b > 0 { Some(Since::Backtrack(b)) } else { shared.clone() })
        .collect()
}

thread_local! {
    /// The second and tag of the last message delivered.
    static CLOCK: core::cell::Cell<(i64, u64)> = const { core::cell::Cell::new((0, 0)) };
    /// Those of the message being fanned out; (0, 0) for push-stream's own messages
    /// (deleted, gap), which carry none.
    static CURRENT: core::cell::Cell<(i64, u64)> = const { core::cell::Cell::new((0, 0)) };
    /// The channel offset of the message being fanned out; -1 when it is not stored.
    static CURRENT_OFFSET: core::cell::Cell<i64> = const { core::cell::Cell::new(-1) };
}

/// push-stream's tag: messages in the same second are numbered from 1. Worker-local until
/// stored messages give every message one (issue 11).
fn next_stamp() -> (i64, u64) {
    // SAFETY: nginx's cached time is always set
    let sec: i64 = unsafe { (*nginx_sys::ngx_cached_time).sec };
    CLOCK.with(|c| {
        let (last, tag) = c.get();
        let stamp = (sec, if last == sec { tag + 1 } else { 1 });
        c.set(stamp);
        CURRENT.with(|cur| cur.set(stamp));
        stamp
    })
}

/// The time and tag of the message being delivered (`Last-Modified` and `Etag` of a
/// long-poll answered with it).
pub fn current_stamp() -> (i64, u64) {
    CURRENT.with(core::cell::Cell::get)
}

/// push-stream's id of the message that tells a channel was deleted.
pub const DELETED_ID: i64 = -2;

/// Where newly listened stored channels stand (sent before they are [`listening`]).
pub fn positions(list: Vec<(String, i64, i64)>) {
    with(|reg| {
        for (channel, epoch, offset) in list {
            // a channel listened already keeps the position of what it delivered
            reg.positions.entry(channel).or_insert((epoch, offset));
        }
    });
}

/// What to do with a stored message's notification.
enum Stored {
    /// Delivered already (the catch-up after a reconnect had it).
    Seen,
    /// The channel is catching up: it waits.
    Held,
    /// Too large for its notification, or following lost ones: read from the store what
    /// follows this (epoch, offset).
    Fetch(i64, i64),
    Deliver,
}

/// Reads the channel's stored messages after `from` (epoch, offset), holding its
/// notifications meanwhile; they are then delivered in order, each once. A gap the store
/// cannot fill (rows gone, history reset, no store) is told with the gap message.
fn catch_up(channel: &str, from: (i64, i64), fetching: bool) {
    let start = with(|reg| {
        if reg.catching.contains_key(channel) {
            return false;
        }
        reg.catching.insert(channel.to_string(), Vec::new());
        true
    })
    .unwrap_or(false);
    if !start {
        return;
    }
    let name = channel.to_string();
    let since = Since::After { epoch: from.0, offset: from.1 };
    let done: worker::HistoryDone =
        Box::new(move |result| caught_up(&name, from, fetching, result));
    worker::with(|w| w.history(vec![(channel.to_string(), since)], done));
}

fn caught_up(
    channel: &str,
    from: (i64, i64),
    fetching: bool,
    result: Result<Vec<Vec<store::Stored>>, String>,
) {
    let Some(held) = with(|reg| reg.catching.remove(channel)).flatten() else {
        return;
    };
    let keys = with(|reg| reg.hub.subscribers(channel)).unwrap_or_default();
    let prefix_len = worker::with(|w| w.prefix.len()).unwrap_or(0);
    let id = channel.get(prefix_len..).unwrap_or(channel);
    match result {
        Ok(lists) => {
            let list = lists.into_iter().next().unwrap_or_default();
            let known = from != (0, 0);
            let missing = match list.first() {
                Some(m) => known && (m.epoch != from.0 || m.offset > from.1 + 1),
                // a channel that never had a stored message may be a plain one
                None => !known || fetching,
            };
            if missing {
                gap_channel(channel, &keys);
            }
            for m in list {
                let seen = with(|reg| {
                    let p = reg.positions.entry(channel.to_string()).or_insert((0, 0));
                    if p.0 == m.epoch && m.offset <= p.1 {
                        return true;
                    }
                    *p = (m.epoch, m.offset);
                    false
                })
                .unwrap_or(false);
                if seen {
                    continue;
                }
                remember(channel, m.clone());
                let time = http_time(m.second);
                CURRENT.with(|cur| cur.set((m.second, m.tag.max(0) as u64)));
                CURRENT_OFFSET.with(|o| o.set(m.offset));
                let v = stored_values(&m, id, &time);
                // a reconnect's catch-up is a history; a fetched message is live
                as_history(!fetching, || fan_out(&keys, &v));
            }
        }
        Err(why) => {
            worker::with(|w| {
                let msg = format!("catching up on channel \"{id}\" failed: {why}");
                worker::log(w.log, crate::postgres::Level::Error, &msg)
            });
            gap_channel(channel, &keys);
        }
    }
    for payload in held {
        deliver(channel, &payload);
    }
    settle();
}

/// A NOTIFY arrived: every subscriber of `channel` in this worker gets it.
pub fn deliver(channel: &str, payload: &str) {
    let prefix_len = worker::with(|w| w.prefix.len()).unwrap_or(0);
    let id = channel.get(prefix_len..).unwrap_or(channel);
    if let Some(text) = payload::deleted_text(payload) {
        return deleted(channel, id, &text);
    }
    let Some((n, keys)) = with(|reg| reg.hub.message(channel)).flatten() else {
        return;
    };
    let (message, meta) = payload::unwrap_with_meta(payload);
    if let Some(st) = meta.stored {
        let action = with(|reg| {
            if let Some(held) = reg.catching.get_mut(channel) {
                held.push(payload.to_string());
                return Stored::Held;
            }
            match reg.positions.get_mut(channel) {
                Some(p) if p.0 == st.epoch && st.offset <= p.1 => Stored::Seen,
                // offsets follow commit order, and so do notifications: one that skips
                // an offset follows lost ones (a notification may even arrive before the
                // reconnect that lost them is told): read them from the store
                Some(p) if p.0 == st.epoch && st.offset > p.1 + 1 => Stored::Fetch(p.0, p.1),
                _ if meta.fetch => Stored::Fetch(st.epoch, st.offset - 1),
                Some(p) => {
                    *p = (st.epoch, st.offset);
                    Stored::Deliver
                }
                None => Stored::Deliver,
            }
        })
        .unwrap_or(Stored::Deliver);
        match action {
            Stored::Seen | Stored::Held => return,
            Stored::Fetch(epoch, offset) => return catch_up(channel, (epoch, offset), true),
            Stored::Deliver => {}
        }
    }
    let (text, binary) = (message.bytes(), message.is_binary());
    let event_id = meta.event_id.as_deref().unwrap_or_default();
    let event_type = meta.event_type.as_deref().unwrap_or_default();
    match meta.stored {
        // a stored message carries its channel's offset, time and tag
        Some(st) => {
            remember(
                channel,
                store::Stored {
                    epoch: st.epoch,
                    offset: st.offset,
                    second: st.second,
                    tag: st.tag,
                    message: match &message {
                        payload::Message::Binary(b) => payload::Message::Binary(b.clone()),
                        payload::Message::Text(t) => payload::Message::Text(t.to_vec().into()),
                    },
                    event_id: meta.event_id.clone(),
                    event_type: meta.event_type.clone(),
                },
            );
            let time = http_time(st.second);
            CURRENT.with(|cur| cur.set((st.second, st.tag.max(0) as u64)));
            CURRENT_OFFSET.with(|o| o.set(st.offset));
            let tag = st.tag.max(0) as u64;
            let values = Values {
                text,
                binary,
                channel: id,
                id: st.offset,
                time: &time,
                tag,
                event_id,
                event_type,
                epoch: st.epoch,
            };
            fan_out(&keys, &values);
        }
        None => {
            let (_, tag) = next_stamp();
            CURRENT_OFFSET.with(|o| o.set(-1));
            let values = Values {
                text,
                binary,
                channel: id,
                id: n as i64,
                event_id,
                event_type,
                tag,
                ..now()
            };
            fan_out(&keys, &values);
        }
    }
}

/// An admin deleted the channel: its subscribers get the deleted message and leave it;
/// those left without a channel end as at their ttl.
fn deleted(channel: &str, id: &str, text: &[u8]) {
    let keys = with(|reg| reg.hub.subscribers(channel)).unwrap_or_default();
    if keys.is_empty() {
        // a lingering channel: what it remembers of its history is gone with the history
        with(|reg| {
            reg.positions.remove(channel);
            reg.recent.remove(channel);
        });
        return;
    }
    CURRENT.with(|cur| cur.set((0, 0)));
    CURRENT_OFFSET.with(|o| o.set(-1));
    fan_out(&keys, &Values { text, channel: id, id: DELETED_ID, ..now() });
    let mut unlisten = None;
    let mut finished = Vec::new();
    for &key in &keys {
        // SAFETY: keys listed in the hub are live
        let sub = unsafe { key.get() }.subscription();
        let Some(k) = sub.channels.iter().position(|(c, _)| &**c == channel) else {
            continue;
        };
        let mut kept = std::mem::take(&mut sub.channels).into_vec();
        let (_, slot) = kept.remove(k);
        sub.channels = kept.into_boxed_slice();
        // a subscriber left with no channel is gone from the summary
        let ended = zone::leave(id.as_bytes(), sub.channels.is_empty());
        events::left(id.as_bytes(), ended);
        with(|reg| {
            if let ListenChange::Unlisten(ch) = reg.hub.unsubscribe(channel, slot, key, false) {
                reg.positions.remove(&ch);
                reg.recent.remove(&ch);
                unlisten = Some(ch);
            }
        });
        if sub.channels.is_empty() {
            finished.push(key);
        }
    }
    if let Some(ch) = unlisten {
        worker::with(|w| w.unlisten(ch));
    }
    // before settle(): a flush may finalize its transport, so a key is used only while
    // nothing but its own finish() can have freed it (each key is here once)
    for key in finished {
        // SAFETY: live: nothing was flushed since the hub listed it
        unsafe { key.get() }.finish();
    }
    settle();
}

/// The side connection came back: notifications sent while it was down are lost. A
/// channel with stored messages catches up from the store (its subscribers get what they
/// missed, in order, once); the subscribers of any other channel are told with one message
/// per channel, id -4 and event type `gap`.
pub fn gap() {
    type Listed = (String, Vec<SubKey>, Option<(i64, i64)>);
    let channels: Vec<Listed> = with(|reg| {
        reg.hub
            .channels()
            .map(|ch| (ch.to_string(), reg.hub.subscribers(ch), reg.positions.get(ch).copied()))
            .collect()
    })
    .unwrap_or_default();
    for (channel, keys, position) in channels {
        match position {
            // stored channels catch up from where they were
            Some(from) => catch_up(&channel, from, false),
            None => gap_channel(&channel, &keys),
        }
    }
}

/// Tells the channel's subscribers that they may have missed messages.
fn gap_channel(channel: &str, keys: &[SubKey]) {
    let prefix_len = worker::with(|w| w.prefix.len()).unwrap_or(0);
    let id = channel.get(prefix_len..).unwrap_or(channel);
    CURRENT.with(|cur| cur.set((0, 0)));
    CURRENT_OFFSET.with(|o| o.set(-1));
    fan_out(keys, &Values { channel: id, id: GAP_ID, event_type: "gap", ..now() });
}

/// The worker is shutting down: every subscriber, waiting or not, is told and closed.
pub fn shutdown() {
    let mut keys: Vec<SubKey> = with(|reg| {
        reg.hub.all().chain(reg.waiting.values().flatten().copied()).collect::<Vec<_>>()
    })
    .unwrap_or_default();
    keys.sort_unstable();
    keys.dedup();
    for key in keys {
        // SAFETY: listed keys are live; going_away finalizes only its own transport
        unsafe { key.get() }.going_away();
    }
}

fn now() -> Values<'static> {
    // SAFETY: nginx's cached time string is always set in a worker, and its slots live as
    // long as the process; it is read before the event loop can change it
    let time = unsafe { ptr::addr_of!(nginx_sys::ngx_cached_http_time).read() };
    let time: &'static [u8] = unsafe { core::slice::from_raw_parts(time.data, time.len) };
    Values { time: core::str::from_utf8(time).unwrap_or_default(), ..Values::default() }
}

/// Queues one message for these subscribers, encoded once per encoding.
pub fn fan_out(keys: &[SubKey], message: &Values<'_>) {
    let prefix_len = worker::with(|w| w.prefix.len()).unwrap_or(0);
    let mut encoded: Vec<(Encoding, Rc<[u8]>)> = Vec::with_capacity(1);
    let mut dirty = Vec::new();
    // push-stream creates a subscriber's channels before it subscribes it, and a channel
    // exists while it has subscribers: nobody hears of the creation of a channel it is
    // subscribed to
    let created = events::created(message);
    for &key in keys {
        // SAFETY: keys listed in the hub are live
        let t = unsafe { key.get() };
        // a subscriber still waiting for its LISTENs or its history gets it afterwards
        let holding = t.subscription().waiting > 0;
        if !holding && !t.accepts() {
            continue;
        }
        let enc = t.encoding();
        let bytes = match encoded.iter().find(|(e, _)| *e == enc) {
            Some((_, b)) => b.clone(),
            None => {
                let b = t.encode(message);
                encoded.push((enc, b.clone()));
                b
            }
        };
        let sub = t.subscription();
        if created
            .as_deref()
            .is_some_and(|c| sub.channels.iter().any(|(ch, _)| id_of(ch, prefix_len) == c))
        {
            continue;
        }
        if sub.waiting == 0 && repeats_history(sub, message.channel, prefix_len) {
            continue;
        }
        if sub.waiting > 0 {
            let resume = sub.resume.get_or_insert_with(|| Box::new(Resume::default()));
            let channel = sub
                .channels
                .iter()
                .find(|(c, _)| id_of(c, prefix_len) == message.channel)
                .map(|(c, _)| c.clone());
            if let Some(channel) = channel {
                let offset = CURRENT_OFFSET.with(core::cell::Cell::get);
                resume.held.push((channel, offset, current_stamp(), bytes));
            }
            continue;
        }
        t.queue(bytes, message.channel);
        let sub = t.subscription();
        if !sub.dirty {
            sub.dirty = true;
            dirty.push(key);
        }
    }
    with(|reg| {
        if reg.dirty.is_empty() {
            reg.dirty = dirty;
        } else {
            reg.dirty.extend(dirty);
        }
    });
}

/// Flushes the subscribers that got output in this batch (and finalizes those that fail).
pub fn settle() {
    loop {
        let dirty = with(|reg| std::mem::take(&mut reg.dirty)).unwrap_or_default();
        if dirty.is_empty() {
            return;
        }
        for key in dirty {
            // SAFETY: leave() removes a dirty key before its transport is freed
            let t = unsafe { key.get() };
            t.subscription().dirty = false;
            t.flush();
        }
    }
}
