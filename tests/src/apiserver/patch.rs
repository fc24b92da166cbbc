//! Patches: JSON merge patch (RFC 7386), used also for strategic merge (an approximation:
//! lists are replaced, never merged by key), and server-side apply for one field manager.
use serde_json::{Map, Value};

/// RFC 7386: objects merge, `null` deletes, anything else replaces.
pub fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let target = target.as_object_mut().expect("an object");
    for (k, v) in patch {
        if v.is_null() {
            target.remove(k);
        } else {
            merge(target.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// Server-side apply by one manager, approximated without managedFields: fields this
/// manager set last time but leaves out now are removed, then the new configuration is
/// merged in (lists atomic). Fields set by others are kept, as they would be.
pub fn apply(target: &mut Value, last_applied: Option<&Value>, applied: &Value) {
    if let Some(last) = last_applied {
        remove_dropped(target, last, applied);
    }
    merge(target, &strip_nulls(applied));
}

fn remove_dropped(target: &mut Value, last: &Value, now: &Value) {
    let (Value::Object(t), Value::Object(last)) = (target, last) else {
        return;
    };
    for (k, lv) in last {
        match now.get(k) {
            None => {
                t.remove(k);
            }
            Some(nv) => {
                if let Some(tv) = t.get_mut(k) {
                    remove_dropped(tv, lv, nv);
                }
            }
        }
    }
}

/// An applied configuration's nulls mean "not set", not "delete".
fn strip_nulls(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), strip_nulls(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn apply_removes_what_the_manager_stopped_setting_and_keeps_others_fields() {
        let mut obj = json!({"metadata": {"annotations": {"a": "1", "b": "2", "theirs": "x"}}, "spec": {"replicas": 2}});
        let last =
            json!({"metadata": {"annotations": {"a": "1", "b": "2"}}, "spec": {"replicas": 2}});
        let now = json!({"metadata": {"annotations": {"a": "1"}}, "spec": {"replicas": 3}});
        apply(&mut obj, Some(&last), &now);
        assert_eq!(
            obj,
            json!({"metadata": {"annotations": {"a": "1", "theirs": "x"}}, "spec": {"replicas": 3}})
        );
    }
}
