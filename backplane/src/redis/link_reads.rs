//! The Redis reads the pub/sub link runs off its loop: the batched position read after a
//! SUBSCRIBE (`positions.lua`), history pages with each entry's publish time and tag (to
//! recognise the delivered publication after Redis came back), and the epoch rotation (`rotate.lua`).

use std::sync::{Arc, LazyLock};

use redis::Script;

use super::channel_state::{Delivered, Page};
use super::Shared;
use crate::{format_tag, new_epoch, parse_tag, BackplaneError};

static POSITIONS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("trim.lua"),
        include_str!("positions.lua")
    ))
});
static ROTATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("trim.lua"),
        include_str!("rotate.lua")
    ))
});

/// Channels per position script call (single server).
const POSITIONS_BATCH: usize = 256;

/// The position of each channel (epoch, top and the top entry's publish time), in order. One
/// script call per batch on a single server; on a cluster the channels live in different slots,
/// so one call each, run concurrently.
pub(crate) async fn positions(
    shared: &Shared,
    channels: &[Arc<str>],
) -> Result<Vec<Delivered>, BackplaneError> {
    let mut out = Vec::with_capacity(channels.len());
    if shared.sharded {
        let reads = channels
            .iter()
            .map(|c| positions_of(shared, std::slice::from_ref(c)));
        for result in futures_util::future::join_all(reads).await {
            out.extend(result?);
        }
    } else {
        for batch in channels.chunks(POSITIONS_BATCH) {
            out.extend(positions_of(shared, batch).await?);
        }
    }
    Ok(out)
}

async fn positions_of(
    shared: &Shared,
    channels: &[Arc<str>],
) -> Result<Vec<Delivered>, BackplaneError> {
    let mut invocation = POSITIONS.prepare_invoke();
    for channel in channels {
        invocation
            .key(shared.keys.meta(channel))
            .key(shared.keys.history(channel));
    }
    let rows: Vec<(Option<String>, u64, u64, String)> = shared.commands.run(&invocation).await?;
    if rows.len() != channels.len() {
        return Err(BackplaneError::Unavailable(format!(
            "position read returned {} rows for {} channels",
            rows.len(),
            channels.len()
        )));
    }
    Ok(rows
        .into_iter()
        .map(|(epoch, offset, published_ms, tag)| Delivered {
            epoch: epoch.map(Arc::from),
            offset,
            published_ms,
            tag: parse_tag(&tag).unwrap_or(0),
        })
        .collect())
}

/// Up to `limit` history entries after `since`, with the channel's epoch and top, read at one
/// instant (the same script as client history reads).
pub(crate) async fn page(
    shared: &Shared,
    channel: &Arc<str>,
    since: u64,
    limit: usize,
) -> Result<Page, BackplaneError> {
    let page = super::read_history(shared, channel, since, limit).await?;
    Ok(Page {
        epoch: page.epoch,
        top: page.top,
        entries: page.entries,
    })
}

/// Rotates the channel's epoch if it is still `seen.epoch` and the loss still shows
/// (`rotate.lua`). Returns the channel's epoch now (`None` if it has none) and whether this call
/// rotated it.
pub(crate) async fn rotate(
    shared: &Shared,
    channel: &str,
    seen: &Delivered,
) -> Result<(Option<Arc<str>>, bool), BackplaneError> {
    let Some(epoch) = &seen.epoch else {
        return Ok((None, false));
    };
    let mut invocation = ROTATE.key(shared.keys.meta(channel));
    invocation
        .key(shared.keys.history(channel))
        .arg(&**epoch)
        .arg(seen.offset)
        .arg(seen.published_ms)
        .arg(&*new_epoch())
        .arg(if seen.tag == 0 {
            String::new()
        } else {
            format_tag(seen.tag)
        });
    let (rotated, now): (u8, String) = shared.commands.run(&invocation).await?;
    Ok(((!now.is_empty()).then(|| now.into()), rotated == 1))
}
