//! `push_stream_events_channel_id`: a channel that tells about the others. Its messages are
//! push-stream's `{"type": "channel_created", "channel": "ID"}` (and `channel_destroyed`,
//! `client_subscribed`, `client_unsubscribed`), with the type as event type, published
//! through PostgreSQL like any message, so every node's subscribers of the events channel
//! hear about every node's channels.

use crate::nginx::{http, worker, zone};
use crate::protocol::template::Values;
use crate::protocol::{channels, payload};

#[derive(Clone, Copy, Debug)]
pub enum Event {
    ChannelCreated,
    ChannelDestroyed,
    ClientSubscribed,
    ClientUnsubscribed,
}

impl Event {
    fn name(self) -> &'static str {
        match self {
            Event::ChannelCreated => "channel_created",
            Event::ChannelDestroyed => "channel_destroyed",
            Event::ClientSubscribed => "client_subscribed",
            Event::ClientUnsubscribed => "client_unsubscribed",
        }
    }
}

/// The events channel's id, when configured.
pub fn channel() -> Option<&'static [u8]> {
    let id = http::cycle_main_conf()?.events_channel_id.as_bytes();
    (!id.is_empty()).then_some(id)
}

/// Whether `id` is the events channel.
pub fn is_events_channel(id: &[u8]) -> bool {
    channel() == Some(id)
}

/// The channel a message tells the creation of, if it is the events channel's
/// `channel_created`.
pub fn created(message: &Values<'_>) -> Option<String> {
    if message.event_type != Event::ChannelCreated.name()
        || !is_events_channel(message.channel.as_bytes())
    {
        return None;
    }
    let event = serde_json::from_slice::<serde_json::Value>(message.text).ok()?;
    Some(event.get("channel")?.as_str()?.to_string())
}

/// Publishes the event about channel `id` (nothing about the events channel itself).
pub fn emit(event: Event, id: &[u8]) {
    let Some(events) = channel() else { return };
    if id == events {
        return;
    }
    let (Ok(events), Ok(id)) = (core::str::from_utf8(events), core::str::from_utf8(id)) else {
        return;
    };
    let text =
        format!("{{\"type\": \"{}\", \"channel\": {}}}", event.name(), serde_json::Value::from(id));
    let meta = payload::Meta { event_type: Some(event.name().to_string()), ..Default::default() };
    let message = payload::wrap_text_with(&text, &meta);
    zone::published(events.as_bytes(), false);
    worker::with(|w| {
        let pg = channels::pg_channel(&w.prefix, events);
        let notified = payload::for_channel(&pg, events, &message);
        w.publish(pg, notified, false, Box::new(|_, _| {}));
    });
}

/// A subscriber left the channel; `ended`: it was the last of a deleted channel, which is
/// destroyed after its subscribers are unsubscribed, as in push-stream.
pub fn left(id: &[u8], ended: bool) {
    emit(Event::ClientUnsubscribed, id);
    if ended {
        emit(Event::ChannelDestroyed, id);
    }
}

/// The zone dropped an idle channel.
pub fn destroyed(id: &[u8]) {
    emit(Event::ChannelDestroyed, id);
}
