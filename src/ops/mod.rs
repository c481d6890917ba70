//! Operations (SPEC §7, §8) below the gateway: the registry of live connections (what
//! drains, `/connections` and admin closes act on), revocations (what `/revoke` refuses at
//! the handshake), and returning memory to the OS after bursts. Reload and drain
//! themselves are the gateway's.

pub mod memory;
pub mod registry;
pub mod revocation;
