//! Keeps the routing table current: ModelDeployments and the serving Services'
//! EndpointSlices watched (not resolved through DNS, which lags and hides readiness), the
//! table rebuilt whenever either changes.
use super::table::{self, Table};
use crate::controller::api;
use crate::crd::ModelDeployment;
use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::core::DeserializeGuard;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use std::sync::Arc;
use tokio::sync::watch;

/// Labels of every kandle serving Service, which the EndpointSlice controller copies onto
/// the Service's slices: the gateway watches those slices only.
const SLICE_SELECTOR: &str = "app.kubernetes.io/part-of=kandle,app.kubernetes.io/component=server";
/// Events taken together before one rebuild, so a rollout's burst costs one.
const BATCH: usize = 64;

/// The table, published to every request; `synced` turns true once both watches listed.
pub struct Routes {
    pub table: watch::Receiver<Arc<Table>>,
    pub synced: watch::Receiver<bool>,
}

/// Starts watching (in `namespace`, or all) and returns the table as it evolves.
pub fn start(client: &Client, namespace: Option<&str>) -> Routes {
    let mds_api: Api<DeserializeGuard<ModelDeployment>> = api(client, namespace);
    let slices_api: Api<EndpointSlice> = api(client, namespace);
    let (mds, mds_writer) = reflector::store();
    let (slices, slices_writer) = reflector::store();
    let md_events = watcher(mds_api, watcher::Config::default())
        .default_backoff()
        .reflect(mds_writer)
        .map(|e| e.map(|_| ()));
    let slice_events = watcher(
        slices_api,
        watcher::Config::default().labels(SLICE_SELECTOR),
    )
    .default_backoff()
    .reflect(slices_writer)
    .map(|e| e.map(|_| ()));
    let (table_tx, table) = watch::channel(Arc::new(Table::default()));
    let (synced_tx, synced) = watch::channel(false);
    let ready = (mds.clone(), slices.clone());
    tokio::spawn(async move {
        let _ = ready.0.wait_until_ready().await;
        let _ = ready.1.wait_until_ready().await;
        synced_tx.send_replace(true);
        tracing::info!("routes synced");
    });
    tokio::spawn(async move {
        let events = futures::stream::select(md_events, slice_events).ready_chunks(BATCH);
        let mut events = std::pin::pin!(events);
        while let Some(batch) = events.next().await {
            for error in batch.iter().filter_map(|e| e.as_ref().err()) {
                tracing::warn!(%error, "watch failed; retrying");
            }
            let next = rebuild(&mds, &slices);
            table_tx.send_if_modified(|current| {
                let changed = **current != next;
                if changed {
                    *current = Arc::new(next);
                }
                changed
            });
        }
    });
    Routes { table, synced }
}

fn rebuild(mds: &Store<DeserializeGuard<ModelDeployment>>, slices: &Store<EndpointSlice>) -> Table {
    // A ModelDeployment the schema no longer admits is the controller's to report.
    let valid: Vec<Arc<ModelDeployment>> = mds
        .state()
        .iter()
        .filter_map(|guard| guard.0.as_ref().ok().cloned().map(Arc::new))
        .collect();
    table::build(&valid, &slices.state())
}
