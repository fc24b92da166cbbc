//! Leader election on a coordination.k8s.io Lease, so several operator replicas are safe:
//! one reconciles, the others wait to take over. Expiry is judged by this process's own
//! clock (how long the lease record has gone unchanged), never by comparing clocks.
use crate::metrics::Metrics;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::PostParams;
use kube::{Api, Client};
use std::future::Future;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// Who this replica is (its pod name).
    pub identity: String,
    /// A lease not renewed for this long may be taken.
    pub duration: Duration,
    /// How often the leader renews.
    pub renew_every: Duration,
}

#[derive(Debug, thiserror::Error)]
#[error("lost the leader lease {0}: another replica may now lead")]
pub struct LostLease(String);

/// Waits to become leader, then runs `work` while renewing the lease. Returns `work`'s
/// output, or an error as soon as the lease is lost (the caller should exit so that
/// nothing reconciles without holding it). The lease is released when `work` ends.
pub async fn lead<F: Future>(
    client: Client,
    config: LeaseConfig,
    metrics: &Metrics,
    work: F,
) -> Result<F::Output, LostLease> {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let mut seen: Option<(Option<String>, Instant)> = None;
    loop {
        match try_acquire(&api, &config, &mut seen).await {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, lease = %config.name, "cannot read the leader lease")
            }
        }
        tokio::time::sleep(config.renew_every).await;
    }
    tracing::info!(identity = %config.identity, lease = %config.name, "leading");
    metrics.set_leader(true);
    let outcome = tokio::select! {
        out = work => Ok(out),
        () = keep(&api, &config) => Err(LostLease(config.name.clone())),
    };
    metrics.set_leader(false);
    if outcome.is_ok() {
        release(&api, &config).await;
    }
    outcome
}

fn now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

/// Takes the lease if it is free, ours, or unrenewed for its duration as seen from here.
async fn try_acquire(
    api: &Api<Lease>,
    config: &LeaseConfig,
    seen: &mut Option<(Option<String>, Instant)>,
) -> Result<bool, kube::Error> {
    let Some(mut lease) = api.get_opt(&config.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(config.name.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(spec(config, now(), 0)),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let current = lease.spec.clone().unwrap_or_default();
    let holder = current.holder_identity.clone().filter(|h| !h.is_empty());
    let record = current.renew_time.as_ref().map(|t| t.0.to_string());
    let expired = match seen {
        Some((last, since)) if *last == record => since.elapsed() >= config.duration,
        _ => {
            *seen = Some((record, Instant::now()));
            false
        }
    };
    let ours = holder.as_deref() == Some(config.identity.as_str());
    if holder.is_some() && !ours && !expired {
        return Ok(false);
    }
    let transitions = current.lease_transitions.unwrap_or(0) + i32::from(!ours);
    let acquired = if ours {
        current.acquire_time.unwrap_or_else(now)
    } else {
        now()
    };
    lease.spec = Some(spec(config, acquired, transitions));
    replace_if_unchanged(api, &lease).await
}

/// Writes `lease` back with the resourceVersion it was read at: false (409) when another
/// replica wrote it in between.
async fn replace_if_unchanged(api: &Api<Lease>, lease: &Lease) -> Result<bool, kube::Error> {
    let name = lease.metadata.name.clone().unwrap_or_default();
    match api.replace(&name, &PostParams::default(), lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

fn spec(config: &LeaseConfig, acquired: MicroTime, transitions: i32) -> LeaseSpec {
    LeaseSpec {
        holder_identity: Some(config.identity.clone()),
        lease_duration_seconds: Some(config.duration.as_secs() as i32),
        acquire_time: Some(acquired),
        renew_time: Some(now()),
        lease_transitions: Some(transitions),
        ..LeaseSpec::default()
    }
}

/// Renews until the lease is lost: taken by another replica, or not renewed for its
/// duration (the API server unreachable), after which another replica may hold it.
async fn keep(api: &Api<Lease>, config: &LeaseConfig) {
    let mut renewed = Instant::now();
    loop {
        tokio::time::sleep(config.renew_every).await;
        match renew(api, config).await {
            Ok(true) => renewed = Instant::now(),
            Ok(false) => return,
            Err(e) => tracing::warn!(error = %e, "cannot renew the leader lease"),
        }
        if renewed.elapsed() >= config.duration {
            return;
        }
    }
}

async fn renew(api: &Api<Lease>, config: &LeaseConfig) -> Result<bool, kube::Error> {
    let mut lease = api.get(&config.name).await?;
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    if spec.holder_identity.as_deref() != Some(config.identity.as_str()) {
        return Ok(false);
    }
    spec.renew_time = Some(now());
    replace_if_unchanged(api, &lease).await
}

/// Hands the lease over at once on a clean shutdown, so a standby need not wait it out.
async fn release(api: &Api<Lease>, config: &LeaseConfig) {
    let Ok(mut lease) = api.get(&config.name).await else {
        return;
    };
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    if spec.holder_identity.as_deref() == Some(config.identity.as_str()) {
        spec.holder_identity = None;
        if let Err(e) = api
            .replace(&config.name, &PostParams::default(), &lease)
            .await
        {
            tracing::warn!(error = %e, "cannot release the leader lease");
        }
    }
}
