//! Runs the pub/sub link's SUBSCRIBE and UNSUBSCRIBE commands on its connection, off the link's
//! loop and one after another in the order the link asked for them, so an unsubscribe and a later
//! subscribe of the same channel reach Redis in that order. Subscribes queued behind each other
//! become one command; the position reads that follow a subscribe run beside later commands.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::connection::Connection;
use super::link::Completion;
use super::link_reads;
use super::Shared;

/// Most channels merged into one subscribe batch.
const BATCH_MAX: usize = 1024;

/// A change of the link's subscriptions at Redis.
pub(crate) enum Change {
    /// Subscribes `(channel, pub/sub name, incarnation)`s, then reads their positions; the result
    /// goes back as [`Completion::Subscribed`].
    Subscribe(Vec<(Arc<str>, String, u64)>),
    /// Subscribes again pub/sub names Redis dropped or may have dropped; Redis' confirmation
    /// makes the link re-read those channels from history.
    Resubscribe(Vec<String>),
    Unsubscribe(Vec<String>),
}

pub(crate) async fn run(
    mut connection: Connection,
    shared: Arc<Shared>,
    timeout: Duration,
    mut changes: mpsc::UnboundedReceiver<Change>,
    completions: mpsc::UnboundedSender<Completion>,
) {
    let mut next = changes.recv().await;
    while let Some(change) = next.take() {
        match change {
            Change::Subscribe(mut batch) => {
                while batch.len() < BATCH_MAX {
                    match changes.try_recv() {
                        Ok(Change::Subscribe(more)) => batch.extend(more),
                        Ok(other) => {
                            next = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let names: Vec<String> = batch.iter().map(|(_, name, _)| name.clone()).collect();
                let subscribed = connection.subscribe(&names, timeout).await;
                let (shared, completions) = (shared.clone(), completions.clone());
                tokio::spawn(async move {
                    let result = match subscribed {
                        Ok(()) => {
                            let channels: Vec<Arc<str>> =
                                batch.iter().map(|(c, _, _)| c.clone()).collect();
                            link_reads::positions(&shared, &channels).await
                        }
                        Err(e) => Err(e),
                    };
                    let _ = completions.send(Completion::Subscribed { batch, result });
                });
            }
            Change::Resubscribe(names) => {
                if let Err(e) = connection.subscribe(&names, timeout).await {
                    tracing::debug!(error = %e, "resubscribe failed; retried on the next tick");
                    let _ = completions.send(Completion::ResubscribeFailed(names));
                }
            }
            Change::Unsubscribe(names) => {
                if let Err(e) = connection.unsubscribe(&names, timeout).await {
                    tracing::debug!(error = %e, "unsubscribe failed; retried on the next tick");
                    let _ = completions.send(Completion::UnsubscribeFailed(names));
                }
            }
        }
        if next.is_none() {
            next = changes.recv().await;
        }
    }
}
