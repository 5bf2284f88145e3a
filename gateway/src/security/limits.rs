//! Abuse limits: token buckets (per-IP connection rate, per-connection command rate, per-IP
//! fresh channels) and the node's connection counts (per node, per user), held by RAII permits.

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

    /// Takes `count` tokens at once, or none and says how long until they are there (a count
    /// above the burst never fits: it waits as long as an empty bucket takes to fill).
    pub fn take_many(&mut self, count: f64) -> Result<(), Duration> {
        self.refill(Instant::now());
        if self.tokens >= count {
            self.tokens -= count;
            Ok(())
        } else {
            let missing = count.min(self.burst) - self.tokens;
            Err(Duration::from_secs_f64(missing.max(0.0) / self.rate))
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

/// Why a request's fresh channels (channels the node holds no subscription for, each a new
/// backplane subscription and history read) are refused.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FreshRefusal {
    /// More than `limits.fresh_channels_per_request` in one SSE or poll request.
    PerRequest { max: usize },
    /// This IP's `limits.fresh_channels_per_second` is spent; retry after the duration.
    PerSecond { rate: f64, retry: Duration },
}

impl FreshRefusal {
    /// The bounded label of `gateway_limit_rejections_total`.
    pub fn label(self) -> &'static str {
        match self {
            FreshRefusal::PerRequest { .. } => "fresh_channels_per_request",
            FreshRefusal::PerSecond { .. } => "fresh_channels_per_second",
        }
    }

    /// The error a client sees: `too_many_fresh_channels`, naming the limit.
    pub fn error(self) -> crate::protocol::ErrorBody {
        let message = match self {
            FreshRefusal::PerRequest { max } => format!(
                "a request may subscribe at most {max} channels this node holds no subscription \
                 for (limits.fresh_channels_per_request)"
            ),
            FreshRefusal::PerSecond { rate, .. } => format!(
                "too many subscriptions to channels this node holds no subscription for from \
                 this address, at most {rate} a second (limits.fresh_channels_per_second)"
            ),
        };
        crate::protocol::ErrorBody::new(error_code::TOO_MANY_FRESH_CHANNELS, message)
    }

    /// When to retry, for `Retry-After`.
    pub fn retry_after(self) -> Duration {
        match self {
            FreshRefusal::PerRequest { .. } => Duration::from_secs(1),
            FreshRefusal::PerSecond { retry, .. } => retry,
        }
    }
}

/// Connection counts and per-IP buckets of one node.
pub struct Limits {
    config: LimitsConfig,
    connections: Arc<AtomicUsize>,
    users: Arc<Mutex<HashMap<Arc<str>, usize>>>,
    ips: Mutex<IpBuckets>,
    /// Per-IP buckets of `limits.fresh_channels_per_second` (the same bounded table).
    fresh: Mutex<IpBuckets>,
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
            fresh: Mutex::new(IpBuckets::new(MAX_TRACKED_IPS)),
        }
    }

    /// Charges `count` fresh channels of one request (or one WebSocket subscribe) from `ip`
    /// against `limits.fresh_channels_per_request` and `limits.fresh_channels_per_second`. A
    /// refused request takes nothing from the bucket. The bucket holds a second's worth, and at
    /// least one whole request's.
    pub fn take_fresh(&self, ip: IpAddr, count: usize) -> Result<(), FreshRefusal> {
        if count == 0 {
            return Ok(());
        }
        let per_request = self.config.fresh_channels_per_request;
        if per_request > 0 && count > per_request {
            return Err(FreshRefusal::PerRequest { max: per_request });
        }
        let rate = self.config.fresh_channels_per_second;
        if rate <= 0.0 {
            return Ok(());
        }
        let burst = (rate.ceil() as usize)
            .max(per_request)
            .min(u32::MAX as usize) as u32;
        self.fresh
            .lock()
            .bucket(IpKey::of(ip), || TokenBucket::new(rate, burst))
            .take_many(count as f64)
            .map_err(|retry| FreshRefusal::PerSecond { rate, retry })
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
    fn fresh_channels_are_limited_per_request_and_per_second_per_ip() {
        let limits = Limits::new(&LimitsConfig {
            fresh_channels_per_request: 4,
            fresh_channels_per_second: 6.0,
            ..LimitsConfig::default()
        });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(
            limits.take_fresh(a, 5),
            Err(FreshRefusal::PerRequest { max: 4 })
        );
        // The refused request took nothing: a whole second's worth is still there.
        limits.take_fresh(a, 4).unwrap();
        limits.take_fresh(a, 2).unwrap();
        let refusal = limits.take_fresh(a, 1).unwrap_err();
        assert_eq!(refusal.label(), "fresh_channels_per_second");
        assert!(refusal.retry_after() > Duration::ZERO);
        assert_eq!(refusal.error().code, error_code::TOO_MANY_FRESH_CHANNELS);
        // Another address has its own bucket; nothing fresh costs nothing.
        limits.take_fresh(b, 4).unwrap();
        limits.take_fresh(a, 0).unwrap();
        // Zero turns both limits off.
        let off = Limits::new(&LimitsConfig {
            fresh_channels_per_request: 0,
            fresh_channels_per_second: 0.0,
            ..LimitsConfig::default()
        });
        off.take_fresh(a, 100_000).unwrap();
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
