//! The query of a request that subscribes over plain HTTP (`GET /sse`, `GET /poll`): its channels
//! and the cursor to resume them from, read and checked the same way for both.

use std::sync::Arc;

use crate::cursor;
use crate::protocol::{check_channel, check_subscription_count, error_code, ErrorBody};

/// The channels of a stream or poll, distinct, in request order, and its cursor as sent.
pub(crate) struct StreamQuery {
    pub(crate) channels: Vec<Arc<str>>,
    pub(crate) cursor: Option<String>,
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
        Ok(StreamQuery { channels, cursor })
    }
}

/// The positions a cursor holds; an absent or empty cursor holds none.
pub(crate) fn decode_cursor(
    cursor: Option<&str>,
) -> Result<Vec<crate::cursor::CursorEntry>, ErrorBody> {
    match cursor.filter(|c| !c.is_empty()) {
        None => Ok(Vec::new()),
        Some(c) => {
            cursor::decode(c).map_err(|message| ErrorBody::new(error_code::INVALID_CURSOR, message))
        }
    }
}
