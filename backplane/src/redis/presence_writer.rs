//! The single writer of a node's presence: applies the node's joins and leaves at Redis in the
//! order they were made, and re-asserts the node's members periodically. One task owns it, so a
//! change, a retry and a refresh can never overtake each other.
//!
//! - Whatever is queued when the writer wakes becomes one batch: per channel, one script call
//!   (`presence_apply.lua`) per 1,000 changes, in order; all channels in one pipeline on a single
//!   server, concurrently on a cluster.
//! - Before a channel's first member is written, the channel goes into the node's channel set
//!   (the list a survivor reaps after a crash); after its last member left, it comes out.
//! - A channel whose changes failed keeps them queued, in order and ahead of later ones, and
//!   retries every second; a flush waiting on them is answered with the error.
//! - The refresh re-writes every member the node holds (as applied), per channel and 1,000
//!   members one script call, never announcing; channels with changes still queued wait for
//!   them instead.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};

use super::presence::{Change, APPLY};
use super::Shared;
use crate::BackplaneError;

/// Changes (or refreshed members) per script call.
const CHANGES_PER_CALL: usize = 1000;
/// Channels per SADD or SREM of the node's channel set.
const CHANNELS_PER_COMMAND: usize = 1000;
/// How soon changes that failed are sent again.
const RETRY: Duration = Duration::from_secs(1);

pub(crate) struct Writer {
    shared: Arc<Shared>,
    changes: mpsc::UnboundedReceiver<Change>,
    /// The node's members as applied at Redis: channel → client id → stored member.
    applied: HashMap<Arc<str>, HashMap<String, Vec<u8>>>,
    /// Channels in the node's channel set at Redis.
    listed: HashSet<Arc<str>>,
    /// Changes not applied yet, in order: those received, then those of channels that failed.
    queue: Vec<Change>,
    /// Expiry of the presence keys (ms), refreshed by every write.
    expiry_ms: u64,
}

/// One change of a channel, as the apply script takes it.
enum Op {
    Join { client: String, value: Vec<u8> },
    Leave { client: String, announce: bool },
}

impl Writer {
    pub(crate) fn new(shared: Arc<Shared>, changes: mpsc::UnboundedReceiver<Change>) -> Self {
        let expiry_ms = super::millis(shared.settings.presence_ttl * 3);
        Writer {
            shared,
            changes,
            applied: HashMap::new(),
            listed: HashSet::new(),
            queue: Vec::new(),
            expiry_ms,
        }
    }

    pub(crate) async fn run(mut self) {
        let every = (self.shared.settings.presence_ttl / 3).max(Duration::from_millis(10));
        let mut refresh = tokio::time::interval_at(Instant::now() + every, every);
        refresh.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut retry = tokio::time::interval(RETRY);
        retry.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                change = self.changes.recv() => {
                    let Some(change) = change else {
                        // The backplane is gone: apply what it left, once.
                        if !self.queue.is_empty() {
                            self.apply().await;
                        }
                        return;
                    };
                    self.queue.push(change);
                    while let Ok(change) = self.changes.try_recv() {
                        self.queue.push(change);
                    }
                    self.apply().await;
                }
                _ = refresh.tick() => self.refresh().await,
                _ = retry.tick(), if !self.queue.is_empty() => self.apply().await,
            }
        }
    }

    /// Applies the queue as one batch.
    async fn apply(&mut self) {
        let mut order: Vec<Arc<str>> = Vec::new();
        let mut by_channel: HashMap<Arc<str>, Vec<Op>> = HashMap::new();
        let mut flushes = Vec::new();
        for change in std::mem::take(&mut self.queue) {
            let (channel, op) = match change {
                Change::Flush(answer) => {
                    flushes.push(answer);
                    continue;
                }
                Change::Join {
                    channel,
                    client,
                    value,
                } => (channel, Op::Join { client, value }),
                Change::Leave {
                    channel,
                    client,
                    announce,
                } => (channel, Op::Leave { client, announce }),
            };
            by_channel
                .entry(channel.clone())
                .or_insert_with(|| {
                    order.push(channel);
                    Vec::new()
                })
                .push(op);
        }
        let mut error = None;
        // Listed before their members are written: a survivor reaps only listed channels.
        let unlisted: Vec<Arc<str>> = order
            .iter()
            .filter(|c| !self.listed.contains(*c))
            .filter(|c| {
                by_channel[*c]
                    .iter()
                    .any(|op| matches!(op, Op::Join { .. }))
            })
            .cloned()
            .collect();
        if let Err(e) = self.list(&unlisted).await {
            error = Some(e);
        } else {
            let groups = order
                .iter()
                .map(|channel| self.apply_commands(channel, &by_channel[channel]))
                .collect();
            let results = self.shared.commands.run_groups::<u64>(groups, &APPLY).await;
            let mut emptied = Vec::new();
            for (channel, result) in order.iter().zip(results) {
                let ops = by_channel.remove(channel).expect("grouped");
                match result {
                    Ok(_) => {
                        self.record(channel, ops);
                        if !self.applied.contains_key(channel) && self.listed.contains(channel) {
                            emptied.push(channel.clone());
                        }
                    }
                    Err(e) => {
                        self.requeue(channel, ops);
                        error = Some(e);
                    }
                }
            }
            if let Err(e) = self.unlist(&emptied).await {
                // They stay listed: reaping an empty channel is harmless.
                tracing::debug!(error = %e, "presence: unlisting emptied channels failed");
            }
        }
        // Whatever was not applied stays queued, in order, ahead of later changes.
        for channel in order {
            if let Some(ops) = by_channel.remove(&channel) {
                self.requeue(&channel, ops);
            }
        }
        match error {
            None => flushes.into_iter().for_each(|f| {
                let _ = f.send(Ok(()));
            }),
            Some(e) => {
                self.shared.health.count_error();
                tracing::warn!(error = %e, "presence changes not applied; retrying");
                let message = format!("presence changes not applied yet (retrying): {e}");
                for f in flushes {
                    let _ = f.send(Err(BackplaneError::Unavailable(message.clone())));
                }
            }
        }
    }

    fn requeue(&mut self, channel: &Arc<str>, ops: Vec<Op>) {
        self.queue.extend(ops.into_iter().map(|op| match op {
            Op::Join { client, value } => Change::Join {
                channel: channel.clone(),
                client,
                value,
            },
            Op::Leave { client, announce } => Change::Leave {
                channel: channel.clone(),
                client,
                announce,
            },
        }));
    }

    /// Records applied changes.
    fn record(&mut self, channel: &Arc<str>, ops: Vec<Op>) {
        let members = self.applied.entry(channel.clone()).or_default();
        for op in ops {
            match op {
                Op::Join { client, value } => {
                    members.insert(client, value);
                }
                Op::Leave { client, .. } => {
                    members.remove(&client);
                }
            }
        }
        if members.is_empty() {
            self.applied.remove(channel);
        }
    }

    /// Re-writes every member the node holds, without announcing.
    async fn refresh(&mut self) {
        let waiting: HashSet<&str> = self
            .queue
            .iter()
            .filter_map(|change| match change {
                Change::Join { channel, .. } | Change::Leave { channel, .. } => Some(&**channel),
                Change::Flush(_) => None,
            })
            .collect();
        let channels: Vec<Arc<str>> = self
            .applied
            .keys()
            .filter(|c| !waiting.contains(&***c))
            .cloned()
            .collect();
        if channels.is_empty() {
            return;
        }
        // Listed again: a survivor that took this node for dead dropped its channel set.
        if let Err(e) = self.list(&channels).await {
            self.shared.health.count_error();
            tracing::warn!(error = %e, "presence refresh failed");
            return;
        }
        let groups = channels
            .iter()
            .map(|channel| {
                let members = &self.applied[channel];
                let ops: Vec<(&str, &[u8])> = members
                    .iter()
                    .map(|(client, value)| (client.as_str(), &value[..]))
                    .collect();
                ops.chunks(CHANGES_PER_CALL)
                    .map(|chunk| {
                        let mut command = self.apply_command(channel);
                        for (client, value) in chunk {
                            command.arg("r").arg(*client).arg(*value);
                        }
                        command
                    })
                    .collect()
            })
            .collect();
        let results = self.shared.commands.run_groups::<u64>(groups, &APPLY).await;
        if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
            self.shared.health.count_error();
            tracing::warn!(error = %e, "presence refresh failed for some channels");
        }
    }

    /// The apply script's calls for one channel's changes, in order.
    fn apply_commands(&self, channel: &str, ops: &[Op]) -> Vec<redis::Cmd> {
        ops.chunks(CHANGES_PER_CALL)
            .map(|chunk| {
                let mut command = self.apply_command(channel);
                for op in chunk {
                    match op {
                        Op::Join { client, value } => command.arg("j").arg(client).arg(&value[..]),
                        Op::Leave { client, announce } => command
                            .arg("l")
                            .arg(client)
                            .arg(if *announce { "1" } else { "0" }),
                    };
                }
                command
            })
            .collect()
    }

    /// `EVALSHA` of the apply script with its keys and fixed arguments; the changes follow.
    fn apply_command(&self, channel: &str) -> redis::Cmd {
        let shared = &*self.shared;
        let keys = &shared.keys;
        let mut command = redis::cmd("EVALSHA");
        command
            .arg(APPLY.get_hash())
            .arg(4)
            .arg(keys.presence_members(channel, &shared.node_id))
            .arg(keys.presence_nodes(channel))
            .arg(keys.meta(channel))
            .arg(keys.presence_users(channel, &shared.node_id))
            .arg(&shared.node_id)
            .arg(keys.pubsub(channel))
            .arg(if shared.sharded { "1" } else { "0" })
            .arg(channel)
            .arg(self.expiry_ms);
        command
    }

    /// Adds channels to the node's channel set.
    async fn list(&mut self, channels: &[Arc<str>]) -> Result<(), BackplaneError> {
        let key = self.shared.keys.node_channels(&self.shared.node_id);
        for chunk in channels.chunks(CHANNELS_PER_COMMAND) {
            let mut pipe = redis::pipe();
            pipe.cmd("SADD").arg(&key);
            for channel in chunk {
                pipe.arg(&**channel);
            }
            pipe.ignore()
                .cmd("PEXPIRE")
                .arg(&key)
                .arg(self.expiry_ms)
                .ignore();
            self.shared.commands.pipeline::<()>(&pipe).await?;
            self.listed.extend(chunk.iter().cloned());
        }
        Ok(())
    }

    /// Removes channels the node no longer has members in from its channel set.
    async fn unlist(&mut self, channels: &[Arc<str>]) -> Result<(), BackplaneError> {
        let key = self.shared.keys.node_channels(&self.shared.node_id);
        for chunk in channels.chunks(CHANNELS_PER_COMMAND) {
            let mut command = redis::cmd("SREM");
            command.arg(&key);
            for channel in chunk {
                command.arg(&**channel);
            }
            self.shared.commands.query::<()>(&command).await?;
            for channel in chunk {
                self.listed.remove(channel);
            }
        }
        Ok(())
    }
}
