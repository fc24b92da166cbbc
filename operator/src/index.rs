//! Pod names by (namespace, `app.kubernetes.io/instance`), kept current by the pod watch,
//! so a reconcile finds its own pods without scanning every pod the operator caches.
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::runtime::watcher::Event;
use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

type Key = (String, String);

#[derive(Default)]
pub struct PodIndex {
    live: Mutex<HashMap<Key, BTreeSet<String>>>,
    /// Filled during a (re-)list, then swapped in whole: pods gone meanwhile drop out.
    listing: Mutex<HashMap<Key, BTreeSet<String>>>,
}

fn key(pod: &Pod) -> Option<(Key, String)> {
    let instance = pod.labels().get("app.kubernetes.io/instance")?.clone();
    Some(((pod.namespace()?, instance), pod.name_any()))
}

impl PodIndex {
    /// Follows one watch event, in the order the reflector store saw it.
    pub fn observe(&self, event: &Event<Pod>) {
        match event {
            Event::Init => self.listing.lock().expect("not poisoned").clear(),
            Event::InitApply(pod) => {
                if let Some((k, name)) = key(pod) {
                    self.listing
                        .lock()
                        .expect("not poisoned")
                        .entry(k)
                        .or_default()
                        .insert(name);
                }
            }
            Event::InitDone => {
                let listed = std::mem::take(&mut *self.listing.lock().expect("not poisoned"));
                *self.live.lock().expect("not poisoned") = listed;
            }
            Event::Apply(pod) => {
                if let Some((k, name)) = key(pod) {
                    self.live
                        .lock()
                        .expect("not poisoned")
                        .entry(k)
                        .or_default()
                        .insert(name);
                }
            }
            Event::Delete(pod) => {
                if let Some((k, name)) = key(pod) {
                    let mut live = self.live.lock().expect("not poisoned");
                    if let Some(names) = live.get_mut(&k) {
                        names.remove(&name);
                        if names.is_empty() {
                            live.remove(&k);
                        }
                    }
                }
            }
        }
    }

    /// Names of the pods of one ModelDeployment.
    pub fn names(&self, namespace: &str, instance: &str) -> Vec<String> {
        self.live
            .lock()
            .expect("not poisoned")
            .get(&(namespace.to_string(), instance.to_string()))
            .map(|names| names.iter().cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, instance: &str) -> Pod {
        serde_json::from_value(
            serde_json::json!({"metadata": {"name": name, "namespace": "ml",
            "labels": {"app.kubernetes.io/instance": instance}}}),
        )
        .unwrap()
    }

    #[test]
    fn follows_changes_and_a_relist_forgets_what_vanished() {
        let index = PodIndex::default();
        index.observe(&Event::Apply(pod("a-1", "a")));
        index.observe(&Event::Apply(pod("a-2", "a")));
        index.observe(&Event::Apply(pod("b-1", "b")));
        index.observe(&Event::Delete(pod("a-1", "a")));
        assert_eq!(index.names("ml", "a"), ["a-2"]);
        index.observe(&Event::Init);
        index.observe(&Event::InitApply(pod("b-1", "b")));
        assert_eq!(
            index.names("ml", "a"),
            ["a-2"],
            "the old view holds until the list is done"
        );
        index.observe(&Event::InitDone);
        assert!(
            index.names("ml", "a").is_empty(),
            "a-2 was deleted while nobody watched"
        );
        assert_eq!(index.names("ml", "b"), ["b-1"]);
        assert!(index.names("other", "b").is_empty());
    }
}
