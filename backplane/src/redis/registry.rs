//! The node registry: each node's heartbeat, the reaping of dead nodes' presence, and the
//! channel reports the cluster-wide channel list sums.
//!
//! - Every `presence_ttl / 6` a node stamps itself in the registry (`registry.lua`, on Redis'
//!   clock) and renews the expiry of its channel report. A node whose stamp is older than
//!   `presence_ttl / 2` is dead.
//! - A node reaps only once its own heartbeats have succeeded for `presence_ttl / 2` in a row:
//!   after an outage of Redis (or a failover) every node's stamp is old, and each must get the
//!   chance to stamp itself again before anyone is taken for dead.
//! - Reaping a node runs `presence_reap.lua` for every channel in its channel set, then drops its
//!   channel set, its report and its registry entry, in that order, so a reaper that fails half
//!   way leaves the rest to the next one. Several reapers at once announce each leave once.
//! - A report replaces the node's previous one at once: written under a temporary key in the
//!   same slot, then renamed over it.

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use redis::Script;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use super::presence::REAP;
use super::{millis, Shared};
use crate::{BackplaneError, ChannelCount};

static REGISTRY: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("registry.lua")));

/// Report entries per HSET.
const REPORT_CHUNK: usize = 1000;

/// How often a node heartbeats.
pub(crate) fn heartbeat_period(shared: &Shared) -> Duration {
    (shared.settings.presence_ttl / 6).max(Duration::from_millis(10))
}

/// Silence after which a node is dead.
fn dead_after(shared: &Shared) -> Duration {
    shared.settings.presence_ttl / 2
}

/// (live, dead) nodes; stamps this node first when `beat`.
async fn nodes(shared: &Shared, beat: bool) -> Result<(Vec<String>, Vec<String>), BackplaneError> {
    let mut invocation = REGISTRY.key(shared.keys.registry());
    invocation
        .arg(if beat { shared.node_id.as_str() } else { "" })
        .arg(millis(dead_after(shared)));
    shared.commands.run(&invocation).await
}

/// Stamps this node and renews its report's expiry; returns the dead nodes.
pub(crate) async fn beat(shared: &Shared) -> Result<Vec<String>, BackplaneError> {
    let (_, dead) = nodes(shared, true).await?;
    let mut expire = redis::cmd("PEXPIRE");
    expire
        .arg(shared.keys.node_report(&shared.node_id))
        .arg(millis(shared.settings.presence_ttl));
    shared.commands.query::<()>(&expire).await?;
    Ok(dead)
}

/// Heartbeats until aborted, reaping dead nodes off the beat (a long reap must not delay it).
pub(crate) async fn run(shared: Arc<Shared>) {
    let every = heartbeat_period(&shared);
    let mut ticker = tokio::time::interval_at(Instant::now() + every, every);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // The first beat ran before the task started.
    let mut beating_since = Some(Instant::now());
    let mut reaping: Option<JoinHandle<()>> = None;
    loop {
        ticker.tick().await;
        let dead = match beat(&shared).await {
            Ok(dead) => dead,
            Err(e) => {
                shared.health.count_error();
                tracing::warn!(error = %e, "presence heartbeat failed");
                beating_since = None;
                continue;
            }
        };
        let since = *beating_since.get_or_insert_with(Instant::now);
        let dead: Vec<String> = dead.into_iter().filter(|n| *n != shared.node_id).collect();
        if dead.is_empty()
            || since.elapsed() < dead_after(&shared)
            || reaping.as_ref().is_some_and(|r| !r.is_finished())
        {
            continue;
        }
        let shared = shared.clone();
        reaping = Some(tokio::spawn(async move {
            for node in dead {
                match reap(&shared, &node).await {
                    Ok(members) => {
                        shared
                            .health
                            .presence_reaped
                            .fetch_add(members, std::sync::atomic::Ordering::Relaxed);
                        tracing::info!(node, members, "reaped the presence of a dead node")
                    }
                    Err(e) => {
                        shared.health.count_error();
                        tracing::warn!(node, error = %e, "reaping a dead node failed; retrying");
                    }
                }
            }
        }));
    }
}

/// Removes every member of the dead `node`, announcing their leaves, then forgets the node.
/// Returns how many members were removed.
pub(crate) async fn reap(shared: &Shared, node: &str) -> Result<u64, BackplaneError> {
    let keys = &shared.keys;
    let channels_key = keys.node_channels(node);
    let mut members = redis::cmd("SMEMBERS");
    members.arg(&channels_key);
    let channels: Vec<String> = shared.commands.query(&members).await?;
    let groups = channels
        .iter()
        .map(|channel| {
            let mut command = redis::cmd("EVALSHA");
            command
                .arg(REAP.get_hash())
                .arg(4)
                .arg(keys.presence_members(channel, node))
                .arg(keys.presence_nodes(channel))
                .arg(keys.meta(channel))
                .arg(keys.presence_users(channel, node))
                .arg(node)
                .arg(keys.pubsub(channel))
                .arg(if shared.sharded { "1" } else { "0" })
                .arg(channel);
            vec![command]
        })
        .collect();
    let mut removed = 0;
    for result in shared.commands.run_groups::<u64>(groups, &REAP).await {
        removed += result?.into_iter().sum::<u64>();
    }
    let mut forget = redis::pipe();
    forget
        .del(&channels_key)
        .ignore()
        .del(keys.node_report(node))
        .ignore();
    shared.commands.pipeline::<()>(&forget).await?;
    let mut unregister = redis::cmd("ZREM");
    unregister.arg(keys.registry()).arg(node);
    shared.commands.query::<()>(&unregister).await?;
    Ok(removed)
}

/// Replaces this node's channel report.
pub(crate) async fn report(shared: &Shared, counts: &[ChannelCount]) -> Result<(), BackplaneError> {
    let key = shared.keys.node_report(&shared.node_id);
    let ttl = millis(shared.settings.presence_ttl);
    let mut pipe = redis::pipe();
    if counts.is_empty() {
        pipe.del(&key).ignore();
    } else {
        // Same hash tag as the report, so the rename stays in its slot.
        let staging = format!("{key}:w{:016x}", rand::random::<u64>());
        for chunk in counts.chunks(REPORT_CHUNK) {
            pipe.cmd("HSET").arg(&staging);
            for count in chunk {
                pipe.arg(&count.channel).arg(count.subscribers);
            }
            pipe.ignore();
        }
        // Should the pipeline stop half way, the staging key does not stay.
        pipe.cmd("PEXPIRE").arg(&staging).arg(ttl).ignore();
        pipe.cmd("RENAME")
            .arg(&staging)
            .arg(&key)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(ttl)
            .ignore();
    }
    shared.commands.pipeline::<()>(&pipe).await
}

/// The channels starting with `prefix` in the reports of the live nodes, with summed counts,
/// sorted by name.
pub(crate) async fn channels(
    shared: &Shared,
    prefix: &str,
) -> Result<Vec<ChannelCount>, BackplaneError> {
    let (live, _) = nodes(shared, false).await?;
    let reads = live.iter().map(|node| async move {
        let mut read = redis::cmd("HGETALL");
        read.arg(shared.keys.node_report(node));
        shared.commands.query::<Vec<(String, u64)>>(&read).await
    });
    let mut sums: BTreeMap<String, u64> = BTreeMap::new();
    for report in futures_util::future::join_all(reads).await {
        for (channel, subscribers) in report? {
            if subscribers > 0 && channel.starts_with(prefix) {
                *sums.entry(channel).or_default() += subscribers;
            }
        }
    }
    Ok(sums
        .into_iter()
        .map(|(channel, subscribers)| ChannelCount {
            channel,
            subscribers,
        })
        .collect())
}
