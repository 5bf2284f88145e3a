//! Abuse limits: token buckets (per-IP connection rate, per-connection command rate) and the
//! node's connection counts (per node, per user), held by RAII permits.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use crate::config::LimitsConfig;
use crate::protocol::error_code;

/// A token bucket: `rate` tokens a second, at most `burst` (at least 1) saved up.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
    }

    /// Takes a token, or says how long until one is there.
    pub fn take(&mut self) -> Result<(), Duration> {
        self.refill(Instant::now());
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }

    fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }
}

/// Why a connection is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `limits.max_connections` reached.
    Node,
    /// `limits.max_connections_per_user` reached for this user.
    User,
}

impl Refusal {
    pub fn code(self) -> &'static str {
        match self {
            Refusal::Node => error_code::TOO_MANY_CONNECTIONS,
            Refusal::User => error_code::TOO_MANY_USER_CONNECTIONS,
        }
    }

    /// The bounded label of `gateway_limit_rejections_total`.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Node => "max_connections",
            Refusal::User => "max_connections_per_user",
        }
    }
}

/// Connection counts and per-IP buckets of one node.
pub struct Limits {
    config: LimitsConfig,
    connections: Arc<AtomicUsize>,
    users: Arc<Mutex<HashMap<Arc<str>, usize>>>,
    ips: Mutex<HashMap<IpAddr, TokenBucket>>,
}

/// Most IP addresses tracked at once; beyond it, addresses whose bucket is full are forgotten.
const MAX_TRACKED_IPS: usize = 65_536;

impl Limits {
    pub fn new(config: &LimitsConfig) -> Self {
        Limits {
            config: config.clone(),
            connections: Arc::default(),
            users: Arc::default(),
            ips: Mutex::default(),
        }
    }

    /// Whether a new TCP connection from `ip` is within `limits.connection_rate_per_ip`;
    /// `Err` says when to retry.
    pub fn accept_ip(&self, ip: IpAddr) -> Result<(), Duration> {
        let rate = self.config.connection_rate_per_ip;
        if rate <= 0.0 {
            return Ok(());
        }
        let mut ips = self.ips.lock();
        if ips.len() >= MAX_TRACKED_IPS && !ips.contains_key(&ip) {
            let now = Instant::now();
            ips.retain(|_, bucket| !bucket.is_full(now));
        }
        ips.entry(ip)
            .or_insert_with(|| TokenBucket::new(rate, self.config.connection_burst_per_ip))
            .take()
    }

    /// Counts a new streaming connection against the node's limit.
    pub fn admit(&self) -> Result<Permit, Refusal> {
        let max = self.config.max_connections;
        let previous = self.connections.fetch_add(1, Ordering::AcqRel);
        let permit = Permit {
            connections: self.connections.clone(),
            users: self.users.clone(),
            user: None,
        };
        if max > 0 && previous >= max {
            return Err(Refusal::Node);
        }
        Ok(permit)
    }

    /// Counts the connection against its user's limit, once the user is known.
    pub fn admit_user(&self, permit: &mut Permit, user: &Arc<str>) -> Result<(), Refusal> {
        if permit.user.as_ref() == Some(user) {
            return Ok(());
        }
        let max = self.config.max_connections_per_user;
        let mut users = self.users.lock();
        let count = users.entry(user.clone()).or_insert(0);
        if max > 0 && *count >= max {
            if *count == 0 {
                users.remove(user);
            }
            return Err(Refusal::User);
        }
        *count += 1;
        drop(users);
        permit.release_user();
        permit.user = Some(user.clone());
        Ok(())
    }
}

/// A streaming connection's place in the node's counts; released when dropped.
pub struct Permit {
    connections: Arc<AtomicUsize>,
    users: Arc<Mutex<HashMap<Arc<str>, usize>>>,
    user: Option<Arc<str>>,
}

impl Permit {
    fn release_user(&mut self) {
        if let Some(user) = self.user.take() {
            let mut users = self.users.lock();
            if let Some(count) = users.get_mut(&user) {
                *count -= 1;
                if *count == 0 {
                    users.remove(&user);
                }
            }
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.release_user();
        self.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_its_burst_then_says_when() {
        let mut b = TokenBucket::new(2.0, 3);
        for _ in 0..3 {
            b.take().unwrap();
        }
        let wait = b.take().unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        // A fast bucket is full again at once.
        let mut fast = TokenBucket::new(1e9, 1);
        fast.take().unwrap();
        fast.refill(Instant::now() + Duration::from_millis(1));
        fast.take().unwrap();
    }

    #[test]
    fn counts_are_released_by_permits() {
        let limits = Limits::new(&LimitsConfig {
            max_connections: 2,
            max_connections_per_user: 1,
            ..LimitsConfig::default()
        });
        let user: Arc<str> = "u".into();
        let mut a = limits.admit().unwrap();
        let mut b = limits.admit().unwrap();
        assert_eq!(limits.admit().err(), Some(Refusal::Node));
        limits.admit_user(&mut a, &user).unwrap();
        assert_eq!(limits.admit_user(&mut b, &user), Err(Refusal::User));
        drop(a);
        limits.admit_user(&mut b, &user).unwrap();
        assert!(limits.admit().is_ok());
    }
}
