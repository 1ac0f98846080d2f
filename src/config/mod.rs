//! Configuration values: pure parsers and the typed results the nginx layer stores.

pub mod conninfo;
pub mod values;
