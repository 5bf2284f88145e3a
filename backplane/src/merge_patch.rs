//! JSON Merge Patch (RFC 7396) between two JSON values: the patch that turns one publication's
//! `data` into the next one's, for subscribers that asked for deltas. A merge patch is plain JSON
//! that names only the members that changed, so a client applies it with a few lines of code.
//! It cannot say "set this member to null" (null removes a member) nor change part of an array:
//! such changes, and data that is not an object, have no patch and travel in full.

use serde_json::{Map, Value};

/// The merge patch that turns `old` into `new`, or `None` when no merge patch can express it
/// (either is not an object, or `new` holds a `null` that a patch would read as a removal).
pub fn diff(old: &Value, new: &Value) -> Option<Value> {
    let (Value::Object(old), Value::Object(new)) = (old, new) else {
        return None;
    };
    diff_objects(old, new).map(Value::Object)
}

fn diff_objects(old: &Map<String, Value>, new: &Map<String, Value>) -> Option<Map<String, Value>> {
    let mut patch = Map::new();
    for key in old.keys() {
        if !new.contains_key(key) {
            patch.insert(key.clone(), Value::Null);
        }
    }
    for (key, value) in new {
        match (old.get(key), value) {
            (Some(before), after) if before == after => {}
            (Some(Value::Object(before)), Value::Object(after)) => {
                patch.insert(key.clone(), Value::Object(diff_objects(before, after)?));
            }
            // Applied to a member that is not an object, an object patch replaces it with its
            // own content minus its nulls: a null anywhere inside could not come through.
            (_, after) if holds_null(after) => return None,
            (_, after) => {
                patch.insert(key.clone(), after.clone());
            }
        }
    }
    Some(patch)
}

/// Whether `value` is null or an object with a null member at any depth (arrays are replaced
/// whole, nulls and all).
fn holds_null(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Object(members) => members.values().any(holds_null),
        _ => false,
    }
}

/// Applies a merge patch to `target` (RFC 7396, section 2).
pub fn apply(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let members = target.as_object_mut().expect("made an object above");
    for (key, value) in patch {
        if value.is_null() {
            members.remove(key);
        } else {
            apply(members.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn round_trip(old: Value, new: Value) -> Option<Value> {
        let patch = diff(&old, &new)?;
        let mut patched = old.clone();
        apply(&mut patched, &patch);
        assert_eq!(patched, new, "patch {patch} of {old}");
        Some(patch)
    }

    #[test]
    fn names_only_what_changed() {
        let old = json!({"bid": 1.5, "ask": 1.6, "book": {"depth": 3, "venue": "X"}, "gone": 1});
        let new = json!({"bid": 1.5, "ask": 1.7, "book": {"depth": 3, "venue": "Y"}, "new": [1]});
        assert_eq!(
            round_trip(old, new),
            Some(json!({"ask": 1.7, "book": {"venue": "Y"}, "gone": null, "new": [1]}))
        );
        assert_eq!(
            round_trip(json!({"a": 1}), json!({"a": 1})),
            Some(json!({}))
        );
    }

    #[test]
    fn what_a_merge_patch_cannot_say_has_no_patch() {
        assert_eq!(round_trip(json!({"a": 1}), json!({"a": null})), None);
        assert_eq!(round_trip(json!({"a": 1}), json!({"a": {"b": null}})), None);
        assert_eq!(
            round_trip(json!({"a": {"b": 1}}), json!({"a": {"b": null}})),
            None
        );
        assert_eq!(round_trip(json!(1), json!(2)), None);
        assert_eq!(round_trip(json!({"a": 1}), json!([1])), None);
        assert_eq!(round_trip(json!([1]), json!({"a": 1})), None);
        // An unchanged null, or one inside an array, is fine.
        assert_eq!(
            round_trip(
                json!({"a": null, "b": 1}),
                json!({"a": null, "b": 2, "c": [null]})
            ),
            Some(json!({"b": 2, "c": [null]}))
        );
    }

    #[test]
    fn applies_the_rfc_examples() {
        // RFC 7396, appendix A (a few of them).
        let cases = [
            (json!({"a": "b"}), json!({"a": "c"}), json!({"a": "c"})),
            (
                json!({"a": "b"}),
                json!({"b": "c"}),
                json!({"a": "b", "b": "c"}),
            ),
            (json!({"a": "b"}), json!({"a": null}), json!({})),
            (
                json!({"a": [{"b": "c"}]}),
                json!({"a": [1]}),
                json!({"a": [1]}),
            ),
            (json!(["a", "b"]), json!({"a": "c"}), json!({"a": "c"})),
            (
                json!({"e": null}),
                json!({"a": 1}),
                json!({"e": null, "a": 1}),
            ),
            (
                json!({}),
                json!({"a": {"bb": {"ccc": null}}}),
                json!({"a": {"bb": {}}}),
            ),
        ];
        for (target, patch, result) in cases {
            let mut patched = target.clone();
            apply(&mut patched, &patch);
            assert_eq!(patched, result, "{target} + {patch}");
        }
    }
}
