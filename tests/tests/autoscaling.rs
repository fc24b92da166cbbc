//! The autoscaler in the loop: the real controller against the emulated API server and
//! simulated cluster, with the load the pods report simulated and the windows shortened
//! (500 ms stable, 100 ms panic, 25 ms tick; see `kandle_tests::emulated`). Every test also
//! checks that the operator never wrote the spec: its RBAC has no such permission, the
//! emulator refuses what RBAC does not grant, and `metadata.generation` stays at 1.
use k8s_openapi::api::apps::v1::Deployment;
use kandle_operator::crd::{ModelDeployment, Phase};
use kandle_tests::emulated::Emulated;
use kandle_tests::scenarios::{Target, condition};
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;

/// Waits until the ModelDeployment wants `n` replicas, the Deployment has them all ready,
/// and status says so.
async fn wait_replicas(t: &Target, name: &str, n: i32) -> ModelDeployment {
    t.wait::<Deployment>(name, &format!("at {n} replicas"), |d| {
        d.spec.replicas == Some(n)
            && d.status
                .as_ref()
                .and_then(|s| s.ready_replicas)
                .unwrap_or(0)
                == n
    })
    .await;
    t.wait::<ModelDeployment>(name, &format!("reporting {n} replicas"), |md| {
        md.status
            .as_ref()
            .is_some_and(|s| s.desired_replicas == Some(n) && s.ready_replicas == Some(n))
    })
    .await
}

fn assert_spec_untouched(md: &ModelDeployment) {
    assert_eq!(
        md.metadata.generation,
        Some(1),
        "the spec was never written"
    );
    assert_eq!(md.spec.replicas, None);
}

#[tokio::test]
async fn scales_up_and_down_with_the_load() {
    let env = Emulated::start();
    let t = env.target();
    t.create(
        "busy",
        json!({"model": {"uri": "hf://org/m"},
               "autoscaling": {"minReplicas": 1, "maxReplicas": 5, "targetInFlight": 8,
                               "scaleDownDelaySeconds": 1}}),
    )
    .await;
    let md = t.wait_phase("busy", Phase::Ready).await;
    assert_eq!(md.status.unwrap().desired_replicas, Some(1));

    // Two steps up: each is an event of its own, with its own note.
    env.load.offer("busy", 20.0);
    wait_replicas(&t, "busy", 3).await;
    t.wait_event("busy", "ScaledUp", "to 3 replicas").await;
    env.load.offer("busy", 30.0);
    let md = wait_replicas(&t, "busy", 4).await;
    let scaled = condition(&md, "Autoscaled");
    assert_eq!(scaled.status, "True");
    assert!(
        scaled.message.starts_with("4 replicas for ")
            && scaled.message.contains("target 8 per replica"),
        "{}",
        scaled.message
    );
    t.wait_event("busy", "ScaledUp", "to 4 replicas").await;

    // Above the maximum, the maximum.
    env.load.offer("busy", 400.0);
    wait_replicas(&t, "busy", 5).await;

    env.load.offer("busy", 8.0);
    let md = wait_replicas(&t, "busy", 1).await;
    t.wait_event("busy", "ScaledDown", "").await;
    assert_eq!(md.status.as_ref().unwrap().phase, Some(Phase::Ready));
    assert_spec_untouched(&md);
}

#[tokio::test]
async fn scale_down_waits_for_the_delay() {
    let env = Emulated::start();
    let t = env.target();
    t.create(
        "patient",
        json!({"model": {"uri": "hf://org/m"},
               "autoscaling": {"minReplicas": 1, "maxReplicas": 4, "targetInFlight": 8,
                               "scaleDownDelaySeconds": 3}}),
    )
    .await;
    t.wait_phase("patient", Phase::Ready).await;
    env.load.offer("patient", 24.0);
    wait_replicas(&t, "patient", 3).await;
    env.load.offer("patient", 0.0);
    let dropped = std::time::Instant::now();
    wait_replicas(&t, "patient", 1).await;
    assert!(
        dropped.elapsed() >= std::time::Duration::from_secs(3),
        "scaled down after {:?}, before the 3 s delay",
        dropped.elapsed()
    );
}

#[tokio::test]
async fn pods_that_do_not_report_do_not_block_scaling() {
    let env = Emulated::start();
    let t = env.target();
    t.create(
        "partial",
        json!({"model": {"uri": "hf://org/m"},
               "autoscaling": {"minReplicas": 3, "maxReplicas": 6, "targetInFlight": 8,
                               "scaleDownDelaySeconds": 1}}),
    )
    .await;
    t.wait_phase("partial", Phase::Ready).await;
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(t.client.clone(), "default");
    let silent = pods.list(&ListParams::default()).await.unwrap().items[0].name_any();
    env.load.silence(&silent);
    // 40 in flight: the two pods that answer carry 13.3 each, which stands for all three.
    env.load.offer("partial", 40.0);
    wait_replicas(&t, "partial", 5).await;
    let md = t
        .wait::<ModelDeployment>("partial", "reporting the silent pod", |md| {
            condition(md, "Autoscaled")
                .message
                .contains("4 of 5 ready pods reported")
        })
        .await;
    assert_eq!(md.status.unwrap().desired_replicas, Some(5));
}

#[tokio::test]
async fn idle_scales_to_zero_and_a_higher_minimum_wakes_it() {
    let env = Emulated::start();
    let t = env.target();
    t.create(
        "sleepy",
        json!({"model": {"uri": "hf://org/m"},
               "autoscaling": {"minReplicas": 0, "maxReplicas": 2, "targetInFlight": 8,
                               "scaleDownDelaySeconds": 1}}),
    )
    .await;
    // Before any load is seen it comes up with one pod, then idles down to none.
    t.wait_phase("sleepy", Phase::Ready).await;
    let md = t.wait_phase("sleepy", Phase::ScaledToZero).await;
    assert_eq!(md.status.as_ref().unwrap().desired_replicas, Some(0));
    assert_eq!(condition(&md, "Autoscaled").reason, "ScaledToZero");
    assert_eq!(
        condition(&md, "Ready").status,
        "True",
        "scaled to zero is a healthy state"
    );
    let deployment = t.api::<Deployment>().get("sleepy").await.unwrap();
    assert_eq!(deployment.spec.replicas, Some(0));
    assert_spec_untouched(&md);

    // Waking it is a spec change by its owner, not by the operator.
    t.api::<ModelDeployment>()
        .patch(
            "sleepy",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"autoscaling": {"minReplicas": 1}}})),
        )
        .await
        .unwrap();
    let md = wait_replicas(&t, "sleepy", 1).await;
    assert_eq!(md.metadata.generation, Some(2));
}

/// The contract between the two halves: what kandle-server's `/metrics` prints is what the
/// operator's scraper reads.
#[test]
fn the_scraper_reads_what_the_server_reports() {
    let metrics = kandle_server::metrics::Metrics::new();
    metrics.requests_in_flight.set(3);
    metrics.requests_queued.set(4);
    let text = metrics.encode();
    metrics
        .requests
        .get_or_create(&kandle_server::metrics::RouteCode {
            route: "chat".into(),
            code: 500,
        })
        .inc();
    let seen = kandle_operator::autoscale::scrape::parse(&text).unwrap();
    assert_eq!(seen.load, 7.0, "{text}");
    let text = metrics.encode();
    let seen = kandle_operator::autoscale::scrape::parse(&text).unwrap();
    assert_eq!((seen.requests, seen.errors), (1.0, 1.0), "{text}");
}
