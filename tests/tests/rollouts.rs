//! Rollouts in the simulated cluster, whose Deployment controller honours maxSurge,
//! maxUnavailable and the progress deadline, and whose scheduler counts GPUs.
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kandle_operator::crd::{ModelDeployment, Phase};
use kandle_tests::apiserver::store::kind;
use kandle_tests::emulated::Emulated;
use kandle_tests::scenarios::Target;
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Fewest ready and most existing serving pods of `name` from now on, replayed from the
/// store's change events in order (a list at each event would miss short-lived states).
fn watch_pods(env: &Emulated, name: &str) -> Arc<Mutex<(usize, usize)>> {
    let seen = Arc::new(Mutex::new((usize::MAX, 0)));
    let store = env.server.store().clone();
    let mut pods: HashMap<String, bool> = store
        .list(kind("pods").unwrap(), Some("default"), |p| of(p, name))
        .0
        .iter()
        .map(|p| {
            (
                p["metadata"]["name"].as_str().unwrap().to_string(),
                is_ready(p),
            )
        })
        .collect();
    let (record, name) = (seen.clone(), name.to_string());
    let mut events = store.subscribe();
    tokio::spawn(async move {
        while let Ok(e) = events.recv().await {
            if e.plural != "pods" || !of(&e.object, &name) {
                continue;
            }
            let pod = e.object["metadata"]["name"].as_str().unwrap().to_string();
            match e.type_ {
                "DELETED" => pods.remove(&pod),
                _ => pods.insert(pod, is_ready(&e.object)),
            };
            let ready = pods.values().filter(|r| **r).count();
            let mut r = record.lock().unwrap();
            *r = (r.0.min(ready), r.1.max(pods.len()));
        }
    });
    seen
}

fn of(pod: &Value, name: &str) -> bool {
    pod["metadata"]["labels"]["app.kubernetes.io/instance"] == name
}

fn is_ready(p: &Value) -> bool {
    p["status"]["conditions"].as_array().is_some_and(|c| {
        c.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

async fn set_image(t: &Target, name: &str, image: &str) {
    t.api::<ModelDeployment>()
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"server": {"image": image}}})),
        )
        .await
        .unwrap();
}

async fn rolled_out(t: &Target, name: &str) -> ModelDeployment {
    t.wait::<ModelDeployment>(name, "rolled out", |md| {
        md.status.as_ref().is_some_and(|s| {
            s.phase == Some(Phase::Ready)
                && s.observed_generation == md.metadata.generation
                && s.current_revision == s.update_revision
        })
    })
    .await
}

#[tokio::test]
async fn a_rolling_update_never_drops_below_the_wanted_replicas() {
    let env = Emulated::start();
    let t = env.target();
    t.create(
        "steady",
        json!({"model": {"uri": "hf://org/m"}, "replicas": 3}),
    )
    .await;
    let before = rolled_out(&t, "steady").await;
    let seen = watch_pods(&env, "steady");
    set_image(&t, "steady", "kandle-server:v2").await;
    let after = t
        .wait::<ModelDeployment>("steady", "on a new revision", |md| {
            md.status.as_ref().is_some_and(|s| {
                s.phase == Some(Phase::Ready)
                    && s.current_revision != before.status.as_ref().unwrap().current_revision
            })
        })
        .await;
    let (fewest_ready, most_pods) = *seen.lock().unwrap();
    assert_eq!(
        fewest_ready, 3,
        "maxUnavailable 0: never fewer than 3 ready pods"
    );
    assert_eq!(most_pods, 4, "maxSurge 1: never more than 4 pods");
    assert_eq!(after.status.unwrap().ready_replicas, Some(3));
}

/// Every GPU is held by the old pods, so the surge pod cannot be scheduled: the operator
/// replaces one pod at a time, says so, and restores the configured strategy afterwards.
#[tokio::test]
async fn a_rollout_that_cannot_surge_for_want_of_gpus_replaces_one_pod_at_a_time() {
    let env = Emulated::start();
    env.cluster.set_gpus(2);
    let t = env.target();
    t.create(
        "big",
        json!({"model": {"uri": "hf://org/m"}, "replicas": 2,
               "resources": {"gpu": {"count": 1}}}),
    )
    .await;
    let before = rolled_out(&t, "big").await;
    set_image(&t, "big", "kandle-server:v2").await;
    let after = t
        .wait::<ModelDeployment>("big", "on a new revision", |md| {
            md.status.as_ref().is_some_and(|s| {
                s.phase == Some(Phase::Ready)
                    && s.current_revision != before.status.as_ref().unwrap().current_revision
            })
        })
        .await;
    assert_eq!(after.status.unwrap().ready_replicas, Some(2));
    let events = t.wait_event("big", "GPUFallback", "").await;
    let fallback = events
        .iter()
        .find(|(reason, _)| reason == "GPUFallback")
        .unwrap_or_else(|| panic!("a GPUFallback event: {events:?}"));
    assert!(
        fallback.1.contains("Insufficient nvidia.com/gpu"),
        "{}",
        fallback.1
    );
    let deployment = t
        .wait::<Deployment>("big", "back to its configured strategy", |d| {
            let r = kandle_operator::build::rolling_update(d).unwrap();
            r.max_surge == Some(IntOrString::Int(1))
                && r.max_unavailable == Some(IntOrString::Int(0))
        })
        .await;
    assert_eq!(deployment.status.unwrap().updated_replicas, Some(2));
}

/// A rollout that cannot become ready (the new image crash-loops) misses its progress
/// deadline (30 simulated seconds, 10 ms each here) and goes back to the last Ready spec; it
/// is not retried until the spec changes, and a new spec rolls out as usual.
#[tokio::test]
async fn a_rollout_that_misses_its_deadline_is_rolled_back() {
    let env = Emulated::start_with_second(std::time::Duration::from_millis(10));
    let t = env.target();
    t.create(
        "careful",
        json!({"model": {"uri": "hf://org/m"}, "replicas": 2,
               "rollout": {"progressDeadlineSeconds": 30}}),
    )
    .await;
    let good = rolled_out(&t, "careful").await.status.unwrap();
    set_image(&t, "careful", "kandle-server:crash").await;
    let md = t
        .wait::<ModelDeployment>("careful", "rolled back", |md| {
            md.status.as_ref().is_some_and(|s| {
                s.rolled_back.is_some()
                    && s.ready_replicas == Some(2)
                    && s.updated_replicas == Some(2)
            })
        })
        .await;
    let status = md.status.clone().unwrap();
    let rb = status.rolled_back.clone().unwrap();
    assert_eq!(rb.generation, 2);
    assert_ne!(Some(&rb.revision), good.current_revision.as_ref());
    assert!(rb.message.contains("CrashLoopBackOff"), "{}", rb.message);
    assert_eq!(status.phase, Some(Phase::Degraded));
    assert_eq!(
        status.update_revision, good.current_revision,
        "serving the old revision"
    );
    let ready = kandle_tests::scenarios::condition(&md, "Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "RolledBack")
    );
    assert!(
        ready.message.contains("change the spec to try again"),
        "{}",
        ready.message
    );
    t.wait_event("careful", "RolledBack", "").await;

    // Not retried: well past another deadline, the pods still run the old image.
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    let deployment = t.api::<Deployment>().get("careful").await.unwrap();
    let image = deployment.spec.template.spec.unwrap().containers[0]
        .image
        .clone();
    assert_eq!(image.as_deref(), Some("kandle-server:test"));

    // A new spec is tried.
    set_image(&t, "careful", "kandle-server:v3").await;
    let md = rolled_out(&t, "careful").await;
    let status = md.status.unwrap();
    assert_eq!(status.rolled_back, None);
    assert_ne!(status.current_revision, good.current_revision);
}

fn canary_spec(pause: i32) -> Value {
    json!({"model": {"uri": "hf://org/m"}, "replicas": 4,
           "rollout": {"canary": {"steps": [{"weight": 25, "pauseSeconds": pause},
                                             {"weight": 50, "pauseSeconds": pause}],
                                  "maxErrorRate": 0.05}}})
}

/// Replicas of the canary Deployment seen from now on, in order of change.
fn watch_canary_replicas(env: &Emulated, name: &str) -> Arc<Mutex<Vec<i64>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (record, name) = (seen.clone(), format!("{name}-canary"));
    let mut events = env.server.store().subscribe();
    tokio::spawn(async move {
        while let Ok(e) = events.recv().await {
            if e.plural == "deployments" && e.object["metadata"]["name"] == name.as_str() {
                let replicas = e.object["spec"]["replicas"].as_i64().unwrap_or(-1);
                let mut r = record.lock().unwrap();
                if r.last() != Some(&replicas) {
                    r.push(replicas);
                }
            }
        }
    });
    seen
}

#[tokio::test]
async fn a_healthy_canary_steps_through_its_weights_and_is_promoted() {
    let env = Emulated::start();
    let t = env.target();
    t.create("tweety", canary_spec(1)).await;
    let good = rolled_out(&t, "tweety").await.status.unwrap();
    let canary_replicas = watch_canary_replicas(&env, "tweety");
    set_image(&t, "tweety", "kandle-server:v2").await;
    let md = t
        .wait::<ModelDeployment>("tweety", "in its canary", |md| {
            md.status
                .as_ref()
                .is_some_and(|s| s.phase == Some(Phase::Deploying) && s.canary.is_some())
        })
        .await;
    let running = kandle_tests::scenarios::condition(&md, "Ready");
    assert_eq!(running.reason, "Canary", "{running:?}");
    let md = rolled_out(&t, "tweety").await;
    let status = md.status.unwrap();
    assert_ne!(status.current_revision, good.current_revision);
    let canary = status.canary.unwrap();
    assert_eq!(
        canary.verdict,
        kandle_operator::crd::CanaryVerdict::Promoted
    );
    assert!(canary.message.contains("promoted"), "{}", canary.message);
    // 25% then 50% of 4 replicas, then gone.
    t.wait_gone::<Deployment>("tweety-canary").await;
    assert_eq!(*canary_replicas.lock().unwrap(), vec![1, 2]);
    for reason in ["CanaryStep", "CanaryPromoted"] {
        t.wait_event("tweety", reason, "").await;
    }
}

#[tokio::test]
async fn a_canary_that_fails_too_often_is_aborted_and_not_retried() {
    let env = Emulated::start();
    let t = env.target();
    t.create("shaky", canary_spec(1)).await;
    let good = rolled_out(&t, "shaky").await.status.unwrap();
    env.load.fail("shaky-canary", 0.5);
    set_image(&t, "shaky", "kandle-server:v2").await;
    let md = t
        .wait::<ModelDeployment>("shaky", "aborted", |md| {
            md.status
                .as_ref()
                .is_some_and(|s| s.phase == Some(Phase::Degraded))
        })
        .await;
    let status = md.status.clone().unwrap();
    let canary = status.canary.unwrap();
    assert_eq!(canary.verdict, kandle_operator::crd::CanaryVerdict::Aborted);
    assert!(
        canary.message.contains("canary error rate 50.0%"),
        "{}",
        canary.message
    );
    let ready = kandle_tests::scenarios::condition(&md, "Ready");
    assert_eq!(ready.reason, "CanaryAborted");
    t.wait_gone::<Deployment>("shaky-canary").await;
    t.wait_event("shaky", "CanaryAborted", "").await;
    // The old revision serves at full strength, and the canary is not tried again.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let md = t.api::<ModelDeployment>().get("shaky").await.unwrap();
    let status = md.status.unwrap();
    assert_eq!(status.update_revision, good.current_revision);
    assert_eq!(status.ready_replicas, Some(4));
    assert!(
        t.api::<Deployment>()
            .get_opt("shaky-canary")
            .await
            .unwrap()
            .is_none()
    );
}

/// `kubectl annotate mdep NAME kandle.dev/canary=promote` ends a long step at once.
#[tokio::test]
async fn the_canary_annotation_promotes_at_once() {
    let env = Emulated::start();
    let t = env.target();
    t.create("eager", canary_spec(3600)).await;
    rolled_out(&t, "eager").await;
    set_image(&t, "eager", "kandle-server:v2").await;
    t.wait::<Deployment>("eager-canary", "running", |_| true)
        .await;
    t.api::<ModelDeployment>()
        .patch(
            "eager",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"kandle.dev/canary": "promote"}}})),
        )
        .await
        .unwrap();
    let md = rolled_out(&t, "eager").await;
    let canary = md.status.unwrap().canary.unwrap();
    assert_eq!(
        canary.verdict,
        kandle_operator::crd::CanaryVerdict::Promoted
    );
    assert!(canary.message.contains("annotation"), "{}", canary.message);
}
