//! Per-source rate limits (token buckets from `governor`) on what a client
//! can make the server do; a limited call gets RESOURCE_EXHAUSTED with the
//! limit in its message. Keys that have been quiet for a while are dropped
//! by [`RateLimiters::spawn_janitor`], so memory follows the active sources.

use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use crate::error::{ControlError, Result};
use crate::limits::{Rate, RateLimits};

/// How often idle keys are dropped from the limiters: a key whose bucket is
/// full again holds no information, and a minute bounds the memory of a
/// flood from many addresses to a minute's worth of keys.
const JANITOR_INTERVAL: Duration = Duration::from_secs(60);

/// One limit: a bucket per key.
pub struct Limiter<K: Hash + Eq + Clone> {
    call: &'static str,
    per: &'static str,
    rate: Rate,
    buckets: DefaultKeyedRateLimiter<K>,
}

impl<K: Hash + Eq + Clone> Limiter<K> {
    fn new(call: &'static str, per: &'static str, rate: Rate) -> Self {
        let nz = |n: u32| NonZeroU32::new(n.max(1)).expect("at least one");
        let quota = Quota::per_second(nz(rate.per_second)).allow_burst(nz(rate.burst));
        Self {
            call,
            per,
            rate,
            buckets: governor::RateLimiter::keyed(quota),
        }
    }

    /// Takes one call of `key`'s allowance, or refuses it.
    pub fn check(&self, key: &K) -> Result<()> {
        self.buckets.check_key(key).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            ControlError::ResourceExhausted(format!(
                "{} is limited to {}/s per {} (bursts of {}); retry in {} ms",
                self.call,
                self.rate.per_second,
                self.per,
                self.rate.burst,
                wait.as_millis().max(1)
            ))
        })
    }

    fn sweep(&self) {
        self.buckets.retain_recent();
        self.buckets.shrink_to_fit();
    }
}

/// Every rate limit of the server.
#[derive(Default)]
pub struct RateLimiters {
    pub join: Option<Limiter<IpAddr>>,
    pub authenticate: Option<Limiter<IpAddr>>,
    pub update_endpoints: Option<Limiter<String>>,
    pub request_punch: Option<Limiter<String>>,
    pub stun: Option<Limiter<IpAddr>>,
}

/// Checks `key` against `limiter` when there is one.
pub fn check<K: Hash + Eq + Clone>(limiter: &Option<Limiter<K>>, key: &K) -> Result<()> {
    limiter.as_ref().map_or(Ok(()), |l| l.check(key))
}

impl RateLimiters {
    pub fn new(rates: &RateLimits) -> Arc<Self> {
        Arc::new(Self {
            join: rates
                .join
                .map(|r| Limiter::new("Join", "client address", r)),
            authenticate: rates
                .authenticate
                .map(|r| Limiter::new("Authenticate", "client address", r)),
            update_endpoints: rates
                .update_endpoints
                .map(|r| Limiter::new("UpdateEndpoints", "node", r)),
            request_punch: rates
                .request_punch
                .map(|r| Limiter::new("RequestPunch", "node", r)),
            stun: rates
                .stun
                .map(|r| Limiter::new("STUN", "client address", r)),
        })
    }

    /// Drops idle keys now and then, for as long as the limiters live.
    pub fn spawn_janitor(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(JANITOR_INTERVAL);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(this) = weak.upgrade() else { return };
                if let Some(l) = &this.join {
                    l.sweep();
                }
                if let Some(l) = &this.authenticate {
                    l.sweep();
                }
                if let Some(l) = &this.update_endpoints {
                    l.sweep();
                }
                if let Some(l) = &this.request_punch {
                    l.sweep();
                }
                if let Some(l) = &this.stun {
                    l.sweep();
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_refusals_that_name_the_limit() {
        let l = Limiter::new(
            "UpdateEndpoints",
            "node",
            Rate {
                per_second: 1,
                burst: 3,
            },
        );
        let a = "a".to_string();
        for _ in 0..3 {
            l.check(&a).unwrap();
        }
        let err = l.check(&a).unwrap_err().to_string();
        assert!(
            err.contains("UpdateEndpoints is limited to 1/s per node"),
            "{err}"
        );
        assert!(err.contains("retry in"), "{err}");
        l.check(&"b".to_string())
            .expect("another key has its own bucket");
    }
}
