//! What the side connection reports reaches the subscription lifecycle and the waiting
//! publishes from here: the eventfd's read handler.

use nginx_sys::{ngx_connection_t, ngx_event_t};

use crate::nginx::{lifecycle, worker, zone};
use crate::postgres::Event;

/// Events handled per wakeup before yielding back to the event loop.
const BATCH: usize = 1024;
/// Notifications queued per subscriber before their connections are written.
const FLUSH_EVERY: usize = 64;

pub extern "C" fn on_bridge(ev: *mut ngx_event_t) {
    // SAFETY: ev belongs to our eventfd connection
    let c = unsafe { (*ev).data.cast::<ngx_connection_t>() };
    // SAFETY: c is alive while its events fire
    if unsafe { (*c).close() } != 0 {
        shutdown();
        return;
    }
    let Some((events, drained)) = worker::with(|w| {
        let mut events = Vec::new();
        let drained = w.take_events(&mut events, BATCH);
        (events, drained)
    }) else {
        return;
    };
    let mut since_flush = 0;
    for e in events {
        if matches!(e, Event::Notification { .. }) {
            since_flush += 1;
        }
        handle(e);
        // write out every few messages: frames coalesce per connection, yet no queue
        // holds a whole batch
        if since_flush == FLUSH_EVERY {
            lifecycle::settle();
            since_flush = 0;
        }
    }
    lifecycle::settle();
    if !drained {
        worker::with(|w| w.wake());
    }
}

fn handle(e: Event) {
    match e {
        Event::Log { level, msg } => {
            worker::with(|w| worker::log(w.log, level, &msg));
        }
        Event::Notification { channel, payload } => {
            for channel in worker::with(|w| w.notified(&channel, &payload)).unwrap_or_default() {
                lifecycle::deliver(&channel, &payload);
            }
        }
        Event::Positions(list) => lifecycle::positions(list),
        Event::Listening(names) => {
            names.iter().for_each(|n| zone::listen_done(n.as_bytes()));
            let channels: Vec<String> =
                worker::with(|w| names.iter().flat_map(|n| w.channels_of(n)).collect())
                    .unwrap_or_default();
            lifecycle::listening(&channels);
        }
        Event::Published { ids, error, stored } => {
            for (k, id) in ids.into_iter().enumerate() {
                if let Some(Some(done)) = worker::with(|w| w.take_publish(id)) {
                    let kept = stored.get(k).copied().unwrap_or(0);
                    done(id, error.as_deref().map_or(Ok(kept), Err));
                }
            }
        }
        Event::History { id, result } => {
            if let Some(Some(done)) = worker::with(|w| w.take_history(id)) {
                done(result);
            }
        }
        Event::HookRows { id, rows } => {
            if let Some(Some(reply)) = worker::with(|w| w.take_hook(id)) {
                reply(id, rows);
            }
        }
        // what was published while the connection was down is gone: say so
        Event::Connected { relistened } => {
            zone::listens_dropped();
            if relistened {
                lifecycle::gap();
            }
        }
        Event::Disconnected => zone::listens_dropped(),
    }
}

/// Quit, reload or fast shutdown: every subscriber and waiting publisher is answered and
/// closed, then the side connection stops.
pub fn shutdown() {
    lifecycle::log_cache_stats();
    lifecycle::shutdown();
    let pending = worker::with(|w| w.take_all_publishes()).unwrap_or_default();
    for (id, done) in pending {
        done(id, Err("nginx is shutting down"));
    }
    worker::stop();
}
