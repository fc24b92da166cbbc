//! The controller: watches ModelDeployments and their children, and reconciles each by
//! reading what the caches hold, planning (pure, `plan.rs`), applying the plan and
//! pruning what it leaves out, then reporting: status (pure, `status/`) written if
//! changed, and the events of what changed.
use crate::apply::{Object, apply, delete_named};
use crate::autoscale::Autoscaler;
use crate::autoscale::scrape::PodTarget;
use crate::build::{self, Child, ChildRef, Kind, MANAGED_BY, Settings};
use crate::crd::ModelDeployment;
use crate::diagnosis;
use crate::error::{Error, backoff};
use crate::events::{self, Announced};
use crate::index::PodIndex;
use crate::metrics::Metrics;
use crate::plan::{self, Cluster, Plan, ScrapeTarget, Scraped, Step};
use crate::status;
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
use kube::runtime::events::{Event, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Instant;
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
    reporter: Reporter,
    metrics: Arc<Metrics>,
    stores: Stores,
    /// Consecutive transient failures per object, for the retry backoff.
    failures: Mutex<HashMap<ObjectRef<ModelDeployment>, u32>>,
    /// What events were last published for, per object (by uid): the cache may still
    /// show an older status after a write, and an event must not be repeated because of that.
    announced: Mutex<HashMap<String, Announced>>,
    autoscaler: Arc<Autoscaler>,
}

/// Reconciles running at once.
const CONCURRENCY: u16 = 16;

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
        reporter,
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
                && diagnosis::pod_ready(p)
        })
        .map(|p| PodTarget::of(&p, name))
        .collect()
}

fn keep_all<K>(_: &mut K) {}

/// The API of a namespaced kind, in one namespace or all.
pub(crate) fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
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

/// Read, plan, apply, report.
async fn reconcile_one(md: &ModelDeployment, ctx: &Context) -> Result<Action, Error> {
    if md.meta().deletion_timestamp.is_some() {
        // Owner references hand the children to the garbage collector.
        return Ok(Action::await_change());
    }
    let now = now();
    let mut cluster = read(md, ctx);
    let plan = loop {
        match plan::plan(md, &ctx.settings, &cluster, &now) {
            Step::Plan(plan) => break plan,
            Step::Scrape(targets) => cluster.scraped = Scraped::Yes(scrape(ctx, &targets).await),
        }
    };
    for event in &plan.events {
        publish(ctx, event, &md.object_ref(&())).await;
    }
    let (mut writes, rejected) = apply_plan(ctx, md, &plan).await?;
    let observed = plan.observed(&cluster, rejected.as_ref().map(Error::to_string));
    let status = status::compute(md, &ctx.settings, &plan.desired, &observed, now);
    writes += write_status(ctx, md, &status).await?;
    ctx.metrics.wrote(writes);
    match rejected {
        Some(e) => Err(e),
        None => Ok(Action::requeue(plan.recheck)),
    }
}

/// What the caches hold of `md`'s children: found by the names `build/` gives them (pull
/// Jobs by owner), so a reconcile costs the same with 10 or 10,000 ModelDeployments.
fn read(md: &ModelDeployment, ctx: &Context) -> Cluster {
    let stores = &ctx.stores;
    let ns = md.namespace().unwrap_or_default();
    let name = md.name_any();
    let uid = md.uid().unwrap_or_default();
    let get = |store: &Store<Deployment>, name: &str| store.get(&ObjectRef::new(name).within(&ns));
    let jobs = stores
        .jobs
        .state_filter(|j| j.namespace().as_deref() == Some(ns.as_str()) && j.owned_by(&uid));
    let mut owned: Vec<ChildRef> = jobs
        .iter()
        .map(|j| ChildRef {
            kind: Kind::Job,
            name: j.name_any(),
        })
        .collect();
    for child in build::named_children(md) {
        let found = match child.kind {
            Kind::Pvc => owns(&stores.pvcs, &ns, &child.name, &uid),
            Kind::Job => owns(&stores.jobs, &ns, &child.name, &uid),
            Kind::Deployment => owns(&stores.deployments, &ns, &child.name, &uid),
            Kind::Service => owns(&stores.services, &ns, &child.name, &uid),
            Kind::Pdb => owns(&stores.pdbs, &ns, &child.name, &uid),
            Kind::NetworkPolicy => owns(&stores.network_policies, &ns, &child.name, &uid),
        };
        if found {
            owned.push(child);
        }
    }
    let pods = stores
        .pod_index
        .names(&ns, &name)
        .iter()
        .filter_map(|pod| stores.pods.get(&ObjectRef::new(pod).within(&ns)))
        .collect();
    Cluster {
        deployment: get(&stores.deployments, &name),
        canary: get(&stores.deployments, &build::canary_name(&name)),
        jobs,
        pods,
        owned,
        scaling: ctx.autoscaler.decision(&ObjectRef::from_obj(md)),
        scraped: Scraped::No,
    }
}

/// Whether `store` holds the object `name` and this very ModelDeployment (`uid`, not a
/// deleted one of the same name) owns it: only then is it the operator's to delete.
fn owns<K>(store: &Store<K>, ns: &str, name: &str, uid: &str) -> bool
where
    K: Resource<DynamicType = ()> + Clone,
{
    store
        .get(&ObjectRef::new(name).within(ns))
        .is_some_and(|o| o.owned_by(uid))
}

/// The canary's counters, read from the pods the plan named.
async fn scrape(ctx: &Context, targets: &[ScrapeTarget]) -> Option<crate::crd::CanaryCounters> {
    let pods: Vec<PodTarget> = targets.iter().map(|t| t.pod.clone()).collect();
    let answers = ctx.autoscaler.source().scrape(&pods).await;
    plan::counters(targets, &answers)
}

/// Applies the plan's children (unless the caches show them in place) and deletes what it
/// prunes. Returns the writes made, and the API server's refusal of a child that only a
/// spec change can fix (the rest is still applied).
async fn apply_plan(
    ctx: &Context,
    md: &ModelDeployment,
    plan: &Plan,
) -> Result<(usize, Option<Error>), Error> {
    let stores = &ctx.stores;
    let mut writes = 0;
    let mut rejected = None;
    for child in &plan.desired.children {
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
    let ns = md.namespace().unwrap_or_default();
    let client = &ctx.client;
    for child in &plan.prune {
        let name = &child.name;
        match child.kind {
            Kind::Pvc => delete_named::<PersistentVolumeClaim>(client, &ns, name).await?,
            Kind::Job => delete_named::<Job>(client, &ns, name).await?,
            Kind::Deployment => delete_named::<Deployment>(client, &ns, name).await?,
            Kind::Service => delete_named::<Service>(client, &ns, name).await?,
            Kind::Pdb => delete_named::<PodDisruptionBudget>(client, &ns, name).await?,
            Kind::NetworkPolicy => delete_named::<NetworkPolicy>(client, &ns, name).await?,
        }
        writes += 1;
    }
    Ok((writes, rejected))
}

/// Writes `status` unless it is what the object already has, and publishes the events of
/// what changed; returns the writes made.
async fn write_status(
    ctx: &Context,
    md: &ModelDeployment,
    status: &crate::crd::ModelDeploymentStatus,
) -> Result<usize, Error> {
    if md.status.as_ref() == Some(status) {
        return Ok(0);
    }
    let name = md.name_any();
    let api: Api<ModelDeployment> =
        Api::namespaced(ctx.client.clone(), &md.namespace().unwrap_or_default());
    let patch = serde_json::json!({
        "apiVersion": kandle_contract::API_VERSION,
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
        name,
        source,
    })?;
    // The cache may still show an older status after a write: events are judged against
    // what was last announced, so none is repeated because of that.
    let before = {
        let mut seen = ctx.announced.lock().expect("not poisoned");
        seen.insert(md.uid().unwrap_or_default(), Announced::of(status))
            .or(md.status.as_ref().map(Announced::of))
            .unwrap_or_default()
    };
    for event in events::transitions(md, before, status) {
        publish(ctx, &event, &md.object_ref(&())).await;
    }
    Ok(1)
}

/// An object that does not decode (written around the CRD's checks, or by a newer
/// version): its status and an event say which field is wrong, once, and nothing else
/// happens until it changes.
async fn report_invalid(ctx: &Context, invalid: &InvalidObject) -> Error {
    let ns = invalid.metadata.namespace.clone().unwrap_or_default();
    let name = invalid.metadata.name.clone().unwrap_or_default();
    let resource = ApiResource::erase::<ModelDeployment>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &ns, &resource);
    let api_error = |verb, source| Error::Api {
        verb,
        kind: "ModelDeployment",
        name: name.clone(),
        source,
    };
    let raw = match api.get(&name).await {
        Ok(obj) => serde_json::to_value(obj).unwrap_or_default(),
        Err(e) => return api_error("get", e),
    };
    // The validator names the field and rule; serde's own message does not.
    let message = match crate::validate::model_deployment(&raw) {
        Err(e) => e.to_string(),
        Ok(_) => invalid.error.clone(),
    };
    let Some(patch) = status::invalid::patch(&raw, &message, &now()) else {
        return Error::InvalidObject(message);
    };
    let params = PatchParams::apply(build::FIELD_MANAGER).force();
    if let Err(e) = api
        .patch_status(&name, &params, &Patch::Apply(&patch))
        .await
    {
        return api_error("apply status of", e);
    }
    ctx.metrics.wrote(1);
    let reference = ObjectReference {
        api_version: Some(kandle_contract::API_VERSION.into()),
        kind: Some("ModelDeployment".into()),
        name: Some(name.clone()),
        namespace: Some(ns),
        uid: invalid.metadata.uid.clone(),
        ..ObjectReference::default()
    };
    publish(ctx, &events::invalid_spec(&message), &reference).await;
    Error::InvalidObject(message)
}

/// Seconds-precision now, as the API server stores times.
fn now() -> Time {
    let now = k8s_openapi::jiff::Timestamp::now().as_second();
    Time(k8s_openapi::jiff::Timestamp::from_second(now).expect("now is a valid time"))
}

/// Events are best effort: a refused one is logged, never fails the reconcile.
///
/// Each event gets a recorder of its own: kube's recorder folds an event into an earlier one
/// with the same reason into a series without updating its note, so "scaled from 3 to 4"
/// would be lost under "scaled from 1 to 3". Events here are already published once per
/// transition (see `announced`), so there is nothing to fold.
async fn publish(ctx: &Context, event: &Event, reference: &ObjectReference) {
    let recorder = Recorder::new(ctx.client.clone(), ctx.reporter.clone());
    if let Err(e) = recorder.publish(event, reference).await {
        tracing::warn!(error = %e, "cannot publish an event");
    }
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
async fn apply_from<K: Object>(
    ctx: &Context,
    store: &Store<K>,
    desired: &K,
) -> Result<bool, Error> {
    let observed = store.get(&ObjectRef::from_obj(desired));
    apply(&ctx.client, desired, observed.as_deref()).await
}

/// Whether a child's controller reference points at this very ModelDeployment.
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
