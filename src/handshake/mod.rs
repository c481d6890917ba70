//! A connection from its request head to its end (SPEC §3, §6): the HTTP/1.1 driver
//! (`http1`), the admission decision it asks ([`admit`], pure), the upgrade checks
//! ([`upgrade`], pure), the request the upstream gets (`forward`), the log facts
//! (`facts`) and the relayed connection's bookkeeping (`session`). On `http: proxy`
//! routes the driver also relays plain requests (`http1::plain`), several per kept-alive
//! connection, before any upgrade.
//!
//! The listener hands over an [`Accepted`] connection (PROXY header read, TLS done);
//! [`serve`] returns the relay phase when the upgrade succeeded. Refusals at accept are
//! judged by [`admit::admit_at_accept`] and logged through `refused`, which also keeps
//! one address's refusal lines to ten a second.

pub mod admit;
mod facts;
mod forward;
mod hints;
mod http1;
mod http2;
mod refused;
mod session;
pub mod upgrade;

pub use crate::observe::refusals::Refusing;
pub use admit::EarlyPermit;
pub use http1::{Accepted, InHandshake, serve};
pub use http2::serve as serve_h2;
pub use refused::{Refused, log_at_accept, log_summary, note as note_refusal};
pub use session::RelayPhase;
