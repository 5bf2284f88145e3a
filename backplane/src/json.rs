//! Compact JSON text: publications are stored and sent without insignificant whitespace so that
//! their one serialised form can be framed by every transport (an SSE `data:` line must not
//! contain a newline).

use bytes::Bytes;

/// Removes whitespace outside strings from `valid_json`, which the caller has already parsed
/// (for example as a `serde_json::value::RawValue`); the text is otherwise kept byte for byte.
pub fn compact(valid_json: &str) -> Bytes {
    let src = valid_json.as_bytes();
    let mut out = Vec::with_capacity(src.len());
    let mut in_string = false;
    let mut escaped = false;
    for &b in src {
        if in_string {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if !matches!(b, b' ' | b'\n' | b'\r' | b'\t') {
            if b == b'"' {
                in_string = true;
            }
            out.push(b);
        }
    }
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::compact;

    #[test]
    fn strips_whitespace_outside_strings_only() {
        let text = "{ \"a b\" : [1, 2,\n 3],\t\"q\": \"x \\\" y\\\\\" , \"n\": null }";
        assert_eq!(
            &compact(text)[..],
            b"{\"a b\":[1,2,3],\"q\":\"x \\\" y\\\\\",\"n\":null}"
        );
        let round: serde_json::Value = serde_json::from_slice(&compact(text)).unwrap();
        assert_eq!(
            round,
            serde_json::from_str::<serde_json::Value>(text).unwrap()
        );
    }

    #[test]
    fn scalars_pass_through() {
        assert_eq!(&compact(" 42 ")[..], b"42");
        assert_eq!(&compact("\"  \"")[..], b"\"  \"");
    }
}
