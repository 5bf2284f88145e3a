//! The query of a request that subscribes over plain HTTP (`GET /sse`, `GET /poll`): its channels
//! and the cursor to resume them from, read and checked the same way for both.

use std::sync::Arc;

use crate::cursor::{self, Cursor};
use crate::node::Node;
use crate::protocol::{
    check_channel, check_subscription_count, error_code, reset_reason, ErrorBody, SubscribeResult,
};
use crate::session::SubscribeOptions;

/// The channels of a stream or poll, distinct, in request order, its cursor as sent, how its
/// channels without a position start (`latest=true`) and whether it takes deltas (`delta=true`).
pub(crate) struct StreamQuery {
    pub(crate) channels: Vec<Arc<str>>,
    pub(crate) cursor: Option<String>,
    pub(crate) options: SubscribeOptions,
}

/// Reads a `true`/`false` query parameter.
fn flag(key: &str, value: &str) -> Result<bool, ErrorBody> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(ErrorBody::new(
            error_code::BAD_REQUEST,
            format!("`{key}` must be true or false, got {value:?}"),
        )),
    }
}

impl StreamQuery {
    /// Reads every `channel` (checked, duplicates dropped, at least one, at most `max_channels`
    /// parameters — a repeat counts, so the work per request stays bounded before any
    /// de-duplication) and the cursor under `cursor_key`; hands every other key to `other`.
    pub(crate) fn parse(
        query: Option<&str>,
        cursor_key: &str,
        max_channels: usize,
        mut other: impl FnMut(&str, &str) -> Result<(), ErrorBody>,
    ) -> Result<StreamQuery, ErrorBody> {
        let mut channels: Vec<Arc<str>> = Vec::new();
        let mut cursor = None;
        let mut options = SubscribeOptions::default();
        let mut given = 0;
        for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            if key == "channel" {
                given += 1;
                check_subscription_count(given, max_channels)?;
                check_channel(&value)?;
                if !channels.iter().any(|c| **c == *value) {
                    channels.push(value.as_ref().into());
                }
            } else if key == cursor_key {
                cursor = Some(value.into_owned());
            } else if key == "latest" {
                options.latest = flag(&key, &value)?;
            } else if key == "delta" {
                options.delta = flag(&key, &value)?;
            } else {
                other(&key, &value)?;
            }
        }
        if channels.is_empty() {
            return Err(ErrorBody::new(
                error_code::BAD_REQUEST,
                "at least one `channel` query parameter is required",
            ));
        }
        Ok(StreamQuery {
            channels,
            cursor,
            options,
        })
    }
}

/// The positions a cursor holds for a stream or poll over `channels`; an absent or empty cursor
/// holds none. A compact cursor must have been issued for exactly these channels, in order.
pub(crate) fn decode_cursor(
    cursor: Option<&str>,
    channels: &[Arc<str>],
) -> Result<Cursor, ErrorBody> {
    let invalid = |message: String| ErrorBody::new(error_code::INVALID_CURSOR, message);
    match cursor.filter(|c| !c.is_empty()) {
        None => Ok(Cursor::Positions(Vec::new())),
        Some(c) => match cursor::decode_any(c).map_err(invalid)? {
            Cursor::Compact(compact) if !compact.fits(channels) => Err(invalid(
                "the cursor was issued for other channels: an event id resumes the stream it \
                 came from, with the same `channel` parameters in the same order"
                    .into(),
            )),
            cursor => Ok(cursor),
        },
    }
}

/// A channel's subscribe result and where its delivery starts (offset, and the tag there when
/// known), from [`Output::Subscribed`](crate::session::Output::Subscribed).
pub(crate) type Subscribed = (SubscribeResult, (u64, Option<u32>));

/// Once every channel of a stream or poll resumed from a compact cursor is subscribed: the
/// channels whose group check does not match what the node read are not recovered after all,
/// and say so with `position_unverified` (delivery goes on after the cursor's offset, as for
/// any reset). `starts` are the subscriptions' [`Output::Subscribed`] starts, in request order.
/// Counts the outcomes in `gateway_resumes_total` (the session leaves them to this check).
///
/// [`Output::Subscribed`]: crate::session::Output::Subscribed
pub(crate) fn verify_compact(
    node: &Node,
    cursor: &Cursor,
    channels: &[Arc<str>],
    results: &mut [SubscribeResult],
    starts: &[(u64, Option<u32>)],
) {
    let Cursor::Compact(compact) = cursor else {
        return;
    };
    let recovered: Vec<_> = results
        .iter()
        .zip(starts)
        .map(|(result, start)| result.recovered.then(|| (result.epoch.clone(), start.1)))
        .collect();
    let verified = compact.verify(channels, &recovered);
    let (mut kept, mut unverified) = (0, 0);
    for (result, verified) in results.iter_mut().zip(verified) {
        match (result.recovered, verified) {
            (false, _) => {}
            (true, true) => kept += 1,
            (true, false) => {
                result.recovered = false;
                result.reason = Some(reset_reason::POSITION_UNVERIFIED);
                unverified += 1;
            }
        }
    }
    node.count_resumes(true, None, kept);
    node.count_resumes(false, Some(reset_reason::POSITION_UNVERIFIED), unverified);
}
