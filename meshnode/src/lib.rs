//! The `meshnode` binary's library: the local API (its operations and a
//! typed client, [`api`]), its server ([`server`]) and the messages
//! protocol ([`messages`]). This is the one crate that knows every
//! application: it registers messages, TUN, content and sessions on the
//! endpoint's router and serves them to local programs.

pub mod api;
pub mod messages;
pub mod server;
