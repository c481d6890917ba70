//! wsgate: a frame-aware WebSocket edge gateway.
//!
//! # One connection's path
//! [`listener`] accepts it (PROXY header, the per-IP count taken at accept, TLS) and hands
//! it to [`handshake`], whose HTTP/1.1 driver reads the head and asks
//! [`handshake::admit`] for the decision (pure: [`admission`] rules, [`handshake::upgrade`]
//! checks, [`config`]); an admitted upgrade goes to [`upstream`] (backend choice, its own
//! handshake before the 101), then [`relay`] moves frames until an [`outcome::Ending`];
//! the connection's record goes to [`observe`]. [`outcome`] is the vocabulary every stage
//! speaks. `docs/architecture.md` draws it and says which module owns each SPEC section.
//!
//! # Layout (each module imports only those below it; `tests/architecture.rs` checks)
//! - [`gateway`]: starts every part, drains and reloads (SPEC §8); the top.
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics`, `/connections`, backend drain, admin
//!   closes and revocations (token-guarded).
//! - [`listener`]: bind, accept, PROXY header, TLS accept; one task per connection.
//! - [`handshake`]: the HTTP/1.1 driver, the pure admission decision, the upgrade checks,
//!   the forwarded request, log facts, the relayed connection's bookkeeping (SPEC §3).
//! - [`shared`]: the state every connection reads (config, limiters, pools, metrics).
//! - [`fleet`]: what a fleet of instances shares through Redis (SPEC §10): fleet-wide
//!   caps and handshake rate, revocations and admin closes; never the relay.
//! - [`upstream`]: backend pools (sticky hashing, health, DNS, drain) and the upstream
//!   handshake before the 101; plain requests of `http: proxy` routes over kept-alive
//!   hyper client connections (`upstream::plain`).
//! - [`relay`]: the frame-aware, unbuffered relay of SPEC §4/§5 ([`relay::deadlines`]
//!   decides pings and timeouts).
//! - [`config`]: YAML → validated, typed [`config::Config`]; reads files only through an
//!   injected reader (SPEC §2).
//! - [`admission`]: the pure rules: origins, tokens, API keys, client IP, per-IP limits.
//! - [`tls`]: rustls configurations and certificate loading; [`devca`]: the local
//!   development CA's files.
//! - [`ops`]: the registry of live connections, memory trimming.
//! - [`observe`]: the access log, metrics and tracing; plain records in (SPEC §6, §7).
//! - [`outcome`]: refusals, endings, close codes and reason words (SPEC §3, §5).
//! - [`http_util`], [`log_budget`], [`ids`], [`echo`]: leaves.
//! - `fuzzing` (feature `fuzzing`): entry points for the fuzz targets.

pub mod admin;
pub mod admission;
pub mod config;
pub mod devca;
pub mod echo;
pub mod fleet;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod gateway;
pub mod handshake;
pub mod http_util;
pub mod ids;
pub mod listener;
pub mod log_budget;
pub mod observe;
pub mod ops;
pub mod outcome;
pub mod relay;
pub mod shared;
pub mod tls;
pub mod upstream;

pub use gateway::{Gateway, StartError, start, start_with};
pub use shared::Shared;
