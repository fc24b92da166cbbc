//! Patches: JSON merge patch (RFC 7386), used also for strategic merge (an approximation:
//! lists are replaced, never merged by key), and server-side apply per field manager, with
//! lists of objects merged by their keys.
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

/// Server-side apply by one manager, approximated from the configuration that manager
/// applied last (its managedFields, in effect): fields and keyed list entries it set last
/// time but leaves out now are removed, then the new configuration is merged in, lists of
/// objects by their merge key (containers, env and volumes by `name`, mounts by
/// `mountPath`, ports by number) and other lists whole. What other managers set is kept.
pub fn apply(target: &mut Value, last_applied: Option<&Value>, applied: &Value) {
    if let Some(last) = last_applied {
        remove_dropped(target, last, applied);
    }
    merge_applied(target, &strip_nulls(applied));
}

/// The key a list of objects merges by, as the Kubernetes API declares for the lists the
/// operator writes; `None` for an atomic list.
pub fn merge_key(items: &[Value]) -> Option<&'static str> {
    ["mountPath", "containerPort", "port", "name"]
        .into_iter()
        .find(|key| !items.is_empty() && items.iter().all(|i| i.get(key).is_some()))
}

fn merge_applied(target: &mut Value, applied: &Value) {
    match (target, applied) {
        (Value::Object(t), Value::Object(a)) => {
            for (k, av) in a {
                match t.get_mut(k) {
                    Some(tv) => merge_applied(tv, av),
                    None => {
                        t.insert(k.clone(), av.clone());
                    }
                }
            }
        }
        (Value::Array(t), Value::Array(a)) if merge_key(a).is_some() => {
            let key = merge_key(a).expect("checked");
            for item in a {
                match t.iter_mut().find(|ti| ti.get(key) == item.get(key)) {
                    Some(existing) => merge_applied(existing, item),
                    None => t.push(item.clone()),
                }
            }
        }
        (target, applied) => *target = applied.clone(),
    }
}

fn remove_dropped(target: &mut Value, last: &Value, now: &Value) {
    match (target, last) {
        (Value::Object(t), Value::Object(last)) => {
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
        (Value::Array(t), Value::Array(last)) => {
            let Some(key) = merge_key(last) else {
                return;
            };
            let now = now.as_array().map(Vec::as_slice).unwrap_or_default();
            for item in last {
                let id = item.get(key);
                match now.iter().find(|n| n.get(key) == id) {
                    None => t.retain(|ti| ti.get(key) != id),
                    Some(n) => {
                        if let Some(ti) = t.iter_mut().find(|ti| ti.get(key) == id) {
                            remove_dropped(ti, item, n);
                        }
                    }
                }
            }
        }
        _ => {}
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
    fn keyed_lists_keep_other_managers_entries() {
        let ours = json!({"spec": {"containers": [{"name": "server", "image": "a",
            "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]}]}});
        let mut obj = ours.clone();
        // Another manager adds a sidecar and an env entry.
        apply(
            &mut obj,
            None,
            &json!({"spec": {"containers": [
            {"name": "server", "env": [{"name": "INJECTED", "value": "x"}]},
            {"name": "sidecar", "image": "s"}]}}),
        );
        // We apply again, dropping B and changing the image.
        let now = json!({"spec": {"containers": [{"name": "server", "image": "b",
            "env": [{"name": "A", "value": "1"}]}]}});
        apply(&mut obj, Some(&ours), &now);
        assert_eq!(
            obj,
            json!({"spec": {"containers": [
                {"name": "server", "image": "b", "env": [{"name": "A", "value": "1"}, {"name": "INJECTED", "value": "x"}]},
                {"name": "sidecar", "image": "s"}]}})
        );
    }

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
