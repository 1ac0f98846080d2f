//! Wire formats, free of nginx: channel paths, PostgreSQL channel names, NOTIFY payloads,
//! message templates and the WebSocket handshake and frames.

pub mod channels;
pub mod info;
pub mod payload;
pub mod stream;
pub mod template;
pub mod websocket;
