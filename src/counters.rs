//! The node-wide counters: channels, their published messages and subscribers, and the
//! subscribers of each worker, in one fixed-size region of shared memory.
//!
//! The region is formatted once: a header, a bucket array and an array of equal 96-byte
//! blocks. Every record is one or more blocks taken from a single free list, so nothing
//! fragments: a channel is one block (plus one per further 92 bytes of a long id), and a
//! worker's share of a channel's subscribers beyond the first worker is one more block.
//! Messages never go in here, so no burst of messages can fill it. Only more live channels
//! than blocks can; then the new channel is simply not counted (see [`Refusal::Full`]),
//! and delivery, which never reads this region, goes on.
//!
//! Each worker's subscribers are kept per worker (its "share"), so the counts of a worker
//! that died without leaving (`kill -9`) can be taken back: [`Counters::reclaim`].
//!
//! All methods expect the caller to hold the zone's lock (nginx's slab pool mutex, which
//! the master releases itself when a worker dies holding it). Nothing here can fail while
//! half done.

use core::mem::size_of;

/// Worker slots: room for two generations of 64 workers during a reload.
pub const MAX_WORKERS: usize = 128;
const BLOCK: usize = 64;
const NIL: u32 = u32::MAX;
const MAGIC: u64 = 0x7067_7075_7368_0001;

const KIND_CHANNEL: u8 = 1;
const KIND_SHARE: u8 = 3;

const FLAG_WILDCARD: u8 = 1;
const FLAG_DELETED: u8 = 2;
const FLAG_PINNED: u8 = 4;
/// Published through the store: the channel exists while it keeps messages.
const FLAG_STORED: u8 = 8;

/// Name bytes held in a channel block, and in each continuation block.
const NAME_INLINE: usize = BLOCK - 46;
const NAME_CONT: usize = BLOCK - 4;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct WorkerSlot {
    pub pid: i64,
    pub started: u64,
    pub subscribers: u64,
}

#[repr(C)]
struct Header {
    magic: u64,
    blocks: u32,
    /// Blocks handed out at least once (those above are untouched memory).
    used: u32,
    free: u32,
    buckets: u32,
    started: u64,
    published: u64,
    seq: u64,
    channels: u32,
    wildcard_channels: u32,
    channels_in_delete: u32,
    /// Channels that found no free block, since the last report.
    full: u32,
    /// When a worker last dropped idle channels (one sweep serves every worker).
    swept: u64,
    workers: [WorkerSlot; MAX_WORKERS],
    /// LISTENs sent and not confirmed yet, by channel name hash and worker.
    pending: [PendingListen; PENDING_LISTENS],
}

/// LISTENs in flight that the zone tracks: they take a few milliseconds each, so few are
/// ever in flight at once; past this many, publishers do not wait for them.
const PENDING_LISTENS: usize = 64;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PendingListen {
    hash: u32,
    /// 0: a free entry.
    count: u16,
    worker: u16,
}

#[repr(C)]
struct Channel {
    published: u64,
    hash: u32,
    next: u32,
    seq: u32,
    last_active: u32,
    name_next: u32,
    shares: u32,
    first_count: u32,
    /// Messages the store keeps, as the last publish through this node found.
    stored: u32,
    first_worker: u16,
    name_len: u16,
    kind: u8,
    flags: u8,
    name: [u8; NAME_INLINE],
}

impl Channel {
    /// A subscriber came or went: the channel is active. A stored channel's activity is
    /// its last publish only, since its messages' ttl runs from there.
    fn touched(&mut self, now: u64) {
        if self.flags & FLAG_STORED == 0 {
            self.last_active = now as u32;
        }
    }
}

#[repr(C)]
struct NameBlock {
    next: u32,
    bytes: [u8; NAME_CONT],
}

#[repr(C)]
struct Share {
    next: u32,
    count: u32,
    worker: u16,
    _pad: u8,
    kind: u8,
}

const _: () = assert!(size_of::<Channel>() == BLOCK);
const _: () = assert!(size_of::<NameBlock>() == BLOCK);
const _: () = assert!(size_of::<Share>() <= BLOCK);

/// A channel as channel info and statistics show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Info {
    pub id: Vec<u8>,
    pub published: u64,
    pub stored: u64,
    pub subscribers: u64,
    pub wildcard: bool,
}

/// The statistics summary.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub channels: u64,
    pub wildcard_channels: u64,
    pub published: u64,
    pub stored: u64,
    pub subscribers: u64,
    pub channels_in_delete: u64,
    pub started: u64,
    pub workers: Vec<WorkerSlot>,
}

/// Why a channel may not be joined or created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `push_stream_max_number_of_channels` / `_wildcard_channels`.
    TooManyChannels,
    /// `push_stream_max_subscribers_per_channel`.
    TooManySubscribers,
    /// `push_stream_authorized_channels_only`: nobody published to it.
    NotCreated,
    /// No free block: the channel is served but not counted.
    Full,
}

/// The limits that apply when channels are created or joined.
#[derive(Clone, Copy, Debug, Default)]
pub struct Limits {
    pub max_channels: Option<usize>,
    pub max_wildcard_channels: Option<usize>,
    pub max_subscribers: Option<usize>,
    /// Refuse a channel nobody published to.
    pub existing_only: bool,
}

/// A formatted region; see the module documentation.
pub struct Counters {
    base: *mut u8,
    /// This process's clock (seconds), for the messages' ttl; see [`Counters::set_now`].
    now: u64,
    /// `push_stream_message_ttl` in seconds (0: messages never expire).
    ttl: u64,
}

/// The block size, for sizing documentation and tests.
pub const BLOCK_SIZE: usize = BLOCK;

/// FNV-1a: stable across processes and builds.
fn hash(id: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for &b in id {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

impl Counters {
    /// Formats `len` bytes at `base` (zeroed memory, as a fresh shared mapping is), or
    /// `None` when the region is too small for the header and a few blocks.
    ///
    /// # Safety
    /// `base` is valid for `len` bytes, 8-aligned, zeroed, and shared by nothing yet.
    pub unsafe fn format(base: *mut u8, len: usize, now: u64) -> Option<Self> {
        let head = size_of::<Header>();
        let rest = len.checked_sub(head)?;
        // one bucket per 16 blocks keeps chains short until the region is nearly full,
        // and touches little memory
        let blocks = rest * 16 / (BLOCK * 16 + 4);
        let mut buckets = (blocks / 16).next_power_of_two().max(1);
        while buckets * 4 + blocks * BLOCK > rest && buckets > 1 {
            buckets /= 2;
        }
        let blocks = (rest - buckets * 4) / BLOCK;
        if blocks < 16 {
            return None;
        }
        let c = Self { base, now, ttl: 0 };
        let h = unsafe { c.header() };
        h.magic = MAGIC;
        h.blocks = blocks as u32;
        h.used = 0;
        h.free = NIL;
        h.buckets = buckets as u32;
        h.started = now;
        for b in 0..buckets {
            unsafe { c.bucket_ptr(b as u32).write(NIL) };
        }
        Some(c)
    }

    /// A region formatted by [`Counters::format`], possibly by another process.
    ///
    /// # Safety
    /// `base` points at such a region, mapped for as long as the result is used.
    pub unsafe fn attach(base: *mut u8) -> Option<Self> {
        let c = Self { base, now: 0, ttl: 0 };
        (unsafe { c.header() }.magic == MAGIC).then_some(c)
    }

    /// The time (seconds) the next calls see, and the messages' ttl.
    pub fn set_now(&mut self, now: u64, ttl: u64) {
        self.now = now;
        self.ttl = ttl;
    }

    /// The messages the store keeps for the channel: none once the ttl has passed since
    /// its last publish (the last activity is no earlier), without waiting for a publish
    /// or the cleaner to say so.
    fn stored_now(&self, ch: &Channel) -> u32 {
        let expired =
            self.ttl > 0 && self.now.saturating_sub(u64::from(ch.last_active)) >= self.ttl;
        if expired {
            0
        } else {
            ch.stored
        }
    }

    /// Channel blocks the region has, for the log.
    pub fn capacity(&self) -> usize {
        unsafe { self.header() }.blocks as usize
    }

    #[allow(clippy::mut_from_ref)]
    unsafe fn header(&self) -> &mut Header {
        unsafe { &mut *self.base.cast::<Header>() }
    }

    fn bucket_ptr(&self, b: u32) -> *mut u32 {
        // SAFETY: buckets follow the header; b < buckets
        unsafe { self.base.add(size_of::<Header>()).cast::<u32>().add(b as usize) }
    }

    fn block(&self, i: u32) -> *mut u8 {
        let h = unsafe { self.header() };
        let start = size_of::<Header>() + h.buckets as usize * 4;
        let start = start.next_multiple_of(8);
        // SAFETY: i < blocks; the region was sized for them (format keeps 8 bytes spare)
        unsafe { self.base.add(start + i as usize * BLOCK) }
    }

    #[allow(clippy::mut_from_ref)]
    fn channel(&self, i: u32) -> &mut Channel {
        unsafe { &mut *self.block(i).cast::<Channel>() }
    }

    fn alloc(&self) -> Option<u32> {
        let h = unsafe { self.header() };
        let i = if h.free != NIL {
            let i = h.free;
            h.free = unsafe { *self.block(i).cast::<u32>() };
            i
        } else if h.used + 1 < h.blocks {
            // the last block is kept as alignment slack (see block())
            h.used += 1;
            h.used - 1
        } else {
            return None;
        };
        unsafe { core::ptr::write_bytes(self.block(i), 0, BLOCK) };
        Some(i)
    }

    fn release(&self, i: u32) {
        let h = unsafe { self.header() };
        unsafe { *self.block(i).cast::<u32>() = h.free };
        h.free = i;
    }

    fn name_matches(&self, ch: &Channel, id: &[u8]) -> bool {
        if ch.name_len as usize != id.len() {
            return false;
        }
        let first = id.len().min(NAME_INLINE);
        if ch.name[..first] != id[..first] {
            return false;
        }
        let mut rest = &id[first..];
        let mut next = ch.name_next;
        while !rest.is_empty() {
            let nb = unsafe { &*self.block(next).cast::<NameBlock>() };
            let n = rest.len().min(NAME_CONT);
            if nb.bytes[..n] != rest[..n] {
                return false;
            }
            rest = &rest[n..];
            next = nb.next;
        }
        true
    }

    fn name_of(&self, ch: &Channel) -> Vec<u8> {
        let len = ch.name_len as usize;
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(&ch.name[..len.min(NAME_INLINE)]);
        let mut next = ch.name_next;
        while out.len() < len {
            let nb = unsafe { &*self.block(next).cast::<NameBlock>() };
            let n = (len - out.len()).min(NAME_CONT);
            out.extend_from_slice(&nb.bytes[..n]);
            next = nb.next;
        }
        out
    }

    /// The channel's block and the link that points at it.
    fn find(&self, id: &[u8]) -> Option<(u32, *mut u32)> {
        let h = unsafe { self.header() };
        let hv = hash(id);
        let mut link = self.bucket_ptr(hv & (h.buckets - 1));
        loop {
            let i = unsafe { *link };
            if i == NIL {
                return None;
            }
            let ch = self.channel(i);
            if ch.hash == hv && self.name_matches(ch, id) {
                return Some((i, link));
            }
            link = &mut ch.next;
        }
    }

    fn live(&self, id: &[u8]) -> Option<u32> {
        self.find(id).map(|(i, _)| i).filter(|&i| self.channel(i).flags & FLAG_DELETED == 0)
    }

    fn create(
        &mut self,
        id: &[u8],
        wildcard: bool,
        now: u64,
        limits: &Limits,
    ) -> Result<u32, Refusal> {
        let h = unsafe { self.header() };
        let (count, max) = if wildcard {
            (h.wildcard_channels, limits.max_wildcard_channels)
        } else {
            (h.channels, limits.max_channels)
        };
        if max.is_some_and(|m| count as usize >= m) {
            return Err(Refusal::TooManyChannels);
        }
        let extra = id.len().saturating_sub(NAME_INLINE).div_ceil(NAME_CONT);
        let Some(i) = self.alloc() else {
            h.full += 1;
            return Err(Refusal::Full);
        };
        let mut names = Vec::with_capacity(extra);
        for _ in 0..extra {
            match self.alloc() {
                Some(b) => names.push(b),
                None => {
                    names.into_iter().chain([i]).for_each(|b| self.release(b));
                    h.full += 1;
                    return Err(Refusal::Full);
                }
            }
        }
        let hv = hash(id);
        let bucket = self.bucket_ptr(hv & (h.buckets - 1));
        h.seq += 1;
        let ch = self.channel(i);
        ch.kind = KIND_CHANNEL;
        ch.hash = hv;
        ch.seq = h.seq as u32;
        ch.last_active = now as u32;
        ch.name_len = id.len() as u16;
        ch.shares = NIL;
        ch.first_worker = u16::MAX;
        ch.flags = if wildcard { FLAG_WILDCARD } else { 0 };
        let first = id.len().min(NAME_INLINE);
        ch.name[..first].copy_from_slice(&id[..first]);
        ch.name_next = names.first().copied().unwrap_or(NIL);
        for (k, chunk) in id[first..].chunks(NAME_CONT).enumerate() {
            let nb = unsafe { &mut *self.block(names[k]).cast::<NameBlock>() };
            nb.bytes[..chunk.len()].copy_from_slice(chunk);
            nb.next = names.get(k + 1).copied().unwrap_or(NIL);
        }
        ch.next = unsafe { *bucket };
        unsafe { *bucket = i };
        if wildcard {
            h.wildcard_channels += 1;
        } else {
            h.channels += 1;
        }
        Ok(i)
    }

    /// The live channel, created if it does not exist (push-stream creates a channel on
    /// its first subscriber or publish).
    fn get_or_create(
        &mut self,
        id: &[u8],
        wildcard: bool,
        now: u64,
        limits: &Limits,
    ) -> Result<(u32, bool), Refusal> {
        if let Some(i) = self.live(id) {
            return Ok((i, false));
        }
        if let Some((i, _)) = self.find(id) {
            // deleted, with subscribers still leaving: it comes back as a new channel, and
            // those subscribers' leaves still count down
            let h = unsafe { self.header() };
            let (count, max) = if wildcard {
                (&mut h.wildcard_channels, limits.max_wildcard_channels)
            } else {
                (&mut h.channels, limits.max_channels)
            };
            if max.is_some_and(|m| *count as usize >= m) {
                return Err(Refusal::TooManyChannels);
            }
            *count += 1;
            h.channels_in_delete -= 1;
            h.seq += 1;
            let ch = self.channel(i);
            ch.flags = if wildcard { FLAG_WILDCARD } else { 0 };
            ch.published = 0;
            ch.seq = h.seq as u32;
            return Ok((i, true));
        }
        self.create(id, wildcard, now, limits).map(|i| (i, true))
    }

    fn unlink(&self, i: u32, link: *mut u32) {
        let h = unsafe { self.header() };
        let ch = self.channel(i);
        unsafe { *link = ch.next };
        if ch.flags & FLAG_DELETED != 0 {
            h.channels_in_delete -= 1;
        } else if ch.flags & FLAG_WILDCARD != 0 {
            h.wildcard_channels -= 1;
        } else {
            h.channels -= 1;
        }
        let mut s = ch.shares;
        while s != NIL {
            let next = unsafe { (*self.block(s).cast::<Share>()).next };
            self.release(s);
            s = next;
        }
        let mut n = ch.name_next;
        while n != NIL {
            let next = unsafe { (*self.block(n).cast::<NameBlock>()).next };
            self.release(n);
            n = next;
        }
        self.release(i);
    }

    fn subscribers_of(&self, ch: &Channel) -> u64 {
        let mut n = u64::from(ch.first_count);
        let mut s = ch.shares;
        while s != NIL {
            let share = unsafe { &*self.block(s).cast::<Share>() };
            n += u64::from(share.count);
            s = share.next;
        }
        n
    }

    /// Whether these channels may be joined: each exists or may be created, and has room
    /// for one more subscriber. Nothing changes.
    pub fn check_join(
        &self,
        ids: &[(&[u8], bool)],
        limits: &Limits,
    ) -> Result<(), (usize, Refusal)> {
        let h = unsafe { self.header() };
        let (mut new, mut new_wild) = (0usize, 0usize);
        for (k, &(id, wildcard)) in ids.iter().enumerate() {
            match self.live(id) {
                Some(i) => {
                    let ch = self.channel(i);
                    // push-stream: a channel exists while it keeps messages
                    let gone = ch.flags & FLAG_STORED != 0 && self.stored_now(ch) == 0;
                    if limits.existing_only && !wildcard && (ch.published == 0 || gone) {
                        return Err((k, Refusal::NotCreated));
                    }
                    let subs = self.subscribers_of(ch) as usize;
                    if limits.max_subscribers.is_some_and(|m| subs >= m) {
                        return Err((k, Refusal::TooManySubscribers));
                    }
                }
                None if limits.existing_only && !wildcard => return Err((k, Refusal::NotCreated)),
                None => {
                    let (count, max, new) = if wildcard {
                        (h.wildcard_channels, limits.max_wildcard_channels, &mut new_wild)
                    } else {
                        (h.channels, limits.max_channels, &mut new)
                    };
                    *new += 1;
                    if max.is_some_and(|m| count as usize + *new > m) {
                        return Err((k, Refusal::TooManyChannels));
                    }
                }
            }
        }
        Ok(())
    }

    /// A subscriber of `worker` joined the channel (created if needed).
    /// A subscriber of `worker` joined the channel; `connection`: it is the first
    /// channel of its subscription, which counts it in its worker's subscribers (a
    /// connection, as push-stream counts them, however many channels it has).
    pub fn join(
        &mut self,
        id: &[u8],
        wildcard: bool,
        worker: u16,
        now: u64,
        connection: bool,
    ) -> Result<bool, Refusal> {
        let (i, created) = self.get_or_create(id, wildcard, now, &Limits::default())?;
        let ch = self.channel(i);
        ch.touched(now);
        if ch.first_worker == worker || ch.first_worker == u16::MAX {
            ch.first_worker = worker;
            ch.first_count += 1;
        } else {
            let mut s = ch.shares;
            loop {
                if s == NIL {
                    let Some(b) = self.alloc() else {
                        unsafe { self.header() }.full += 1;
                        return Err(Refusal::Full);
                    };
                    let ch = self.channel(i);
                    let share = unsafe { &mut *self.block(b).cast::<Share>() };
                    share.kind = KIND_SHARE;
                    share.worker = worker;
                    share.count = 1;
                    share.next = ch.shares;
                    ch.shares = b;
                    break;
                }
                let share = unsafe { &mut *self.block(s).cast::<Share>() };
                if share.worker == worker {
                    share.count += 1;
                    break;
                }
                s = share.next;
            }
        }
        if connection {
            self.worker_add(worker, 1);
        }
        Ok(created)
    }

    /// A subscriber of `worker` left the channel; `connection`: its last one.
    /// Returns whether that was the last subscriber of a deleted channel (which is then
    /// gone, and its `channel_destroyed` due).
    pub fn leave(&mut self, id: &[u8], worker: u16, now: u64, connection: bool) -> bool {
        let Some((i, _)) = self.find(id) else { return false };
        let ch = self.channel(i);
        ch.touched(now);
        let mut left = false;
        if ch.first_worker == worker && ch.first_count > 0 {
            ch.first_count -= 1;
            left = true;
        } else {
            let mut s = ch.shares;
            while s != NIL {
                let share = unsafe { &mut *self.block(s).cast::<Share>() };
                if share.worker == worker && share.count > 0 {
                    share.count -= 1;
                    left = true;
                    break;
                }
                s = share.next;
            }
        }
        if left && connection {
            self.worker_add(worker, -1);
        }
        let ch = self.channel(i);
        left && ch.flags & FLAG_DELETED != 0 && self.subscribers_of(ch) == 0
    }

    fn worker_add(&self, worker: u16, n: i64) {
        if let Some(w) = unsafe { self.header() }.workers.get_mut(worker as usize) {
            w.subscribers = w.subscribers.saturating_add_signed(n);
        }
    }

    /// Creates the channel if needed (a publish, or a polling subscriber).
    pub fn touch(
        &mut self,
        id: &[u8],
        wildcard: bool,
        now: u64,
        limits: &Limits,
    ) -> Result<bool, Refusal> {
        let (i, created) = self.get_or_create(id, wildcard, now, limits)?;
        self.channel(i).touched(now);
        Ok(created)
    }

    /// A message was published on the channel through this node; `global` counts it in
    /// the node's total too (the events channel's are not). Whether the channel was
    /// created.
    pub fn published(&mut self, id: &[u8], wildcard: bool, now: u64, global: bool) -> bool {
        let h = unsafe { self.header() };
        if global {
            h.published += 1;
        }
        let Ok((i, created)) = self.get_or_create(id, wildcard, now, &Limits::default()) else {
            return false;
        };
        let ch = self.channel(i);
        ch.published += 1;
        ch.last_active = now as u32;
        created
    }

    /// How many messages the store keeps for the channel, as a publish found.
    pub fn stored(&mut self, id: &[u8], kept: u64) {
        if let Some(i) = self.live(id) {
            let ch = self.channel(i);
            ch.stored = kept.min(u64::from(u32::MAX)) as u32;
            ch.flags |= FLAG_STORED;
        }
    }

    /// Keeps the channel (created if needed) however long it stays idle: the events
    /// channel.
    pub fn pin(&mut self, id: &[u8], now: u64) {
        if let Ok((i, _)) = self.get_or_create(id, false, now, &Limits::default()) {
            self.channel(i).flags |= FLAG_PINNED;
        }
    }

    /// The channel's info, if it exists.
    pub fn info(&self, id: &[u8]) -> Option<Info> {
        self.live(id).map(|i| self.info_at(i))
    }

    fn info_at(&self, i: u32) -> Info {
        let ch = self.channel(i);
        Info {
            id: self.name_of(ch),
            published: ch.published,
            stored: self.stored_now(ch).into(),
            subscribers: self.subscribers_of(ch),
            wildcard: ch.flags & FLAG_WILDCARD != 0,
        }
    }

    fn each_live(&self) -> impl Iterator<Item = u32> + '_ {
        let h = unsafe { self.header() };
        (0..h.buckets).flat_map(move |b| {
            let mut i = unsafe { *self.bucket_ptr(b) };
            core::iter::from_fn(move || {
                while i != NIL {
                    let cur = i;
                    let ch = self.channel(cur);
                    i = ch.next;
                    if ch.flags & FLAG_DELETED == 0 {
                        return Some(cur);
                    }
                }
                None
            })
        })
    }

    /// Live channels whose id starts with `prefix`, oldest first.
    pub fn list(&self, prefix: &[u8]) -> Vec<Info> {
        let mut found: Vec<(u32, Info)> = self
            .each_live()
            .filter_map(|i| {
                let info = self.info_at(i);
                info.id.starts_with(prefix).then(|| (self.channel(i).seq, info))
            })
            .collect();
        found.sort_by_key(|(seq, _)| *seq);
        found.into_iter().map(|(_, info)| info).collect()
    }

    pub fn summary(&self) -> Summary {
        let h = unsafe { self.header() };
        let workers: Vec<WorkerSlot> = h.workers.iter().filter(|w| w.pid != 0).copied().collect();
        Summary {
            channels: h.channels.into(),
            wildcard_channels: h.wildcard_channels.into(),
            published: h.published,
            stored: self.each_live().map(|i| u64::from(self.stored_now(self.channel(i)))).sum(),
            subscribers: workers.iter().map(|w| w.subscribers).sum(),
            channels_in_delete: h.channels_in_delete.into(),
            started: h.started,
            workers,
        }
    }

    /// Marks the channel deleted: it is no longer listed or counted as a channel, and goes
    /// once its subscribers have left. `false` if it did not exist.
    /// Deletes the channel: `None` if it does not exist, else whether it had no
    /// subscriber (else the last to leave says it is gone, see [`Counters::leave`]).
    pub fn delete(&mut self, id: &[u8]) -> Option<bool> {
        let i = self.live(id)?;
        let h = unsafe { self.header() };
        let ch = self.channel(i);
        if ch.flags & FLAG_WILDCARD != 0 {
            h.wildcard_channels -= 1;
        } else {
            h.channels -= 1;
        }
        h.channels_in_delete += 1;
        ch.flags |= FLAG_DELETED;
        Some(self.subscribers_of(ch) == 0)
    }

    /// Whether a sweep is due: none ran in the last `every` seconds (then this caller
    /// runs it); every worker's timer asks, one of them sweeps.
    pub fn sweep_due(&mut self, now: u64, every: u64) -> bool {
        let h = unsafe { self.header() };
        if now.saturating_sub(h.swept) < every {
            return false;
        }
        h.swept = now;
        true
    }

    /// Drops channels without subscribers: deleted ones at once, others once inactive for
    /// `inactivity` seconds. Returns the ids dropped that were not deleted.
    pub fn collect(&mut self, now: u64, inactivity: u64) -> Vec<Vec<u8>> {
        let h = unsafe { self.header() };
        let mut destroyed = Vec::new();
        for b in 0..h.buckets {
            let mut link = self.bucket_ptr(b);
            loop {
                let i = unsafe { *link };
                if i == NIL {
                    break;
                }
                let ch = self.channel(i);
                let idle = now.saturating_sub(u64::from(ch.last_active)) >= inactivity
                    && ch.flags & FLAG_PINNED == 0
                    && self.stored_now(ch) == 0;
                let deleted = ch.flags & FLAG_DELETED != 0;
                if self.subscribers_of(ch) == 0 && (deleted || idle) {
                    if !deleted {
                        destroyed.push(self.name_of(ch));
                    }
                    self.unlink(i, link);
                } else {
                    link = &mut ch.next;
                }
            }
        }
        destroyed
    }

    /// Takes a worker slot for `pid`, first reclaiming the slots of dead workers.
    pub fn claim_worker(&mut self, pid: i64, now: u64, alive: impl Fn(i64) -> bool) -> Option<u16> {
        self.reclaim(&alive);
        let h = unsafe { self.header() };
        let k = h.workers.iter().position(|w| w.pid == 0)?;
        h.workers[k] = WorkerSlot { pid, started: now, subscribers: 0 };
        Some(k as u16)
    }

    /// A worker is leaving: its slot and whatever it still counted are freed.
    pub fn release_worker(&mut self, worker: u16) {
        self.drop_shares(worker);
        self.listens_dropped(worker);
        if let Some(w) = unsafe { self.header() }.workers.get_mut(worker as usize) {
            *w = WorkerSlot::default();
        }
    }

    /// A worker sent a LISTEN for this PostgreSQL channel name.
    pub fn listen_started(&mut self, name: &[u8], worker: u16) {
        let hv = hash(name);
        let pending = &mut unsafe { self.header() }.pending;
        if let Some(p) =
            pending.iter_mut().find(|p| p.count > 0 && p.hash == hv && p.worker == worker)
        {
            p.count = p.count.saturating_add(1);
        } else if let Some(p) = pending.iter_mut().find(|p| p.count == 0) {
            *p = PendingListen { hash: hv, count: 1, worker };
        }
    }

    /// The worker's LISTEN for this name is confirmed.
    pub fn listen_done(&mut self, name: &[u8], worker: u16) {
        let hv = hash(name);
        let pending = &mut unsafe { self.header() }.pending;
        if let Some(p) =
            pending.iter_mut().find(|p| p.count > 0 && p.hash == hv && p.worker == worker)
        {
            p.count -= 1;
        }
    }

    /// The worker's connection was lost (or the worker left): none of its LISTENs is in
    /// flight any more.
    pub fn listens_dropped(&mut self, worker: u16) {
        let pending = &mut unsafe { self.header() }.pending;
        pending.iter_mut().filter(|p| p.worker == worker).for_each(|p| p.count = 0);
    }

    /// Whether some worker of the node waits for its LISTEN on this name (or one with the
    /// same hash): a message notified now could miss its subscriber.
    pub fn listen_pending(&self, name: &[u8]) -> bool {
        let hv = hash(name);
        unsafe { self.header() }.pending.iter().any(|p| p.count > 0 && p.hash == hv)
    }

    /// Frees the slots of workers that died without releasing them; returns how many.
    pub fn reclaim(&mut self, alive: impl Fn(i64) -> bool) -> usize {
        let dead: Vec<u16> = unsafe { self.header() }
            .workers
            .iter()
            .enumerate()
            .filter(|(_, w)| w.pid != 0 && !alive(w.pid))
            .map(|(k, _)| k as u16)
            .collect();
        for &k in &dead {
            self.release_worker(k);
        }
        dead.len()
    }

    fn drop_shares(&self, worker: u16) {
        let buckets = unsafe { self.header() }.buckets;
        for b in 0..buckets {
            let mut i = unsafe { *self.bucket_ptr(b) };
            while i != NIL {
                let ch = self.channel(i);
                if ch.first_worker == worker {
                    ch.first_count = 0;
                    ch.first_worker = u16::MAX;
                }
                let mut link: *mut u32 = &mut ch.shares;
                loop {
                    let s = unsafe { *link };
                    if s == NIL {
                        break;
                    }
                    let share = unsafe { &mut *self.block(s).cast::<Share>() };
                    if share.worker == worker {
                        unsafe { *link = share.next };
                        self.release(s);
                    } else {
                        link = &mut share.next;
                    }
                }
                i = ch.next;
            }
        }
    }

    /// Channels that could not be counted since the last call (for one log line).
    pub fn take_full(&mut self) -> u32 {
        core::mem::take(&mut unsafe { self.header() }.full)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(len: usize) -> (Vec<u64>, Counters) {
        let mut mem = vec![0u64; len / 8];
        let c = unsafe { Counters::format(mem.as_mut_ptr().cast(), len, 1000) }.unwrap();
        (mem, c)
    }

    const NO: Limits = Limits {
        max_channels: None,
        max_wildcard_channels: None,
        max_subscribers: None,
        existing_only: false,
    };

    #[test]
    fn join_leave_and_info() {
        let (_m, mut c) = region(64 * 1024);
        let w = c.claim_worker(10, 1000, |_| true).unwrap();
        let w2 = c.claim_worker(11, 1000, |_| true).unwrap();
        c.join(b"news", false, w, 1000, true).unwrap();
        c.join(b"news", false, w2, 1000, true).unwrap();
        c.join(b"news", false, w2, 1000, true).unwrap();
        c.published(b"news", false, 1000, true);
        let i = c.info(b"news").unwrap();
        assert_eq!((i.published, i.subscribers), (1, 3));
        let s = c.summary();
        assert_eq!((s.channels, s.subscribers, s.published), (1, 3, 1));
        c.leave(b"news", w2, 1001, true);
        c.leave(b"news", w2, 1001, true);
        c.leave(b"news", w2, 1001, true); // one too many: ignored
        assert_eq!(c.info(b"news").unwrap().subscribers, 1);
        assert_eq!(c.summary().subscribers, 1);
        assert!(c.collect(2000, 30).is_empty(), "a channel with a subscriber stays");
        assert!(c.sweep_due(2000, 4));
        assert!(!c.sweep_due(2003, 4), "another worker swept a moment ago");
        assert!(c.sweep_due(2004, 4));
        c.leave(b"news", w, 1001, true);
        assert!(c.collect(1010, 30).is_empty(), "not inactive yet");
        c.pin(b"events", 1000);
        c.published(b"events", false, 1000, false);
        assert_eq!(c.summary().published, 1, "the events channel's are not in the total");
        assert_eq!(c.collect(1031, 30), vec![b"news".to_vec()]);
        assert_eq!(c.info(b"news"), None);
        assert_eq!(c.summary().channels, 1, "the pinned one stays");
        assert!(c.collect(99_999, 30).is_empty());
    }

    #[test]
    fn long_ids_and_listing_order() {
        let (_m, mut c) = region(64 * 1024);
        let long: Vec<u8> = (0..300).map(|k| b'a' + (k % 26) as u8).collect();
        let mut other = long.clone();
        *other.last_mut().unwrap() = b'!';
        c.touch(&long, false, 5, &NO).unwrap();
        c.touch(b"b1", false, 5, &NO).unwrap();
        c.touch(&other, false, 5, &NO).unwrap();
        c.touch(b"a1", false, 5, &NO).unwrap();
        assert_eq!(c.info(&long).unwrap().id, long);
        assert_eq!(c.info(&other).unwrap().id, other);
        let all: Vec<Vec<u8>> = c.list(b"").into_iter().map(|i| i.id).collect();
        assert_eq!(all, vec![long.clone(), b"b1".to_vec(), other.clone(), b"a1".to_vec()]);
        assert_eq!(c.list(b"a1").len(), 1);
        assert_eq!(c.list(b"abc").len(), 2);
        // their blocks come back
        assert_eq!(c.collect(100, 30).len(), 4);
        let used = unsafe { c.header() }.used;
        for k in 0..20 {
            c.touch(format!("again{k}").as_bytes(), false, 5, &NO).unwrap();
        }
        assert_eq!(unsafe { c.header() }.used, used.max(20));
    }

    #[test]
    fn limits() {
        let (_m, mut c) = region(64 * 1024);
        let w = c.claim_worker(1, 0, |_| true).unwrap();
        let lim = Limits { max_channels: Some(2), max_subscribers: Some(2), ..NO };
        assert_eq!(
            c.check_join(&[(b"a", false), (b"b", false), (b"c", false)], &lim),
            Err((2, Refusal::TooManyChannels))
        );
        c.join(b"a", false, w, 0, true).unwrap();
        c.join(b"a", false, w, 0, true).unwrap();
        assert_eq!(
            c.check_join(&[(b"b", false), (b"a", false)], &lim),
            Err((1, Refusal::TooManySubscribers))
        );
        assert_eq!(c.check_join(&[(b"b", false)], &lim), Ok(()));
        // wildcard channels count apart
        let lim = Limits { max_channels: Some(1), max_wildcard_channels: Some(1), ..NO };
        assert_eq!(c.check_join(&[(b"w_1", true)], &lim), Ok(()));
        assert_eq!(c.touch(b"b", false, 0, &lim), Err(Refusal::TooManyChannels));
        // authorized channels only: nobody published to it yet
        let lim = Limits { existing_only: true, ..NO };
        assert_eq!(c.check_join(&[(b"a", false)], &lim), Err((0, Refusal::NotCreated)));
        assert_eq!(c.check_join(&[(b"zz", false)], &lim), Err((0, Refusal::NotCreated)));
        assert_eq!(c.check_join(&[(b"w_2", true)], &lim), Ok(()));
        c.published(b"a", false, 0, true);
        assert_eq!(c.check_join(&[(b"a", false)], &lim), Ok(()));
    }

    #[test]
    fn a_stored_channel_exists_while_it_keeps_messages() {
        let (_m, mut c) = region(64 * 1024);
        let lim = Limits { existing_only: true, ..NO };
        c.set_now(100, 10);
        c.published(b"s", false, 100, true);
        c.stored(b"s", 3);
        c.published(b"p", false, 100, true);
        assert_eq!(c.check_join(&[(b"s", false)], &lim), Ok(()));
        assert_eq!(c.info(b"s").unwrap().stored, 3);
        c.set_now(109, 10);
        assert_eq!(c.summary().stored, 3, "within the ttl");
        assert_eq!(c.collect(109, 5), vec![b"p".to_vec()], "idle, but s keeps messages");
        c.set_now(110, 10);
        assert_eq!(c.info(b"s").unwrap().stored, 0, "the ttl has passed: all expired");
        assert_eq!(c.summary().stored, 0);
        assert_eq!(c.check_join(&[(b"s", false)], &lim), Err((0, Refusal::NotCreated)));
        c.published(b"p", false, 110, true);
        assert_eq!(c.check_join(&[(b"p", false)], &lim), Ok(()), "a plain one, published");
        let w = c.claim_worker(1, 0, |_| true).unwrap();
        c.join(b"s", false, w, 115, true).unwrap();
        c.leave(b"s", w, 115, true);
        c.set_now(115, 10);
        assert_eq!(c.info(b"s").unwrap().stored, 0, "a subscriber does not bring them back");
        c.published(b"s", false, 116, true);
        c.stored(b"s", 1);
        assert_eq!(c.check_join(&[(b"s", false)], &lim), Ok(()), "published again");
    }

    #[test]
    fn a_dead_workers_counts_are_reclaimed() {
        let (_m, mut c) = region(64 * 1024);
        let a = c.claim_worker(100, 0, |_| true).unwrap();
        let b = c.claim_worker(200, 0, |_| true).unwrap();
        for k in 0..50 {
            let id = format!("c{k}");
            c.join(id.as_bytes(), false, a, 0, true).unwrap();
            c.join(id.as_bytes(), false, b, 0, true).unwrap();
            c.join(id.as_bytes(), false, b, 0, true).unwrap();
        }
        assert_eq!(c.summary().subscribers, 150);
        // 200 was killed: its replacement reclaims its slot and counts
        let b2 = c.claim_worker(300, 0, |pid| pid != 200).unwrap();
        assert_eq!(b2, b);
        assert_eq!(c.summary().subscribers, 50);
        assert_eq!(c.info(b"c7").unwrap().subscribers, 1);
        c.join(b"c7", false, b2, 0, true).unwrap();
        assert_eq!(c.info(b"c7").unwrap().subscribers, 2);
        c.release_worker(a);
        assert_eq!(c.info(b"c7").unwrap().subscribers, 1);
        assert_eq!(c.summary().workers.len(), 1);
    }

    #[test]
    fn the_last_subscriber_of_a_deleted_channel_says_it_is_gone() {
        let (_m, mut c) = region(64 * 1024);
        let w = c.claim_worker(1, 0, |_| true).unwrap();
        c.join(b"x", false, w, 0, true).unwrap();
        c.join(b"x", false, w, 0, true).unwrap();
        assert_eq!(c.delete(b"x"), Some(false));
        assert!(!c.leave(b"x", w, 0, true));
        assert!(c.leave(b"x", w, 0, true), "the last one");
        c.published(b"y", false, 0, true);
        assert_eq!(c.delete(b"y"), Some(true), "no subscriber: gone at once");
    }

    #[test]
    fn pending_listens() {
        let (_m, mut c) = region(64 * 1024);
        assert!(!c.listen_pending(b"a"));
        c.listen_started(b"a", 0);
        c.listen_started(b"a", 1);
        assert!(c.listen_pending(b"a") && !c.listen_pending(b"b"));
        c.listen_done(b"a", 0);
        assert!(c.listen_pending(b"a"), "worker 1's is still in flight");
        c.listens_dropped(1);
        assert!(!c.listen_pending(b"a"));
        for k in 0..100u32 {
            c.listen_started(&k.to_be_bytes(), 0);
        }
        assert!(c.listen_pending(&5u32.to_be_bytes()));
        c.listen_done(b"zz", 0);
    }

    #[test]
    fn delete_then_recreate() {
        let (_m, mut c) = region(64 * 1024);
        let w = c.claim_worker(1, 0, |_| true).unwrap();
        c.join(b"x", false, w, 0, true).unwrap();
        assert!(!c.published(b"x", false, 0, true), "the subscriber created it");
        assert_eq!(c.delete(b"x"), Some(false), "it has a subscriber");
        assert_eq!(c.delete(b"x"), None);
        assert_eq!(c.info(b"x"), None);
        assert_eq!((c.summary().channels, c.summary().channels_in_delete), (0, 1));
        // a publish creates a fresh channel
        assert!(c.published(b"x", false, 0, true));
        assert_eq!(c.info(b"x").unwrap().published, 1);
        assert_eq!(c.summary().channels_in_delete, 0);
        assert_eq!(c.info(b"x").unwrap().subscribers, 1, "still leaving");
        assert!(!c.leave(b"x", w, 0, true), "it was re-created: not the deleted one's end");
        assert_eq!(c.info(b"x").unwrap().subscribers, 0);
        assert_eq!(c.summary().subscribers, 0);
    }

    #[test]
    fn a_full_region_refuses_and_recovers() {
        let (_m, mut c) = region(8 * 1024);
        let cap = c.capacity();
        let mut n = 0;
        while c.touch(format!("ch{n}").as_bytes(), false, 0, &NO).is_ok() {
            n += 1;
        }
        assert!(n + 1 >= cap - 1 && n < cap, "{n} of {cap}");
        assert_eq!(c.take_full(), 1);
        assert_eq!(c.take_full(), 0);
        c.collect(100, 30);
        assert!(c.touch(b"again", false, 0, &NO).is_ok());
    }
}
