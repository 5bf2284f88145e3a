//! The node's registry of its local connections by user, and of the users the server
//! disconnected: what the control handler acts on. A connection registers once its user is known
//! (a token at the handshake, or the WebSocket `connect`); registering and recording a disconnect
//! take the same lock, so a connection either is found and closed or finds its token refused.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use backplane::{Publication, PublicationSink};
use parking_lot::Mutex;

use crate::control::{Command, Control, CONTROL_CHANNEL};
use crate::hub::ConnId;
use crate::queue::QueueSender;

/// Local connections by user, and when each recently disconnected user was disconnected.
pub(crate) struct Registry {
    inner: Mutex<Inner>,
    /// How long a disconnect refuses the user's older tokens.
    window: Duration,
}

#[derive(Default)]
struct Inner {
    /// Most users hold one or two connections: a short list each.
    connections: HashMap<Arc<str>, Vec<(ConnId, QueueSender)>>,
    /// User → the disconnect's time (Unix seconds); entries older than the window are pruned.
    disconnected: HashMap<Arc<str>, u64>,
}

/// Seconds since the Unix epoch.
pub(crate) fn now_unix() -> u64 {
    backplane::now_us() / 1_000_000
}

impl Inner {
    /// Whether a token of `user` issued at `issued_at` (no `iat`: as if issued at 0) is refused.
    fn refuses(&self, user: &str, issued_at: Option<u64>, window: Duration, now: u64) -> bool {
        self.disconnected.get(user).is_some_and(|&at| {
            now.saturating_sub(at) < window.as_secs() && issued_at.unwrap_or(0) <= at
        })
    }
}

impl Registry {
    pub(crate) fn new(window: Duration) -> Registry {
        Registry {
            inner: Mutex::new(Inner::default()),
            window,
        }
    }

    /// Whether a token of `user` issued (`iat`) at `issued_at` must be refused: the user was
    /// disconnected within the window, in or after the second the token was issued.
    pub(crate) fn refuses(&self, user: &str, issued_at: Option<u64>) -> bool {
        self.inner
            .lock()
            .refuses(user, issued_at, self.window, now_unix())
    }

    /// Registers a connection of `user` whose token was issued at `issued_at`; `false` (and
    /// nothing registered) when that token is refused ([`Registry::refuses`]).
    pub(crate) fn register(
        &self,
        user: &Arc<str>,
        issued_at: Option<u64>,
        conn: ConnId,
        queue: QueueSender,
    ) -> bool {
        let mut inner = self.inner.lock();
        if inner.refuses(user, issued_at, self.window, now_unix()) {
            return false;
        }
        let list = inner.connections.entry(user.clone()).or_default();
        list.retain(|(c, _)| *c != conn);
        list.push((conn, queue));
        true
    }

    /// Forgets a connection of `user` (it ended, or its user changed).
    pub(crate) fn unregister(&self, user: &str, conn: ConnId) {
        let mut inner = self.inner.lock();
        if let Some(list) = inner.connections.get_mut(user) {
            list.retain(|(c, _)| *c != conn);
            if list.is_empty() {
                inner.connections.remove(user);
            }
        }
    }

    /// How many local connections `user` has registered.
    #[cfg(test)]
    fn connections_of(&self, user: &str) -> usize {
        self.inner.lock().connections.get(user).map_or(0, Vec::len)
    }

    /// Applies one control command: records a disconnect and closes the user's connections, or
    /// makes them leave a channel.
    pub(crate) fn apply(&self, command: Command) {
        match command {
            Command::Disconnect { user, at } => {
                let now = now_unix();
                let window = self.window.as_secs();
                let mut inner = self.inner.lock();
                inner
                    .disconnected
                    .retain(|_, at| now.saturating_sub(*at) < window);
                if now.saturating_sub(at) < window {
                    let recorded = inner.disconnected.entry(user.as_str().into()).or_insert(at);
                    *recorded = (*recorded).max(at);
                }
                // Removed: a connection is closed once, and no longer counts as the user's.
                for (_, queue) in inner.connections.remove(user.as_str()).unwrap_or_default() {
                    queue.control(Control::Disconnect);
                }
            }
            Command::Unsubscribe { user, channel } => {
                let channel: Arc<str> = channel.into();
                let inner = self.inner.lock();
                for (_, queue) in inner.connections.get(user.as_str()).into_iter().flatten() {
                    queue.control(Control::Unsubscribe(channel.clone()));
                }
            }
        }
    }
}

/// The hub hands every publication of [`CONTROL_CHANNEL`] here (live, gap-filled, or read back
/// at start).
impl PublicationSink for Registry {
    fn deliver(&self, publication: Arc<Publication>) {
        if !publication.is_publication() || &*publication.channel != CONTROL_CHANNEL {
            return;
        }
        match serde_json::from_slice::<Command>(publication.data()) {
            Ok(command) => self.apply(command),
            // A newer node's command this one does not know: skip it, keep serving.
            Err(e) => {
                tracing::warn!(error = %e, offset = publication.offset, "unknown control command")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::outbound;

    #[test]
    fn a_disconnect_closes_the_users_connections_and_refuses_older_tokens() {
        let registry = Registry::new(Duration::from_secs(60));
        let (user, other): (Arc<str>, Arc<str>) = ("u".into(), "v".into());
        let (tx1, mut rx1) = outbound(1 << 20);
        let (tx2, mut rx2) = outbound(1 << 20);
        assert!(registry.register(&user, Some(1), 1, tx1));
        assert!(registry.register(&other, Some(1), 2, tx2));
        let now = now_unix();
        registry.apply(Command::Disconnect {
            user: "u".into(),
            at: now,
        });
        assert_eq!(rx1.try_control(), Some(Control::Disconnect));
        assert_eq!(rx2.try_control(), None, "another user is untouched");
        assert_eq!(registry.connections_of("u"), 0);
        assert_eq!(registry.connections_of("v"), 1);
        assert!(
            registry.refuses("u", Some(now)),
            "issued in the same second"
        );
        assert!(registry.refuses("u", None), "no iat");
        assert!(
            !registry.refuses("u", Some(now + 1)),
            "a token issued later"
        );
        assert!(!registry.refuses("v", Some(0)));
        let (tx3, _rx3) = outbound(1 << 20);
        assert!(!registry.register(&user, Some(now), 3, tx3));
    }

    #[test]
    fn a_disconnect_older_than_the_window_refuses_nothing() {
        let registry = Registry::new(Duration::from_secs(60));
        registry.apply(Command::Disconnect {
            user: "u".into(),
            at: now_unix() - 120,
        });
        assert!(!registry.refuses("u", Some(0)));
    }

    #[test]
    fn an_unsubscribe_reaches_every_connection_of_the_user() {
        let registry = Registry::new(Duration::from_secs(60));
        let user: Arc<str> = "u".into();
        let (tx1, mut rx1) = outbound(1 << 20);
        let (tx2, mut rx2) = outbound(1 << 20);
        assert!(registry.register(&user, None, 1, tx1));
        assert!(registry.register(&user, None, 2, tx2));
        registry.unregister("u", 2);
        registry.apply(Command::Unsubscribe {
            user: "u".into(),
            channel: "c".into(),
        });
        assert_eq!(rx1.try_control(), Some(Control::Unsubscribe("c".into())));
        assert_eq!(rx2.try_control(), None, "unregistered");
    }
}
