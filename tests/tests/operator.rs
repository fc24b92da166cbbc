//! The real controller against the in-process API server and simulated cluster, and the
//! same scenarios against a real cluster when `KANDLE_E2E=1`.
use k8s_openapi::api::coordination::v1::Lease;
use kandle_operator::crd::{ModelDeployment, Phase};
use kandle_operator::leader::{self, LeaseConfig};
use kandle_operator::metrics::Metrics;
use kandle_tests::apiserver::ApiServer;
use kandle_tests::apiserver::store::kind;
use kandle_tests::cluster::Cluster;
use kandle_tests::emulated::{
    Emulated, assert_nothing_forbidden, autoscaler, operator_client, settings,
};
use kandle_tests::load::SimulatedLoad;
use kandle_tests::scenarios::{self, Target};
use kube::Api;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

#[tokio::test]
async fn creates_and_converges() {
    scenarios::create_and_converge(&Emulated::start().target()).await;
}

#[tokio::test]
async fn a_spec_change_rolls_a_new_revision() {
    scenarios::spec_change_rolls_a_new_revision(&Emulated::start().target()).await;
}

/// Also the proof that watching children matters: without `.owns(...)` nothing would
/// notice the deleted Service before the ten-minute resync.
#[tokio::test]
async fn drift_is_repaired() {
    scenarios::drift_is_repaired(&Emulated::start().target()).await;
}

#[tokio::test]
async fn deletion_collects_children() {
    scenarios::deletion_collects_children(&Emulated::start().target()).await;
}

#[tokio::test]
async fn a_pull_failure_is_reported() {
    scenarios::pull_failure_is_reported(&Emulated::start().target()).await;
}

#[tokio::test]
async fn kubectl_scale_is_followed() {
    scenarios::scale_subresource_is_followed(&Emulated::start().target()).await;
}

#[tokio::test]
async fn a_node_cache_pulls_once_per_node() {
    let mut fetched = scenarios::node_cache_pulls_once_per_node(&Emulated::start().target()).await;
    fetched.sort_unstable();
    // The emulated node starts empty: the first pod pulls, the second finds the model.
    assert_eq!(fetched, [0, kandle_tests::cluster::PULLED_BYTES as u64]);
}

#[tokio::test]
async fn a_missing_secret_is_reported_until_created() {
    let env = Emulated::start();
    let t = env.target();
    scenarios::missing_secret_is_reported_until_created(&t, "secretive", json!({})).await;
    let pvc = json!({"volume": "pvc", "pvc": {"size": "1Gi"}});
    scenarios::missing_secret_is_reported_until_created(&t, "secretive-cached", pvc).await;
}

/// Changes made while the watches were down, with the history compacted, are found by
/// the re-list that follows 410 Expired.
#[tokio::test]
async fn relists_after_410_and_repairs_what_changed_meanwhile() {
    let env = Emulated::start();
    let t = env.target();
    t.create("relist", json!({"model": {"uri": "hf://org/m"}}))
        .await;
    t.wait_phase("relist", Phase::Ready).await;
    let before = env.server.requests();
    env.server.interrupt_watches(|store| {
        store
            .delete(kind("services").unwrap(), "default", "relist")
            .unwrap();
    });
    t.wait::<k8s_openapi::api::core::v1::Service>("relist", "recreated", |_| true)
        .await;
    let after = env.server.requests();
    let lists = |c: &kandle_tests::apiserver::RequestCounts| {
        c.get(&("list".to_string(), "services".to_string()))
            .copied()
            .unwrap_or(0)
    };
    assert!(
        lists(&after) > lists(&before),
        "the watcher re-listed: {after:?}"
    );
}

/// An object that slipped past validation is reported and waited on, and does not stall
/// the others.
#[tokio::test]
async fn an_undecodable_object_does_not_stall_the_others_or_loop() {
    let env = Emulated::start();
    let t = env.target();
    let broken = json!({"apiVersion": "kandle.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "broken"}, "spec": {"model": {"uri": "hf://org/m"}, "replicas": "three"}});
    env.server
        .store()
        .create(kind("modeldeployments").unwrap(), "default", broken)
        .unwrap();
    t.create("healthy", json!({"model": {"uri": "hf://org/m"}}))
        .await;
    t.wait_phase("healthy", Phase::Ready).await;
    // Its event may trail the healthy one's readiness: wait for it.
    let invalid_spec = |e: &serde_json::Value| {
        e["regarding"]["name"] == "broken"
            && e["reason"] == "InvalidSpec"
            && e["note"].as_str().unwrap_or("").contains("spec.replicas")
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while env
        .server
        .store()
        .list(kind("events").unwrap(), None, invalid_spec)
        .0
        .is_empty()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no InvalidSpec event naming spec.replicas for the broken object"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The typed client cannot read it either, so look at what is stored.
    let models = kind("modeldeployments").unwrap();
    let stored = || env.server.store().get(models, "default", "broken").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while stored()["status"]["phase"] != "Failed" && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = &stored()["status"];
    assert_eq!(status["phase"], "Failed", "{status}");
    let ready = &status["conditions"][0];
    assert_eq!(
        (&ready["type"], &ready["reason"]),
        (&json!("Ready"), &json!("InvalidSpec"))
    );
    assert!(
        ready["message"].as_str().unwrap().contains("spec.replicas"),
        "{ready}"
    );
    quiesce(&env).await;
    let reconciles = metric(&env.metrics, "kandle_operator_reconciles_total");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        metric(&env.metrics, "kandle_operator_reconciles_total"),
        reconciles,
        "no retries of a broken object"
    );
}

/// Once converged, the operator neither writes nor polls: watches carry everything.
#[tokio::test]
async fn idle_means_no_writes_and_a_bounded_number_of_requests() {
    let env = Emulated::start();
    let t = env.target();
    for name in ["idle-a", "idle-b", "idle-c"] {
        t.create(name, json!({"model": {"uri": "hf://org/m"}, "replicas": 2}))
            .await;
    }
    for name in ["idle-a", "idle-b", "idle-c"] {
        t.wait_phase(name, Phase::Ready).await;
    }
    quiesce(&env).await;
    let before = env.server.total_requests();
    let writes = metric(&env.metrics, "kandle_operator_writes_total");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        env.server.total_requests(),
        before,
        "idle: {:?}",
        env.server.requests()
    );
    assert_eq!(metric(&env.metrics, "kandle_operator_writes_total"), writes);
}

/// A no-op resync: every object reconciled again, nothing written.
#[tokio::test]
async fn a_full_resync_writes_nothing() {
    let env = Emulated::start();
    let t = env.target();
    for name in ["sync-a", "sync-b"] {
        t.create(
            name,
            json!({"model": {"uri": "hf://org/m"}, "replicas": 2, "cache": {"volume": "pvc"}}),
        )
        .await;
    }
    for name in ["sync-a", "sync-b"] {
        t.wait_phase(name, Phase::Ready).await;
    }
    quiesce(&env).await;
    let writes = metric(&env.metrics, "kandle_operator_writes_total");
    let reconciles = metric(&env.metrics, "kandle_operator_reconciles_total");
    // After a watch outage the controller re-lists and reconciles everything.
    env.server.interrupt_watches(|_| {});
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while metric(&env.metrics, "kandle_operator_reconciles_total") < reconciles + 2
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(metric(&env.metrics, "kandle_operator_reconciles_total") >= reconciles + 2);
    assert_eq!(metric(&env.metrics, "kandle_operator_writes_total"), writes);
}

/// Against an API server that defaults, writes quantities in canonical form and keeps
/// other managers' fields: resources written as `0.5` and `1024Mi`, and a sidecar injector
/// (a second field manager) adding a container and an env entry, cause no apply and no
/// fight, also through a full resync.
#[tokio::test]
async fn canonical_quantities_and_a_foreign_manager_cause_no_writes() {
    use k8s_openapi::api::apps::v1::Deployment;
    use kube::api::{Patch, PatchParams};
    let env = Emulated::start();
    let t = env.target();
    t.create(
        "foreign",
        json!({"model": {"uri": "hf://org/m"}, "replicas": 2,
            "resources": {"requests": {"cpu": "0.5", "memory": "1024Mi"}, "limits": {"memory": "2048Mi"}},
            "cache": {"sizeLimit": "20480Mi"}}),
    )
    .await;
    t.wait_phase("foreign", Phase::Ready).await;
    let deployments: Api<Deployment> = t.api();
    let stored = deployments.get("foreign").await.unwrap();
    let server = &stored.spec.template.spec.as_ref().unwrap().containers[0];
    let requests = server
        .resources
        .as_ref()
        .unwrap()
        .requests
        .as_ref()
        .unwrap();
    assert_eq!(requests["memory"].0, "1Gi", "stored in canonical form");
    assert_eq!(requests["cpu"].0, "500m");

    let applies = || env.server.requests()[&("patch".to_string(), "deployments".to_string())];
    let before = applies();
    let injected = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "foreign"},
        "spec": {"template": {"spec": {"containers": [
            {"name": "server", "env": [{"name": "INJECTED", "value": "1"}]},
            {"name": "sidecar", "image": "proxy:1"}]}}}});
    deployments
        .patch(
            "foreign",
            &PatchParams::apply("injector"),
            &Patch::Apply(&injected),
        )
        .await
        .unwrap();
    // The operator sees the change (its watch) and the pods roll; then a full resync.
    let reconciles = metric(&env.metrics, "kandle_operator_reconciles_total");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while metric(&env.metrics, "kandle_operator_reconciles_total") <= reconciles {
        assert!(
            std::time::Instant::now() < deadline,
            "no reconcile after the change"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    t.wait_phase("foreign", Phase::Ready).await;
    let reconciles = metric(&env.metrics, "kandle_operator_reconciles_total");
    env.server.interrupt_watches(|_| {});
    while metric(&env.metrics, "kandle_operator_reconciles_total") <= reconciles {
        assert!(std::time::Instant::now() < deadline, "no resync");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        applies(),
        before + 1,
        "only the injector applied the Deployment"
    );
    let now = deployments.get("foreign").await.unwrap();
    let pod = now.spec.template.spec.unwrap();
    let names: Vec<_> = pod.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["server", "sidecar"]);
    assert!(
        pod.containers[0]
            .env
            .iter()
            .flatten()
            .any(|e| e.name == "INJECTED"),
        "the other manager's env entry stays"
    );
}

/// Two replicas with leader election: one reconciles; when it goes, the other takes over.
#[tokio::test]
async fn two_operators_one_leader() {
    let server = ApiServer::default();
    let _cluster = Cluster::start(&server);
    let lease = |identity: &str| LeaseConfig {
        namespace: "kandle-system".into(),
        name: "kandle-operator".into(),
        identity: identity.into(),
        // Long enough that a loaded 2-core machine renews well in time.
        duration: Duration::from_secs(5),
        renew_every: Duration::from_millis(500),
    };
    let start = |identity: &'static str| {
        let client = operator_client(&server);
        let config = lease(identity);
        let metrics = Arc::new(Metrics::default());
        let m = metrics.clone();
        let task = tokio::spawn(async move {
            let load = Arc::new(SimulatedLoad::default());
            let work = kandle_operator::controller::run(
                client.clone(),
                settings(),
                None,
                m.clone(),
                autoscaler(&load),
            );
            let _ = leader::lead(client, config, &m, work).await;
        });
        (task, metrics)
    };
    let leases: Api<Lease> = Api::namespaced(server.client(), "kandle-system");
    let holder = || async {
        leases
            .get_opt("kandle-operator")
            .await
            .unwrap()
            .and_then(|l| l.spec?.holder_identity)
    };
    let (first, first_metrics) = start("first");
    // The second starts once the first holds the Lease: observed, not assumed after a pause.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while holder().await.as_deref() != Some("first") {
        assert!(std::time::Instant::now() < deadline, "the first never led");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (second, second_metrics) = start("second");
    let t = Target {
        client: server.client(),
        namespace: "default".into(),
        timeout: Duration::from_secs(30),
        real: false,
    };
    t.create("led", json!({"model": {"uri": "hf://org/m"}}))
        .await;
    t.wait_phase("led", Phase::Ready).await;
    assert!(metric(&first_metrics, "kandle_operator_reconciles_total") > 0);
    assert_eq!(
        metric(&second_metrics, "kandle_operator_reconciles_total"),
        0,
        "the standby does not reconcile"
    );
    assert_eq!(holder().await.as_deref(), Some("first"));

    first.abort();
    t.create("taken-over", json!({"model": {"uri": "hf://org/m"}}))
        .await;
    t.wait_phase("taken-over", Phase::Ready).await;
    assert!(metric(&second_metrics, "kandle_operator_reconciles_total") > 0);
    assert_eq!(holder().await.as_deref(), Some("second"));
    second.abort();
    assert_nothing_forbidden(&server);
}

/// Writes of invalid ModelDeployments are refused as by a real API server.
#[tokio::test]
async fn the_emulated_api_server_refuses_what_the_crd_refuses() {
    let env = Emulated::start();
    let api: Api<ModelDeployment> = Api::namespaced(env.server.client(), "default");
    let md: ModelDeployment = serde_json::from_value(json!({"apiVersion": "kandle.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "both"}, "spec": {"model": {"uri": "hf://org/m"}, "replicas": 1, "autoscaling": {"maxReplicas": 2}}})).unwrap();
    let err = api.create(&Default::default(), &md).await.unwrap_err();
    let kube::Error::Api(status) = err else {
        panic!("{err}")
    };
    assert_eq!(status.code, 422);
    assert!(
        status.message.contains("either replicas or autoscaling"),
        "{}",
        status.message
    );
}

/// The scenarios against the cluster of the current kubeconfig, with the operator
/// installed there (the e2e workflow does that on kind).
#[tokio::test]
async fn real_cluster_scenarios() {
    if std::env::var("KANDLE_E2E").as_deref() != Ok("1") {
        eprintln!(
            "skipped: set KANDLE_E2E=1 to run the scenarios against the current kubeconfig's cluster"
        );
        return;
    }
    let client = kube::Client::try_default().await.expect("a kubeconfig");
    let namespace = std::env::var("KANDLE_E2E_NAMESPACE").unwrap_or_else(|_| "kandle-e2e".into());
    let t = Target {
        client,
        namespace,
        timeout: Duration::from_secs(600),
        real: true,
    };
    scenarios::create_and_converge(&t).await;
    scenarios::spec_change_rolls_a_new_revision(&t).await;
    scenarios::drift_is_repaired(&t).await;
    scenarios::deletion_collects_children(&t).await;
    scenarios::pull_failure_is_reported(&t).await;
    scenarios::missing_secret_is_reported_until_created(&t, "secretive", json!({})).await;
    scenarios::scale_subresource_is_followed(&t).await;
    scenarios::node_cache_pulls_once_per_node(&t).await;
}

/// A counter's value in the operator's `/metrics` text.
/// Waits until the API server has had no request for a second: the operator is done with
/// what it was doing, however slow the machine (fails after 30 s of activity).
async fn quiesce(env: &Emulated) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let before = env.server.total_requests();
        tokio::time::sleep(Duration::from_secs(1)).await;
        if env.server.total_requests() == before {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never idle: {:?}",
            env.server.requests()
        );
    }
}

/// A counter's value; a metric that is not there (renamed, never registered) fails the
/// test rather than reading as 0.
fn metric(metrics: &Metrics, name: &str) -> u64 {
    let text = metrics.encode();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
}

/// A PVC cache: the Job pulls first, the Deployment follows; a new image means a new Job
/// (its template is immutable) while the pods keep serving, and the old Job is removed.
#[tokio::test]
async fn a_pvc_cache_is_filled_by_a_job_before_pods_start() {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::batch::v1::Job;
    let env = Emulated::start();
    let t = env.target();
    t.create(
        "cached",
        json!({"model": {"uri": "hf://org/m"}, "replicas": 2, "cache": {"volume": "pvc"}}),
    )
    .await;
    let ready = t.wait_phase("cached", Phase::Ready).await;
    assert_eq!(
        ready
            .status
            .unwrap()
            .model
            .unwrap()
            .resolved_revision
            .as_deref(),
        Some(kandle_tests::cluster::PULLED_REVISION)
    );
    let jobs: Api<Job> = Api::namespaced(env.server.client(), "default");
    let first: Vec<String> = jobs
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|j| j.metadata.name)
        .collect();
    assert_eq!(first.len(), 1, "{first:?}");
    assert!(
        Api::<k8s_openapi::api::core::v1::PersistentVolumeClaim>::namespaced(
            env.server.client(),
            "default"
        )
        .get("cached-cache")
        .await
        .is_ok()
    );

    let patch = json!({"spec": {"server": {"image": "kandle-server:v2"}}});
    Api::<ModelDeployment>::namespaced(env.server.client(), "default")
        .patch(
            "cached",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .unwrap();
    t.wait::<Deployment>("cached", "on the new image", |d| {
        d.spec
            .template
            .spec
            .as_ref()
            .is_some_and(|p| p.containers[0].image.as_deref() == Some("kandle-server:v2"))
    })
    .await;
    t.wait_phase("cached", Phase::Ready).await;
    let now: Vec<String> = jobs
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|j| j.metadata.name)
        .collect();
    assert_eq!(now.len(), 1, "the old Job is gone: {now:?}");
    assert_ne!(now, first);
}
