//! The node-wide counter zone (`push_stream_shared_memory_size`): channels, published
//! messages and subscribers, for channel info, statistics and limits. The layout and why
//! it cannot fragment are in [`crate::counters`]; this file makes it an nginx shared
//! memory zone and gives each worker its slot.
//!
//! The region is one allocation from the zone's slab pool, made when the zone is created,
//! and the pool's mutex is the lock: nginx's master releases it if a worker dies holding
//! it. A reload with the same size and name keeps the zone, and so the counts.

use core::ffi::c_void;
use core::ptr;
use std::cell::RefCell;

use nginx_sys::{
    ngx_conf_t, ngx_event_t, ngx_int_t, ngx_shm_zone_t, ngx_slab_pool_t, ngx_str_t, NGX_LOG_EMERG,
    NGX_LOG_ERR,
};

use crate::counters::{Counters, Info, Limits, Refusal, Summary};
use crate::nginx::conf::MainConf;

/// push-stream's zone name, used when `push_stream_shared_memory_size` names none.
const DEFAULT_NAME: &str = "push_stream_module";
/// How often a worker drops inactive channels and reclaims dead workers' counts.
const SWEEP_EVERY: nginx_sys::ngx_msec_t = 4000;

/// Declares the zone (from `init_main_conf`, when some location uses the module).
pub fn add(cf: &mut ngx_conf_t, mcf: &mut MainConf) -> Result<(), ()> {
    let name = mcf.shared_memory_name.clone().unwrap_or_else(|| DEFAULT_NAME.to_string());
    // nginx keeps the name for the zone's lifetime: the configuration pool's copy
    let name = leak_in_pool(cf, &name).ok_or(())?;
    let mut name = name;
    let mut size = mcf.shared_memory_size;
    // a reload keeps the running zone, and so the counts: nginx would make a new, empty one
    // for a new size
    if let Some(running) = running_size(&name).filter(|&old| old != size) {
        ngx::ngx_conf_log_error!(
            nginx_sys::NGX_LOG_WARN,
            cf,
            "Cannot change memory area size without restart, ignoring change on zone: {}",
            name
        );
        size = running;
    }
    // SAFETY: cf is the configuration being parsed; the tag is our module
    let zone = unsafe {
        nginx_sys::ngx_shared_memory_add(
            cf,
            &mut name,
            size,
            ptr::addr_of_mut!(crate::nginx::ngx_http_pgpush_module).cast(),
        )
    };
    if zone.is_null() {
        return Err(());
    }
    // SAFETY: a zone nginx just gave us (nginx refuses a name another module declared)
    unsafe { (*zone).init = Some(init_zone) };
    mcf.zone = zone;
    Ok(())
}

/// The size of our zone of this name in the running cycle (the one a reload replaces).
fn running_size(name: &ngx_str_t) -> Option<usize> {
    let tag = ptr::addr_of_mut!(crate::nginx::ngx_http_pgpush_module).cast::<c_void>();
    // SAFETY: while a configuration is read, ngx_cycle is the running cycle (at startup, an
    // empty one); its list of zones is nginx's, parts chained until a null next
    unsafe {
        let cycle = nginx_sys::ngx_cycle;
        if cycle.is_null() {
            return None;
        }
        let mut part: *const nginx_sys::ngx_list_part_t = &(*cycle).shared_memory.part;
        while !part.is_null() {
            let elts = (*part).elts.cast::<ngx_shm_zone_t>();
            for i in 0..(*part).nelts {
                let z = &*elts.add(i);
                if z.tag == tag && z.shm.name.as_bytes() == name.as_bytes() {
                    return Some(z.shm.size);
                }
            }
            part = (*part).next;
        }
    }
    None
}

fn leak_in_pool(cf: &mut ngx_conf_t, s: &str) -> Option<ngx_str_t> {
    // SAFETY: pool memory of the configuration, as long-lived as the cycle
    let p = unsafe { nginx_sys::ngx_pnalloc(cf.pool, s.len()) }.cast::<u8>();
    if p.is_null() {
        return None;
    }
    // SAFETY: p has room for s
    unsafe { ptr::copy_nonoverlapping(s.as_ptr(), p, s.len()) };
    Some(ngx_str_t { len: s.len(), data: p })
}

/// Formats the zone once; a zone kept across a reload keeps its counts.
extern "C" fn init_zone(zone: *mut ngx_shm_zone_t, data: *mut c_void) -> ngx_int_t {
    // SAFETY: nginx passes our zone, its slab pool already initialised
    let zone = unsafe { &mut *zone };
    if !data.is_null() {
        zone.data = data;
        return nginx_sys::NGX_OK as ngx_int_t;
    }
    let pool = zone.shm.addr.cast::<ngx_slab_pool_t>();
    // SAFETY: the pool heads the zone
    let pool = unsafe { &mut *pool };
    if zone.shm.exists != 0 {
        zone.data = pool.data;
        return nginx_sys::NGX_OK as ngx_int_t;
    }
    // the whole free area in one allocation, never freed: no allocator runs afterwards
    // SAFETY: ngx_pagesize is set at startup
    let len = pool.pfree * unsafe { nginx_sys::ngx_pagesize };
    // SAFETY: the pool is ours and nobody else uses it yet
    let base = unsafe { nginx_sys::ngx_slab_alloc(pool, len) }.cast::<u8>();
    // SAFETY: fresh shared pages (zero), len bytes, page-aligned
    let counters =
        (!base.is_null()).then(|| unsafe { Counters::format(base, len, now()) }).flatten();
    if counters.is_none() {
        ngx::ngx_log_error!(
            NGX_LOG_EMERG,
            zone.shm.log,
            "\"push_stream_shared_memory_size\" {} is too small for the counter zone",
            zone.shm.size
        );
        return nginx_sys::NGX_ERROR as ngx_int_t;
    }
    pool.data = base.cast();
    zone.data = base.cast();
    nginx_sys::NGX_OK as ngx_int_t
}

fn now() -> u64 {
    // SAFETY: nginx's cached time is always set
    unsafe { (*nginx_sys::ngx_cached_time).sec as u64 }
}

struct Zone {
    counters: Counters,
    pool: *mut ngx_slab_pool_t,
    worker: u16,
    sweep: Box<ngx_event_t>,
    inactivity: u64,
    /// `push_stream_message_ttl` (s) when messages are stored.
    ttl: u64,
    /// `push_stream_wildcard_channel_prefix`; empty: no wildcard channels.
    wildcard_prefix: Vec<u8>,
    /// Told of each channel dropped for inactivity.
    destroyed: Option<fn(&[u8])>,
}

thread_local! {
    static ZONE: RefCell<Option<Zone>> = const { RefCell::new(None) };
}

/// Runs `f` with the counters locked; `None` without a zone (a process that is not a
/// worker, or a worker without a slot).
fn locked<R>(f: impl FnOnce(&mut Counters, u16, &dyn Fn(&[u8]) -> bool) -> R) -> Option<R> {
    ZONE.with(|z| {
        let mut z = z.try_borrow_mut().ok()?;
        let z = z.as_mut()?;
        let prefix = &z.wildcard_prefix;
        let wildcard = |id: &[u8]| !prefix.is_empty() && id.starts_with(prefix);
        // SAFETY: the pool's mutex, initialised by nginx for every zone
        unsafe { nginx_sys::ngx_shmtx_lock(&mut (*z.pool).mutex) };
        z.counters.set_now(now(), z.ttl);
        let r = f(&mut z.counters, z.worker, &wildcard);
        // SAFETY: as above, locked just now
        unsafe { nginx_sys::ngx_shmtx_unlock(&mut (*z.pool).mutex) };
        Some(r)
    })
}

fn alive(pid: i64) -> bool {
    // SAFETY: signal 0 only checks that the process exists
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// A worker starts: it takes a slot, reclaiming those of workers that died; `destroyed`
/// is told of the channels it drops for inactivity.
pub fn start(
    mcf: &MainConf,
    log: *mut nginx_sys::ngx_log_t,
    conn: *mut c_void,
    destroyed: Option<fn(&[u8])>,
) {
    if mcf.zone.is_null() {
        return;
    }
    // SAFETY: the zone of the running cycle, initialised before workers start
    let (data, pool) = unsafe { ((*mcf.zone).data, (*mcf.zone).shm.addr.cast()) };
    // SAFETY: data is the region init_zone formatted
    let Some(counters) = (unsafe { Counters::attach(data.cast()) }) else {
        return;
    };
    // SAFETY: an all-zero event is nginx's initial state
    let mut sweep: Box<ngx_event_t> = Box::new(unsafe { core::mem::zeroed() });
    sweep.handler = Some(on_sweep);
    sweep.data = conn;
    sweep.log = log;
    sweep.set_cancelable(1);
    let mut zone = Zone {
        counters,
        pool,
        worker: 0,
        sweep,
        inactivity: mcf.channel_inactivity_time as u64,
        ttl: if mcf.store { mcf.message_ttl as u64 } else { 0 },
        wildcard_prefix: mcf.wildcard_channel_prefix.as_bytes().to_vec(),
        destroyed,
    };
    // SAFETY: ngx_pid is this process
    let pid = i64::from(unsafe { nginx_sys::ngx_pid });
    // SAFETY: as in locked()
    unsafe { nginx_sys::ngx_shmtx_lock(&mut (*pool).mutex) };
    let slot = zone.counters.claim_worker(pid, now(), alive);
    let events = mcf.events_channel_id.as_bytes();
    if !events.is_empty() {
        // push-stream's events channel exists from the start and is never dropped
        zone.counters.pin(events, now());
    }
    // SAFETY: as above
    unsafe { nginx_sys::ngx_shmtx_unlock(&mut (*pool).mutex) };
    let Some(slot) = slot else {
        ngx::ngx_log_error!(
            NGX_LOG_ERR,
            log,
            "pgpush: no free worker slot in the counter zone: this worker's subscribers are not \
             counted"
        );
        return;
    };
    zone.worker = slot;
    // SAFETY: our boxed event, deleted in stop()
    unsafe { nginx_sys::ngx_add_timer(&mut *zone.sweep, SWEEP_EVERY) };
    ZONE.with(|z| *z.borrow_mut() = Some(zone));
}

/// The worker exits: its slot and remaining counts are released.
pub fn stop() {
    let Some(mut zone) = ZONE.with(|z| z.borrow_mut().take()) else { return };
    if zone.sweep.timer_set() != 0 {
        // SAFETY: our own timer
        unsafe { nginx_sys::ngx_del_timer(&mut *zone.sweep) };
    }
    // SAFETY: as in locked()
    unsafe { nginx_sys::ngx_shmtx_lock(&mut (*zone.pool).mutex) };
    zone.counters.release_worker(zone.worker);
    // SAFETY: as above
    unsafe { nginx_sys::ngx_shmtx_unlock(&mut (*zone.pool).mutex) };
}

extern "C" fn on_sweep(ev: *mut ngx_event_t) {
    let (inactivity, destroyed) = ZONE
        .with(|z| z.borrow().as_ref().map(|z| (z.inactivity, z.destroyed)))
        .unwrap_or((30, None));
    let (full, gone) = locked(|c, _, _| {
        c.reclaim(alive);
        // a second of slack: the timers of the workers drift apart
        if !c.sweep_due(now(), (SWEEP_EVERY / 1000) as u64 - 1) {
            return (0, Vec::new());
        }
        let gone = c.collect(now(), inactivity);
        (c.take_full(), gone)
    })
    .unwrap_or_default();
    if let Some(destroyed) = destroyed {
        gone.iter().for_each(|id| destroyed(id));
    }
    if full > 0 {
        // SAFETY: the event's log is the cycle's
        ngx::ngx_log_error!(
            NGX_LOG_ERR,
            unsafe { (*ev).log },
            "pgpush: the counter zone is full: {} channels were not counted; raise \
             \"push_stream_shared_memory_size\"",
            full
        );
    }
    // SAFETY: our own event; exiting workers skip cancelable timers
    unsafe { nginx_sys::ngx_add_timer(ev, SWEEP_EVERY) };
}

/// Whether a subscriber may join these channels.
pub fn check_join(ids: &[&[u8]], limits: &Limits) -> Result<(), (usize, Refusal)> {
    locked(|c, _, wild| {
        let ids: Vec<(&[u8], bool)> = ids.iter().map(|id| (*id, wild(id))).collect();
        c.check_join(&ids, limits)
    })
    .unwrap_or(Ok(()))
}

/// Whether the id is a wildcard channel's.
pub fn is_wildcard(id: &[u8]) -> bool {
    locked(|_, _, wild| wild(id)).unwrap_or(false)
}

/// A subscriber joined a channel (`first`: the first of its subscription, which counts
/// it once in the summary); whether that created the channel.
pub fn join(id: &[u8], first: bool) -> bool {
    locked(|c, w, wild| c.join(id, wild(id), w, now(), first).unwrap_or(false)).unwrap_or(false)
}

/// A subscriber left a channel (`last`: its last one).
/// Returns whether that ended a deleted channel (its last subscriber left).
pub fn leave(id: &[u8], last: bool) -> bool {
    locked(|c, w, _| c.leave(id, w, now(), last)).unwrap_or(false)
}

/// Creates the channel if needed, within the limits; whether it was created.
pub fn touch(id: &[u8], limits: &Limits) -> Result<bool, Refusal> {
    locked(|c, _, wild| c.touch(id, wild(id), now(), limits)).unwrap_or(Ok(false))
}

/// A message was published through this node (`global`: counted in the node's total);
/// whether that created the channel.
pub fn published(id: &[u8], global: bool) -> bool {
    locked(|c, _, wild| c.published(id, wild(id), now(), global)).unwrap_or(false)
}

pub fn stored(id: &[u8], kept: i64) {
    locked(|c, _, _| c.stored(id, kept.max(0) as u64));
}

pub fn info(id: &[u8]) -> Option<Info> {
    locked(|c, _, _| c.info(id)).flatten()
}

pub fn list(prefix: &[u8]) -> Vec<Info> {
    locked(|c, _, _| c.list(prefix)).unwrap_or_default()
}

pub fn summary() -> Summary {
    locked(|c, _, _| {
        c.reclaim(alive);
        c.summary()
    })
    .unwrap_or_default()
}

/// This worker sent a LISTEN for this PostgreSQL channel name.
pub fn listen_started(name: &[u8]) {
    locked(|c, w, _| c.listen_started(name, w));
}

/// This worker's LISTEN for this name is confirmed.
pub fn listen_done(name: &[u8]) {
    locked(|c, w, _| c.listen_done(name, w));
}

/// This worker's connection is lost or back: no LISTEN of its is in flight.
pub fn listens_dropped() {
    locked(|c, w, _| c.listens_dropped(w));
}

/// Whether a worker of this node waits for its LISTEN on this name.
pub fn listen_pending(name: &[u8]) -> bool {
    locked(|c, _, _| c.listen_pending(name)).unwrap_or(false)
}

/// Deletes the channel: `None` if it does not exist, else whether it had no subscriber.
pub fn delete(id: &[u8]) -> Option<bool> {
    locked(|c, _, _| c.delete(id)).flatten()
}
