//! Wire formats, free of nginx: channel paths, PostgreSQL channel names, message templates
//! and the WebSocket handshake and frames.

pub mod channels;
pub mod template;
pub mod websocket;
