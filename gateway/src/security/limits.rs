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
    ips: Mutex<IpBuckets>,
}

/// Most IP addresses tracked at once (two generations of half of it each).
const MAX_TRACKED_IPS: usize = 65_536;

/// The per-IP buckets, in two generations so that forgetting costs O(1) per new address: new
/// addresses go into `current`; an address seen again moves from `previous` to `current`; when
/// `current` holds half the cap, `previous` (addresses not seen for a whole generation) is
/// dropped and `current` becomes it. A forgotten address starts again with a full bucket, which
/// gives it at most one burst more — and only after half the cap of other addresses came.
#[derive(Default)]
struct IpBuckets {
    current: HashMap<IpKey, TokenBucket>,
    previous: HashMap<IpKey, TokenBucket>,
    /// Most addresses per generation.
    generation: usize,
}

/// What one bucket is kept for: an IPv4 address, or an IPv6 /64 (one subscriber's usual
/// allocation: keyed per full address, one /64 would bring 2^64 fresh buckets).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum IpKey {
    V4(u32),
    V6Net(u64),
}

impl IpKey {
    fn of(ip: IpAddr) -> IpKey {
        match crate::security::client_ip::canonical(ip) {
            IpAddr::V4(v4) => IpKey::V4(u32::from(v4)),
            IpAddr::V6(v6) => IpKey::V6Net((u128::from(v6) >> 64) as u64),
        }
    }
}

impl IpBuckets {
    fn new(cap: usize) -> IpBuckets {
        IpBuckets {
            generation: (cap / 2).max(1),
            ..IpBuckets::default()
        }
    }

    fn bucket(&mut self, key: IpKey, new: impl FnOnce() -> TokenBucket) -> &mut TokenBucket {
        if !self.current.contains_key(&key) {
            let bucket = self.previous.remove(&key).unwrap_or_else(new);
            if self.current.len() >= self.generation {
                self.previous = std::mem::take(&mut self.current);
            }
            self.current.insert(key, bucket);
        }
        self.current.get_mut(&key).expect("inserted above")
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }
}

impl Limits {
    pub fn new(config: &LimitsConfig) -> Self {
        Limits {
            config: config.clone(),
            connections: Arc::default(),
            users: Arc::default(),
            ips: Mutex::new(IpBuckets::new(MAX_TRACKED_IPS)),
        }
    }

    /// Whether a new connection from client `ip` (see `client_ip`) is within
    /// `limits.connection_rate_per_ip`; `Err` says when to retry. O(1) whatever the number of
    /// addresses tracked.
    pub fn accept_ip(&self, ip: IpAddr) -> Result<(), Duration> {
        let rate = self.config.connection_rate_per_ip;
        if rate <= 0.0 {
            return Ok(());
        }
        let burst = self.config.connection_burst_per_ip;
        self.ips
            .lock()
            .bucket(IpKey::of(ip), || TokenBucket::new(rate, burst))
            .take()
    }

    /// Addresses (IPv6 /64s) with a bucket now.
    #[cfg(test)]
    fn tracked_ips(&self) -> usize {
        self.ips.lock().len()
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
    fn the_ip_table_stays_bounded_and_remembers_recent_addresses() {
        let limits = Limits::new(&LimitsConfig {
            connection_rate_per_ip: 0.001,
            connection_burst_per_ip: 1,
            ..LimitsConfig::default()
        });
        let v4 = |n: u32| IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + n));
        let busy = v4(0);
        limits.accept_ip(busy).unwrap();
        assert!(limits.accept_ip(busy).is_err());
        // Three times the cap of new addresses: each costs O(1) (a generation swap is a move),
        // and the table never holds more than the cap.
        for n in 1..=(3 * MAX_TRACKED_IPS as u32) {
            limits.accept_ip(v4(n)).unwrap();
            assert!(limits.tracked_ips() <= MAX_TRACKED_IPS);
            // An address seen within every generation keeps its (empty) bucket.
            if n % 1000 == 0 {
                assert!(
                    limits.accept_ip(busy).is_err(),
                    "forgot a busy address at {n}"
                );
            }
        }
    }

    #[test]
    fn one_ipv6_64_shares_a_bucket() {
        let limits = Limits::new(&LimitsConfig {
            connection_rate_per_ip: 0.001,
            connection_burst_per_ip: 1,
            ..LimitsConfig::default()
        });
        limits
            .accept_ip("2001:db8:1:2::1".parse().unwrap())
            .unwrap();
        assert!(limits
            .accept_ip("2001:db8:1:2::ffff".parse().unwrap())
            .is_err());
        limits
            .accept_ip("2001:db8:1:3::1".parse().unwrap())
            .unwrap();
        // IPv4 seen through a dual-stack socket is the IPv4 address.
        limits.accept_ip("203.0.113.9".parse().unwrap()).unwrap();
        assert!(limits
            .accept_ip("::ffff:203.0.113.9".parse().unwrap())
            .is_err());
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
