//! The controller: watches ModelDeployments and their children, and reconciles each by
//! building what it wants (pure), applying the difference, and writing status if changed.
use crate::apply::{apply, delete};
use crate::autoscale::Autoscaler;
use crate::autoscale::scrape::PodTarget;
use crate::build::{self, Child, MANAGED_BY, Settings};
use crate::canary::{self, Canary};
use crate::crd::{CanaryVerdict, ModelDeployment, Phase};
use crate::error::{Error, backoff};
use crate::index::PodIndex;
use crate::metrics::Metrics;
use crate::rollout;
use crate::status::{self, Observed};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::core::error_boundary::InvalidObject;
use kube::core::{ApiResource, DeserializeGuard, DynamicObject};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::Instrument;

/// Every object of a watched kind that the operator manages, kept current by a watch:
/// reconciles read here, so they cost no API requests.
#[derive(Clone)]
struct Stores {
    deployments: Store<Deployment>,
    services: Store<Service>,
    pdbs: Store<PodDisruptionBudget>,
    network_policies: Store<NetworkPolicy>,
    jobs: Store<Job>,
    pvcs: Store<PersistentVolumeClaim>,
    pods: Store<Pod>,
    pod_index: Arc<PodIndex>,
}

/// What every reconcile shares.
pub struct Context {
    client: Client,
    settings: Settings,
    recorder: Recorder,
    metrics: Arc<Metrics>,
    stores: Stores,
    /// Consecutive transient failures per object, for the retry backoff.
    failures: Mutex<HashMap<ObjectRef<ModelDeployment>, u32>>,
    /// What events were last published for, per object (by uid): the cache may still
    /// show an older status after a write, and an event must not be repeated because of that.
    announced: Mutex<HashMap<String, Announced>>,
    autoscaler: Arc<Autoscaler>,
}

/// The parts of a status that events are published for.
#[derive(Debug, Clone, Default, PartialEq)]
struct Announced {
    phase: Option<Phase>,
    revision: Option<String>,
    replicas: Option<i32>,
    rolled_back: Option<String>,
    canary: Option<(String, i32, CanaryVerdict)>,
}

impl Announced {
    fn of(s: &crate::crd::ModelDeploymentStatus) -> Self {
        Self {
            phase: s.phase,
            revision: s.update_revision.clone(),
            replicas: s.desired_replicas,
            rolled_back: s.rolled_back.as_ref().map(|r| r.revision.clone()),
            canary: s
                .canary
                .as_ref()
                .map(|c| (c.revision.clone(), c.step, c.verdict)),
        }
    }
}

/// Reconciles running at once.
const CONCURRENCY: u16 = 16;

/// Without changes, each ModelDeployment is looked at again this often (reads only).
const RESYNC: Duration = Duration::from_secs(600);

/// Runs the controller (and the autoscaler) until SIGTERM or ctrl-c. `namespace` limits
/// it to one namespace.
pub async fn run(
    client: Client,
    settings: Settings,
    namespace: Option<String>,
    metrics: Arc<Metrics>,
    autoscaler: Arc<Autoscaler>,
) {
    let ns = namespace.as_deref();
    let (relisted, relists) = tokio::sync::mpsc::unbounded_channel();
    let (deployments, deployment_events) =
        reflect::<Deployment>(&client, ns, &relisted, keep_all, |_| {});
    let (services, service_events) = reflect::<Service>(&client, ns, &relisted, keep_all, |_| {});
    let (pdbs, pdb_events) =
        reflect::<PodDisruptionBudget>(&client, ns, &relisted, keep_all, |_| {});
    let (network_policies, network_policy_events) =
        reflect::<NetworkPolicy>(&client, ns, &relisted, keep_all, |_| {});
    let (jobs, job_events) = reflect::<Job>(&client, ns, &relisted, keep_all, |_| {});
    let (pvcs, pvc_events) =
        reflect::<PersistentVolumeClaim>(&client, ns, &relisted, keep_all, |_| {});
    // Status reads only labels and status of pods, the most numerous objects.
    let pod_index = Arc::new(PodIndex::default());
    let index = pod_index.clone();
    let (pods, pod_events) = reflect::<Pod>(
        &client,
        ns,
        &relisted,
        |p| p.spec = None,
        move |event| index.observe(event),
    );
    let stores = Stores {
        deployments,
        services,
        pdbs,
        network_policies,
        jobs,
        pvcs,
        pods,
        pod_index,
    };
    let ready = stores.clone();
    let ready_metrics = metrics.clone();
    tokio::spawn(async move {
        let _ = ready.deployments.wait_until_ready().await;
        let _ = ready.services.wait_until_ready().await;
        let _ = ready.pdbs.wait_until_ready().await;
        let _ = ready.network_policies.wait_until_ready().await;
        let _ = ready.jobs.wait_until_ready().await;
        let _ = ready.pvcs.wait_until_ready().await;
        let _ = ready.pods.wait_until_ready().await;
        ready_metrics.set_synced();
        tracing::info!("caches synced");
    });
    let reporter = Reporter {
        controller: MANAGED_BY.into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client: client.clone(),
        settings,
        metrics,
        stores,
        failures: Mutex::new(HashMap::new()),
        announced: Mutex::new(HashMap::new()),
        autoscaler: autoscaler.clone(),
    });
    let controller = Controller::new(
        api::<DeserializeGuard<ModelDeployment>>(&client, ns),
        watcher::Config::default(),
    );
    let (scaled, scaling) = tokio::sync::mpsc::unbounded_channel();
    let mds = controller.store();
    let stores = ctx.stores.clone();
    let scaling_loop = async move {
        autoscaler
            .run(
                || {
                    // Only autoscaled ones are copied: this runs every tick.
                    mds.state()
                        .iter()
                        .filter_map(|g| g.0.as_ref().ok())
                        .filter(|md| md.spec.autoscaling.is_some())
                        .map(|md| Arc::new(md.clone()))
                        .collect()
                },
                |ns, name| ready_pods(&stores, ns, name),
                scaled,
            )
            .await
    };
    let controller = controller
        .owns_stream(deployment_events)
        .owns_stream(service_events)
        .owns_stream(pdb_events)
        .owns_stream(network_policy_events)
        .owns_stream(job_events)
        .owns_stream(pvc_events)
        .watches_stream(pod_events, |pod| {
            let name = pod.labels().get("app.kubernetes.io/instance")?.clone();
            Some(ObjectRef::new(&name).within(&pod.namespace()?))
        })
        // A re-list replaces a store without telling what disappeared meanwhile, so after
        // one every ModelDeployment looks again (reads only, unless something is missing).
        .reconcile_all_on(tokio_stream::wrappers::UnboundedReceiverStream::new(
            relists,
        ))
        .reconcile_on(
            tokio_stream::wrappers::UnboundedReceiverStream::new(scaling).map(|md| {
                ObjectRef::new(&md.name).within(md.namespace.as_deref().unwrap_or_default())
            }),
        )
        // Bounded, so a burst of thousands of changes does not hold thousands of half-done
        // reconciles (and their built objects) in memory at once.
        .with_config(kube::runtime::controller::Config::default().concurrency(CONCURRENCY))
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => tracing::debug!(%object, "reconciled"),
                Err(e) => tracing::warn!(error = %e, "reconcile failed"),
            }
        });
    // The autoscaler stops when the controller does (its channel closes with it).
    tokio::select! {
        () = controller => {}
        () = scaling_loop => {}
    }
}

/// Ready serving pods of a ModelDeployment, for the autoscaler.
fn ready_pods(stores: &Stores, ns: &str, name: &str) -> Vec<PodTarget> {
    stores
        .pod_index
        .names(ns, name)
        .iter()
        .filter_map(|pod| stores.pods.get(&ObjectRef::new(pod).within(ns)))
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.labels()
                    .get("app.kubernetes.io/component")
                    .map(String::as_str)
                    != Some("pull")
                && status::pod_ready(p)
        })
        .map(|p| PodTarget {
            namespace: ns.to_string(),
            name: p.name_any(),
            instance: name.to_string(),
            ip: p.status.as_ref().and_then(|s| s.pod_ip.clone()),
        })
        .collect()
}

fn keep_all<K>(_: &mut K) {}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// A store of the operator's own objects of one kind, and the watch events that fill it
/// (managed fields, and whatever `trim` removes, dropped: never read here, they would
/// only take memory).
/// Each completed (re-)list is announced on `relisted`.
fn reflect<K>(
    client: &Client,
    namespace: Option<&str>,
    relisted: &tokio::sync::mpsc::UnboundedSender<()>,
    trim: fn(&mut K),
    observe: impl Fn(&watcher::Event<K>) + Send + 'static,
) -> (
    Store<K>,
    impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static,
)
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let relisted = relisted.clone();
    let config =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}"));
    let events = watcher(api::<K>(client, namespace), config)
        .default_backoff()
        .modify(move |o| {
            o.managed_fields_mut().clear();
            trim(o);
        })
        .reflect(writer)
        .inspect(move |event| {
            if let Ok(event) = event {
                observe(event);
                if let watcher::Event::InitDone = event {
                    let _ = relisted.send(());
                }
            }
        })
        .touched_objects()
        // Each stream backs off on its own errors; passed on, they would also pause the
        // controller's shared trigger stream, and with it every other watch.
        .filter_map(|event| async move {
            match event {
                Ok(object) => Some(Ok(object)),
                Err(e) => {
                    tracing::warn!(error = %e, kind = K::kind(&()).as_ref(), "watch failed; retrying");
                    None
                }
            }
        });
    (store, events)
}

async fn reconcile(
    guard: Arc<DeserializeGuard<ModelDeployment>>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let started = Instant::now();
    let md = match &guard.0 {
        Ok(md) => md,
        Err(invalid) => {
            let error = report_invalid(&ctx, invalid).await;
            ctx.metrics.reconciled(started.elapsed(), Some(&error));
            return Err(error);
        }
    };
    let span = tracing::info_span!("reconcile", namespace = md.namespace().unwrap_or_default(), name = %md.name_any(), generation = md.metadata.generation);
    let outcome = reconcile_one(md, &ctx).instrument(span).await;
    ctx.metrics
        .reconciled(started.elapsed(), outcome.as_ref().err());
    if outcome.is_ok() {
        ctx.failures
            .lock()
            .expect("not poisoned")
            .remove(&ObjectRef::from_obj(md));
    }
    outcome
}

async fn reconcile_one(md: &ModelDeployment, ctx: &Context) -> Result<Action, Error> {
    if md.meta().deletion_timestamp.is_some() {
        // Owner references hand the children to the garbage collector.
        return Ok(Action::await_change());
    }
    let ns = md.namespace().unwrap_or_default();
    let name = md.name_any();
    let uid = md.uid().unwrap_or_default();
    let stores = &ctx.stores;
    let deployment = stores.deployments.get(&ObjectRef::new(&name).within(&ns));
    let pods: Vec<Arc<Pod>> = stores
        .pod_index
        .names(&ns, &name)
        .iter()
        .filter_map(|pod| stores.pods.get(&ObjectRef::new(pod).within(&ns)))
        .collect();
    let scaling = ctx.autoscaler.decision(&ObjectRef::from_obj(md));
    let replicas = crate::replicas::wanted(md, scaling.map(|d| d.replicas));
    let mut desired = build::desired(md, &ctx.settings, replicas);
    let (serving, pulling): (Vec<&Pod>, Vec<&Pod>) = pods.iter().map(Arc::as_ref).partition(|p| {
        p.labels()
            .get("app.kubernetes.io/component")
            .map(String::as_str)
            != Some("pull")
    });
    let now = now();
    // The spec that was last Ready, which canaries run beside and rollbacks return to.
    let previous = md
        .status
        .as_ref()
        .and_then(|s| s.ready_spec.as_ref())
        .map(|spec| {
            let mut previous = md.clone();
            previous.spec = *spec.clone();
            previous
        });
    // Only a revision other than the one serving can be a canary, and only one still being
    // judged needs the pods scraped.
    let last = md.status.clone().unwrap_or_default();
    let decided = last.canary.as_ref().is_some_and(|c| {
        c.revision == desired.revision
            && c.generation == md.metadata.generation.unwrap_or_default()
            && c.verdict != CanaryVerdict::Progressing
    });
    let contested =
        previous.is_some() && last.current_revision.as_deref() != Some(desired.revision.as_str());
    let canary = match md.spec.rollout.as_ref().and_then(|r| r.canary.as_ref()) {
        Some(_) if contested => {
            let canary_name = format!("{name}-canary");
            let canary_deployment = stores
                .deployments
                .get(&ObjectRef::new(&canary_name).within(&ns));
            let ready = canary_ready(canary_deployment.as_deref(), &desired.revision);
            let counters = match decided {
                true => None,
                false => canary_counters(ctx, &ns, &name, &serving).await,
            };
            canary::decide(md, &desired.revision, replicas, ready, counters, &now)
        }
        _ => None,
    };
    // A running canary is looked at again when its step ends.
    let recheck = match &canary {
        Some(Canary::Running { recheck, .. }) => (*recheck).clamp(Duration::from_secs(1), RESYNC),
        _ => RESYNC,
    };
    let rolled_back = match &canary {
        Some(_) => None,
        None => rollout::rolled_back(md, deployment.as_deref(), &serving, &desired.revision),
    };
    if let Some(previous) = &previous {
        match &canary {
            Some(Canary::Running {
                stable_replicas,
                canary_replicas,
                ..
            }) => {
                desired = build::desired(previous, &ctx.settings, *stable_replicas)
                    .with_canary(build::desired(md, &ctx.settings, *canary_replicas));
            }
            Some(Canary::Aborted(_)) => desired = build::desired(previous, &ctx.settings, replicas),
            // Until the promoted revision is rolled out, its canary pods keep serving.
            Some(Canary::Promoted(c)) => {
                let (_, canary_replicas) = canary::split(replicas, c.weight);
                desired = desired.with_canary(build::desired(md, &ctx.settings, canary_replicas));
            }
            _ if rolled_back.is_some() => {
                desired = build::desired(previous, &ctx.settings, replicas);
            }
            _ => {}
        }
    }
    let fallback = rollout::gpu_fallback(md, deployment.as_deref(), &serving, &desired.revision);
    if let Some(f) = &fallback {
        if !rollout::one_at_a_time(deployment.as_deref()) {
            let event = Event {
                type_: EventType::Warning,
                reason: "GPUFallback".into(),
                note: Some(truncate_note(&format!(
                    "no free GPU for a surge pod ({}): replacing one pod at a time until revision {} is rolled out",
                    f.message, desired.revision
                ))),
                action: "Rollout".into(),
                secondary: None,
            };
            publish(ctx, &event, &md.object_ref(&())).await;
        }
        desired = desired.one_at_a_time();
    }
    let job_name = desired.pull_job.clone();
    let job = job_name
        .as_ref()
        .and_then(|j| stores.jobs.get(&ObjectRef::new(j).within(&ns)));
    if job_name.is_some() && !status::job_complete(job.as_deref()) {
        desired = desired.hold_deployment();
    }

    let mut writes = 0;
    let mut rejected = None;
    for child in &desired.children {
        let result = match child {
            Child::Deployment(o) => apply_from(ctx, &stores.deployments, o.as_ref()).await,
            Child::Service(o) => apply_from(ctx, &stores.services, o.as_ref()).await,
            Child::Pdb(o) => apply_from(ctx, &stores.pdbs, o.as_ref()).await,
            Child::NetworkPolicy(o) => apply_from(ctx, &stores.network_policies, o.as_ref()).await,
            Child::Job(o) => apply_from(ctx, &stores.jobs, o.as_ref()).await,
            Child::Pvc(o) => apply_from(ctx, &stores.pvcs, o.as_ref()).await,
        };
        match result {
            Ok(wrote) => writes += usize::from(wrote),
            Err(e) if e.needs_spec_change() => rejected = Some(e),
            Err(e) => return Err(e),
        }
    }
    let wanted = |kind: &str, n: &str| {
        desired
            .children
            .iter()
            .any(|c| c.kind() == kind && c.name() == n)
            || (kind == "Deployment" && desired.hold_deployment)
    };
    // Children are found by their names, except pull Jobs (named for their templates),
    // so a reconcile costs the same with 10 or 10,000 ModelDeployments.
    let cache = format!("{name}-cache");
    let jobs = stores
        .jobs
        .state_filter(|j| j.namespace().as_deref() == Some(ns.as_str()) && j.owned_by(&uid));
    writes += prune(
        ctx,
        stores.pdbs.get(&ObjectRef::new(&name).within(&ns)),
        &uid,
        |n| wanted("PodDisruptionBudget", n),
    )
    .await?;
    writes += prune(
        ctx,
        stores
            .network_policies
            .get(&ObjectRef::new(&name).within(&ns)),
        &uid,
        |n| wanted("NetworkPolicy", n),
    )
    .await?;
    writes += prune(
        ctx,
        stores.pvcs.get(&ObjectRef::new(&cache).within(&ns)),
        &uid,
        |n| wanted("PersistentVolumeClaim", n),
    )
    .await?;
    writes += prune(ctx, deployment.clone(), &uid, |n| wanted("Deployment", n)).await?;
    writes += prune(
        ctx,
        stores
            .deployments
            .get(&ObjectRef::new(&format!("{name}-canary")).within(&ns)),
        &uid,
        |n| wanted("Deployment", n),
    )
    .await?;
    writes += prune(ctx, jobs, &uid, |n| wanted("Job", n)).await?;

    let job_pods = pulling
        .into_iter()
        .filter(|p| p.labels().get("batch.kubernetes.io/job-name") == job_name.as_ref())
        .collect();
    let observed = Observed {
        deployment: deployment.as_deref(),
        pods: serving,
        job: job.as_deref(),
        job_pods,
        rejected: rejected.as_ref().map(|e| e.to_string()),
        scaling,
        fallback,
        rolled_back,
        canary,
    };
    let status = status::compute(md, &ctx.settings, &desired, &observed, now);
    if md.status.as_ref() != Some(&status) {
        let api: Api<ModelDeployment> = Api::namespaced(ctx.client.clone(), &ns);
        let patch = serde_json::json!({
            "apiVersion": "kandle.dev/v1alpha1",
            "kind": "ModelDeployment",
            "status": status,
        });
        api.patch_status(
            &name,
            &PatchParams::apply(build::FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(|source| Error::Api {
            verb: "apply status of",
            kind: "ModelDeployment",
            name: name.clone(),
            source,
        })?;
        writes += 1;
        announce(ctx, md, &status).await;
    }
    ctx.metrics.wrote(writes);
    if let Some(e) = rejected {
        return Err(e);
    }
    Ok(Action::requeue(recheck))
}

/// Whether the canary Deployment runs `revision` with every pod it wants ready.
fn canary_ready(deployment: Option<&Deployment>, revision: &str) -> bool {
    deployment.is_some_and(|d| {
        let status = d.status.clone().unwrap_or_default();
        build::template_revision(d) == Some(revision)
            && status.observed_generation >= d.metadata.generation
            && status.updated_replicas == d.spec.replicas
            && status.ready_replicas == d.spec.replicas
    })
}

/// Requests and 5xx answers of the ready serving pods, summed per track (canary or
/// stable); `None` when no pod answered.
async fn canary_counters(
    ctx: &Context,
    ns: &str,
    name: &str,
    serving: &[&Pod],
) -> Option<crate::crd::CanaryCounters> {
    let pods: Vec<(bool, PodTarget)> = serving
        .iter()
        .filter(|p| status::pod_ready(p))
        .map(|p| {
            let canary = p.labels().get(build::TRACK_LABEL).map(String::as_str) == Some("canary");
            let target = PodTarget {
                namespace: ns.to_string(),
                name: p.name_any(),
                instance: name.to_string(),
                ip: p.status.as_ref().and_then(|s| s.pod_ip.clone()),
            };
            (canary, target)
        })
        .collect();
    let targets: Vec<PodTarget> = pods.iter().map(|(_, t)| t.clone()).collect();
    let metrics = ctx.autoscaler.source().scrape(&targets).await;
    let mut counters = crate::crd::CanaryCounters::default();
    let mut answered = false;
    for ((canary, _), m) in pods.iter().zip(metrics) {
        let Some(m) = m else { continue };
        answered = true;
        if *canary {
            counters.canary_requests += m.requests;
            counters.canary_errors += m.errors;
        } else {
            counters.stable_requests += m.requests;
            counters.stable_errors += m.errors;
        }
    }
    answered.then_some(counters)
}

/// An object that does not decode (written around the CRD's checks, or by a newer
/// version): its status and an event say which field is wrong, once, and nothing else
/// happens until it changes.
async fn report_invalid(ctx: &Context, invalid: &InvalidObject) -> Error {
    let ns = invalid.metadata.namespace.clone().unwrap_or_default();
    let name = invalid.metadata.name.clone().unwrap_or_default();
    let resource = ApiResource::erase::<ModelDeployment>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &ns, &resource);
    let raw = match api.get(&name).await {
        Ok(obj) => serde_json::to_value(obj).unwrap_or_default(),
        Err(e) => {
            return Error::Api {
                verb: "get",
                kind: "ModelDeployment",
                name,
                source: e,
            };
        }
    };
    // The validator names the field and rule; serde's own message does not.
    let message = match crate::validate::model_deployment(&raw) {
        Err(e) => e.to_string(),
        Ok(_) => invalid.error.clone(),
    };
    let error = Error::InvalidObject(message.clone());
    let conditions = raw["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let reported = conditions.iter().any(|c| {
        c["type"] == "Ready" && c["reason"] == "InvalidSpec" && c["message"] == message.as_str()
    });
    if reported && raw["status"]["observedGeneration"] == raw["metadata"]["generation"] {
        return error;
    }
    let now = now();
    let condition = |type_: &str, status: &str| {
        serde_json::json!({
            "type": type_, "status": status, "reason": "InvalidSpec", "message": message,
            "observedGeneration": raw["metadata"]["generation"], "lastTransitionTime": now,
        })
    };
    let patch = serde_json::json!({
        "apiVersion": "kandle.dev/v1alpha1", "kind": "ModelDeployment",
        "status": {
            "observedGeneration": raw["metadata"]["generation"],
            "phase": "Failed",
            "conditions": [condition("Ready", "False"), condition("Degraded", "True")],
        },
    });
    let params = PatchParams::apply(build::FIELD_MANAGER).force();
    if let Err(e) = api
        .patch_status(&name, &params, &Patch::Apply(&patch))
        .await
    {
        return Error::Api {
            verb: "apply status of",
            kind: "ModelDeployment",
            name,
            source: e,
        };
    }
    ctx.metrics.wrote(1);
    let event = Event {
        type_: EventType::Warning,
        reason: "InvalidSpec".into(),
        note: Some(truncate_note(&message)),
        action: "Reconcile".into(),
        secondary: None,
    };
    let reference = ObjectReference {
        api_version: Some("kandle.dev/v1alpha1".into()),
        kind: Some("ModelDeployment".into()),
        name: Some(name),
        namespace: Some(ns),
        uid: invalid.metadata.uid.clone(),
        ..ObjectReference::default()
    };
    publish(ctx, &event, &reference).await;
    error
}

/// Seconds-precision now, as the API server stores times.
fn now() -> Time {
    let now = k8s_openapi::jiff::Timestamp::now().as_second();
    Time(k8s_openapi::jiff::Timestamp::from_second(now).expect("now is a valid time"))
}

/// Events for what a cluster operator should see: phase changes (with their cause), new
/// revisions rolling out, and the autoscaler's changes (with the numbers behind them).
async fn announce(ctx: &Context, md: &ModelDeployment, status: &crate::crd::ModelDeploymentStatus) {
    let Announced {
        phase,
        revision,
        replicas,
        rolled_back,
        canary,
    } = {
        let mut seen = ctx.announced.lock().expect("not poisoned");
        seen.insert(md.uid().unwrap_or_default(), Announced::of(status))
            .or(md.status.as_ref().map(Announced::of))
            .unwrap_or_default()
    };
    let mut events = Vec::new();
    if revision.is_some() && revision != status.update_revision {
        events.push(Event {
            type_: EventType::Normal,
            reason: "RolloutStarted".into(),
            note: Some(format!(
                "revision {} replaces {}",
                status.update_revision.clone().unwrap_or_default(),
                revision.unwrap_or_default()
            )),
            action: "Rollout".into(),
            secondary: None,
        });
    }
    if phase != status.phase
        && let Some(phase) = status.phase
    {
        let ready = status.conditions.iter().find(|c| c.type_ == "Ready");
        events.push(Event {
            type_: if matches!(phase, Phase::Degraded | Phase::Failed) {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: format!("{phase:?}"),
            note: ready.map(|c| truncate_note(&format!("{}: {}", c.reason, c.message))),
            action: "Reconcile".into(),
            secondary: None,
        });
    }
    if let Some(rb) = &status.rolled_back
        && rolled_back.as_ref() != Some(&rb.revision)
    {
        events.push(Event {
            type_: EventType::Warning,
            reason: "RolledBack".into(),
            note: Some(truncate_note(&format!(
                "revision {} made no progress ({}); back to revision {}",
                rb.revision,
                rb.message,
                status.update_revision.clone().unwrap_or_default()
            ))),
            action: "Rollback".into(),
            secondary: None,
        });
    }
    if let Some(c) = &status.canary
        && canary != Some((c.revision.clone(), c.step, c.verdict))
    {
        let (type_, reason) = match c.verdict {
            CanaryVerdict::Progressing => (EventType::Normal, "CanaryStep"),
            CanaryVerdict::Promoted => (EventType::Normal, "CanaryPromoted"),
            CanaryVerdict::Aborted => (EventType::Warning, "CanaryAborted"),
        };
        events.push(Event {
            type_,
            reason: reason.into(),
            note: Some(truncate_note(&format!(
                "revision {}: {}",
                c.revision, c.message
            ))),
            action: "Canary".into(),
            secondary: None,
        });
    }
    if let (Some(from), Some(to)) = (replicas, status.desired_replicas)
        && from != to
        && md.spec.autoscaling.is_some()
    {
        let why = status.conditions.iter().find(|c| c.type_ == "Autoscaled");
        events.push(Event {
            type_: EventType::Normal,
            reason: if to > from { "ScaledUp" } else { "ScaledDown" }.into(),
            note: Some(truncate_note(&format!(
                "from {from} to {to} replicas: {}",
                why.map(|c| c.message.as_str()).unwrap_or_default()
            ))),
            action: "Scale".into(),
            secondary: None,
        });
    }
    let reference = md.object_ref(&());
    for event in events {
        publish(ctx, &event, &reference).await;
    }
}

/// Events are best effort: a refused one is logged, never fails the reconcile.
async fn publish(ctx: &Context, event: &Event, reference: &ObjectReference) {
    if let Err(e) = ctx.recorder.publish(event, reference).await {
        tracing::warn!(error = %e, "cannot publish an event");
    }
}

fn truncate_note(s: &str) -> String {
    s.chars().take(1000).collect()
}

fn error_policy(
    guard: Arc<DeserializeGuard<ModelDeployment>>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    if error.needs_spec_change() {
        tracing::warn!(error = %error, "waiting for the ModelDeployment to change");
        return Action::await_change();
    }
    let key = ObjectRef::new(&guard.name_any()).within(&guard.namespace().unwrap_or_default());
    let mut failures = ctx.failures.lock().expect("not poisoned");
    let n = failures.entry(key).or_insert(0);
    *n += 1;
    let delay = backoff(*n);
    tracing::warn!(error = %error, retry_in = ?delay, "reconcile failed; retrying");
    Action::requeue(delay)
}

/// Applies `desired` unless the store shows it already in place.
async fn apply_from<K>(ctx: &Context, store: &Store<K>, desired: &K) -> Result<bool, Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + k8s_openapi::Resource
        + serde::Serialize
        + Clone
        + DeserializeOwned
        + Debug,
{
    let observed = store.get(&ObjectRef::from_obj(desired));
    apply(&ctx.client, desired, observed.as_deref()).await
}

/// Deletes those `found` objects that this ModelDeployment owns but no longer wants;
/// returns how many.
async fn prune<K>(
    ctx: &Context,
    found: impl IntoIterator<Item = Arc<K>>,
    uid: &str,
    wanted: impl Fn(&str) -> bool,
) -> Result<usize, Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + k8s_openapi::Resource
        + Clone
        + DeserializeOwned
        + Debug,
{
    let mut deleted = 0;
    for o in found {
        if o.owned_by(uid) && !wanted(&o.name_any()) {
            delete(&ctx.client, o.as_ref()).await?;
            deleted += 1;
        }
    }
    Ok(deleted)
}

/// Whether a child's controller reference points at this very ModelDeployment (not a
/// deleted one of the same name): only then is it the operator's to delete.
trait Owned {
    fn owned_by(&self, uid: &str) -> bool;
}

impl<K: Resource> Owned for K {
    fn owned_by(&self, uid: &str) -> bool {
        self.owner_references()
            .iter()
            .any(|o| o.controller == Some(true) && o.uid == uid)
    }
}
