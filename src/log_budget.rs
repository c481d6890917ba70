//! The process-wide budget for warnings about connections that failed before HTTP (TLS,
//! PROXY header). A leaf: it imports nothing of wsgate, so low-level modules such as
//! `tls` can use it without depending on `observe` (which depends on `config`).

use std::sync::LazyLock;

/// Whether a warning about a connection that failed before HTTP (TLS, PROXY header) may be
/// written now: about ten lines a second across the process, so a scanner cannot flood
/// stderr. The failures are still counted exactly, in the metrics.
pub fn warn_budget() -> bool {
    use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
    static BUDGET: LazyLock<DefaultDirectRateLimiter> = LazyLock::new(|| {
        let ten = std::num::NonZeroU32::new(10).unwrap_or(std::num::NonZeroU32::MIN);
        RateLimiter::direct(Quota::per_second(ten))
    });
    BUDGET.check().is_ok()
}
